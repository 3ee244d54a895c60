"""Prompt tuning: learn a few "virtual token" embeddings prepended to every input; the model stays frozen.

Use it when many tasks share one base model and each task may only ship a few kilobytes (``num_virtual_tokens
× hidden_size`` numbers), or when the model must not change at all. It learns less than LoRA (no new
content, mostly format and style) and wants a higher learning rate (1e-2 to 3e-1). The prompt cannot be merged
into the weights, so the artifact is ``OUTPUT_DIR/export/``: the prompt (PEFT adapter files), the tokenizer,
and a reference to the base model in ``ray_ft.json``; :meth:`PromptTuningMethod.load_export` rebuilds the
model for ``ray-ft generate``, evaluation and serving. Its config is
:class:`ray_ft.config.PromptTuningMethodConfig`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ray_ft.config import ExperimentConfig, PromptTuningMethodConfig
from ray_ft.methods import register_method
from ray_ft.methods.generation import GenerationMethod
from ray_ft.models import base_model_dir, load_base_for_training, load_causal_lm, load_tokenizer


class PromptTunedLM(torch.nn.Module):
    """A PEFT prompt-tuning model that behaves like a plain causal LM towards ray-ft's callers.

    ``forward`` returns logits for the caller's tokens only (the virtual tokens' positions are cut), so
    teacher-forced losses line up with ``input_ids``. ``generate`` places the virtual tokens right after any
    left padding, immediately before the real tokens, and lets the model derive positions from the attention
    mask: a left-padded batch then produces exactly what each prompt produces alone, with the same positions
    as in training. The returned sequences start with ``input_ids``, as for any decoder-only model.
    """

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model
        self.num_virtual_tokens = peft_model.active_peft_config.num_virtual_tokens
        self.config = peft_model.get_base_model().config

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        out = self.peft_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if kwargs.get("labels") is None and input_ids is not None:
            out.logits = out.logits[:, -input_ids.shape[1] :]
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        base = self.peft_model.get_base_model()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = base.get_input_embeddings()(input_ids)
        prompt = self.peft_model.get_prompt(batch_size=input_ids.shape[0]).to(embeds.dtype)
        ones = torch.ones(self.num_virtual_tokens, dtype=attention_mask.dtype, device=attention_mask.device)
        rows, masks = [], []
        for i in range(input_ids.shape[0]):
            n_pad = int((attention_mask[i] == 0).sum()) if attention_mask[i, 0] == 0 else 0
            rows.append(torch.cat([embeds[i, :n_pad], prompt[i], embeds[i, n_pad:]]))
            masks.append(torch.cat([attention_mask[i, :n_pad], ones, attention_mask[i, n_pad:]]))
        out = base.generate(inputs_embeds=torch.stack(rows), attention_mask=torch.stack(masks), **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        sequences = torch.cat([input_ids, sequences.to(input_ids.device)], dim=1)
        if hasattr(out, "sequences"):
            out.sequences = sequences
            return out
        return sequences


class PromptTuningMethod(GenerationMethod):
    name = "prompt_tuning"
    config_cls = PromptTuningMethodConfig
    artifact = "export"

    def peft_config(self, cfg: ExperimentConfig, model_dir: str):
        from peft import PromptTuningConfig, PromptTuningInit, TaskType

        m = cfg.method
        text = m.init == "text"
        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=m.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=m.init_text if text else None,
            tokenizer_name_or_path=model_dir if text else None,
            tokenizer_kwargs={"trust_remote_code": cfg.model.trust_remote_code} if text else None,
        )

    def load_for_training(self, cfg: ExperimentConfig, model_dir: str, device: torch.device):
        from peft import get_peft_model

        model = load_base_for_training(cfg, model_dir, device, input_grads=False)
        return get_peft_model(model, self.peft_config(cfg, model_dir))

    def save_trainable(self, model, path: Path, tokenizer) -> None:
        """Write the prompt as PEFT adapter files, reading the embedding weight directly.

        ``PeftModel.save_pretrained`` computes the prompt by calling the prompt encoder; on rank 0 alone under
        ZeRO-3 that call enters DeepSpeed's parameter trace on one rank only and deadlocks the next step.
        """
        from dataclasses import replace

        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        config = model.peft_config["default"]
        base_name = config.base_model_name_or_path or getattr(model.get_base_model(), "name_or_path", None)
        replace(config, inference_mode=True, base_model_name_or_path=base_name).save_pretrained(str(path))
        weight = model.prompt_encoder["default"].embedding.weight.detach().to("cpu", copy=True).contiguous()
        save_file({"prompt_embeddings": weight}, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})

    def export(self, cfg: ExperimentConfig, model_dir: str, trained_dir: Path, out_dir: Path) -> None:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(Path(trained_dir) / name, out_dir / name)
        load_tokenizer(model_dir, cfg.model.trust_remote_code).save_pretrained(out_dir)

    def load_export(self, export_dir: Path, meta: dict[str, Any]):
        """The served model (:class:`PromptTunedLM`, fp32) and its tokenizer, from an exported directory."""
        from peft import PeftModel

        base = load_causal_lm(base_model_dir(meta), torch.float32)
        peft_model = PeftModel.from_pretrained(base, str(export_dir), is_trainable=False)
        return PromptTunedLM(peft_model).eval(), load_tokenizer(str(export_dir))


register_method(PromptTuningMethod())

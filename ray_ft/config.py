"""Typed experiment configuration.

A config is a YAML file (see ``jobs/``) plus ``key=value`` overrides from the command line.
Every section is a small pydantic model that forbids unknown keys, so a typo such as
``train.lrr=1e-3`` fails with a message naming the field instead of being ignored.
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# ``ray_ft.text`` imports nothing from ray_ft: the only ray_ft module below this one.
from ray_ft.text import MAX_NESTING, check_nesting, find_invalid_text, too_deep_at

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
MAX_CONFIG_BYTES = 4 << 20
"""Largest config file read."""

# Numeric field types: every number in every section is one of these (floats are finite everywhere, see
# ``StrictModel``), so a negative count, a zero that used to mean "unset", or a size that would exhaust memory is
# refused when the config is loaded, naming the field.
Count = Annotated[int, Field(ge=1, le=1_000_000_000)]
"""A positive count of steps, examples or trials."""
Size = Annotated[int, Field(ge=1, le=1 << 20)]
"""A positive size that memory grows with (batch sizes, sequence lengths, ranks, tokens)."""
NonNegative = Annotated[int, Field(ge=0, le=1_000_000_000)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
"""A random seed (NumPy's range)."""
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]


class ConfigError(ValueError):
    """A configuration problem, with every message naming the source and the field."""

    def __init__(self, messages: list[str]):
        self.messages = messages
        super().__init__("\n".join(messages))


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors and no float may be NaN or infinite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(StrictModel):
    """Which base model to tune."""

    name_or_path: str = EMBEDDED_MODEL
    """A Hugging Face id, a local model directory, a ``.gguf`` file, or ``embedded:...``."""
    gguf_file: str | None = None
    """GGUF file name inside ``name_or_path`` when it is a directory holding GGUF files."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype for training; ``auto`` is bf16 on GPU, fp32 on CPU."""
    trust_remote_code: bool = False
    """Run model code shipped with a checkpoint. Off unless you trust its source."""
    allow_pickle: bool = False
    """Allow pickle-based ``*.bin`` weights (unsafe for untrusted files); safetensors otherwise."""


class DataConfig(StrictModel):
    """Where the data is and how examples become token sequences."""

    path: str = "ray_ft/datasets/vi_ai_qa.jsonl"
    """A file, a glob (``data/*.parquet``), a ``datasets.save_to_disk`` directory or a URI (``s3://...``, ``gs://...``;
    credentials from the usual environment, ``AWS_ENDPOINT_URL`` for S3-compatible servers)."""
    format: Literal["auto", "qa", "io", "chat", "sharegpt", "alpaca", "classification"] = "auto"
    """Record shape; ``auto`` takes the one of the first valid record."""
    file_format: Literal["auto", "jsonl", "json", "parquet", "csv", "arrow"] = "auto"
    """File format of every file; ``auto`` tells each file's from its name and first bytes."""
    template: str = "Human: {question} Assistant: {answer}"
    """Prompt template; must contain ``{question}`` and end with ``{answer}``."""
    use_chat_template: bool | None = None
    """Render with the tokenizer's chat template instead of ``template``. ``null`` (auto): the chat template for
    conversation records (``chat``, ``sharegpt``, ``alpaca``) when the model's tokenizer has one; ``template`` for
    Q/A and ``io`` records, and for a tokenizer without a chat template. A run logs and saves what it chose."""
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    """Conversations: take the loss on every assistant turn, or on the last one only (earlier ones are context)."""
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    max_length: Annotated[int, Field(ge=2, le=1 << 20)] = 512
    """Longest sequence kept (longer ones are truncated from the left of the prompt)."""
    dedupe: bool = True
    seed: Seed = 42
    limit: Count | None = None
    """Use a seeded random sample of this many examples (after validation and cleaning), e.g. for quick runs."""
    streaming: bool | None = None
    """Feed training through Ray Data: files are read, validated and split by Ray Data tasks, every example is
    tokenised once per epoch in a Ray Data actor pool and streamed to each worker's shard with prefetching; the
    driver holds no records. Each epoch reads the files in a new seeded order; each worker mixes its rows in a local
    shuffle buffer and length-groups micro-batches within windows of 16. A resumed run continues at its
    step with a fresh pass. ``null`` (auto): streamed when the data is remote or over 16 MiB on disk, in memory
    otherwise."""

    @field_validator("template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        if "{question}" not in v or not v.rstrip().endswith("{answer}"):
            raise ValueError("must contain '{question}' and end with '{answer}'")
        return v


class TrainConfig(StrictModel):
    """The optimisation loop."""

    epochs: Annotated[float, Field(gt=0.0, le=1_000_000)] = 3.0
    max_steps: Count | None = None
    """Optimizer steps; overrides ``epochs`` when set (``null``: from ``epochs``; 0 is an error)."""
    min_steps: Count | None = 50
    """Floor on optimizer steps when training by ``epochs``: on a small training set whose epochs at the
    configured global batch give fewer, the global batch shrinks (``grad_accum`` first, then ``batch_size``) to the
    largest that reaches it; the run prints what it chose. ``null`` keeps the configured batch."""
    batch_size: Size = 8
    """Micro-batch per worker."""
    grad_accum: Size = 1
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 2e-4
    weight_decay: NonNegativeFloat = 0.0
    warmup_ratio: Fraction = 0.05
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: NonNegativeFloat = 1.0
    """Gradient clipping norm; 0 turns clipping off."""
    seed: Seed = 42
    log_every: Count = 1
    eval_every: Count | None = None
    """Steps between validation passes (and checkpoints); ``null``: once per epoch (0 is an error)."""
    keep_checkpoints: Annotated[int, Field(ge=1, le=1000)] = 2
    gradient_checkpointing: bool = False
    packing: bool = False
    """Pack each micro-batch into one row without padding: position ids restart per example and attention
    stays within each example (a block-diagonal causal mask; varlen kernels with flash attention)."""
    compile: bool = False
    """``torch.compile`` the model (inductor, dynamic shapes) through DeepSpeed's ``engine.compile``. The first step
    includes compiling (seconds for a tiny model, about ten minutes for a 135M one on one CPU core; inductor caches
    the result for the next run); it pays off on long runs, mostly on GPU."""
    attention: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """Attention kernel (transformers' ``attn_implementation``): ``auto`` is the model's default (SDPA for most
    architectures); ``flash_attention_2`` needs GPUs (``scaling.use_gpu``) and the ``flash-attn`` package, and runs
    packed rows (``train.packing``) through its variable-length kernel."""
    fused_linear_cross_entropy: bool = False
    """Liger-Kernel's fused linear + cross-entropy: the loss is computed chunk by chunk from the last hidden
    states, never holding the (tokens x vocabulary) logits; for large vocabularies. Needs GPUs
    (``scaling.use_gpu``) and the ``liger-kernel`` package."""

    @field_validator("attention")
    @classmethod
    def _attention_installed(cls, v: str) -> str:
        if v == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("flash_attention_2 needs the flash-attn package (ray-ft[gpu-kernels]); not installed")
        return v

    @field_validator("fused_linear_cross_entropy")
    @classmethod
    def _liger_installed(cls, v: bool) -> bool:
        if v and importlib.util.find_spec("liger_kernel") is None:
            raise ValueError("needs the liger-kernel package (extra ray-ft[gpu-kernels]); not installed")
        return v


class DeepSpeedConfig(StrictModel):
    enabled: bool = True
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    extra: dict[str, Any] = {}
    """Merged into the generated DeepSpeed config dict (expert escape hatch)."""

    @field_validator("extra")
    @classmethod
    def _plain_values(cls, v: dict[str, Any]) -> dict[str, Any]:
        stack: list[Any] = [v]
        while stack:  # iterative: load_config has already bounded the nesting
            node = stack.pop()
            if isinstance(node, float) and not math.isfinite(node):
                raise ValueError(f"numbers must be finite, got {node}")
            if isinstance(node, dict):
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
        return v


class ScalingConfig(StrictModel):
    """Ray resources and storage."""

    num_workers: Annotated[int, Field(ge=0, le=10_000)] = 2
    """Ray Train workers; 0 runs the loop in the driver process (Ray Train local mode)."""
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Field(gt=0.0, le=1024)] = 1.0
    address: str | None = None
    """Ray cluster address; default ``RAY_ADDRESS`` or a new local Ray."""
    storage_path: str | None = None
    """Where Ray Train persists checkpoints (local dir, NFS, ``s3://``...); default ``OUTPUT_DIR/ray``."""
    max_failures: Annotated[int, Field(ge=0, le=1000)] = 2


class TrackingConfig(StrictModel):
    tracking_uri: str | None = None
    """MLflow URI; default ``MLFLOW_TRACKING_URI`` or ``sqlite:///<mlflow_dir>/mlflow.db``."""
    mlflow_dir: str = "~/.cache/ray-ft/mlflow"
    experiment: Annotated[str, Field(min_length=1, max_length=500)] = "ray-ft"
    registered_model: str | None = "ray-ft-{method}"
    """Name of the MLflow registered model the artifact becomes a version of; ``{method}`` is replaced by the
    method name; ``null``: not registered."""

    @field_validator("registered_model")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        # MLflow refuses these names only when registering, after training; check them up front.
        if v is None:
            return v
        try:
            name = v.format(method="method")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"the only placeholder allowed is {{method}} ({type(e).__name__}: {e})") from None
        if not name.strip() or len(name) > 256:
            raise ValueError("must be 1 to 256 characters")
        if any(c in name for c in "/:") or name.strip() in (".", ".."):
            raise ValueError("MLflow model names cannot contain '/' or ':' or be '.' or '..'")
        if not name.isprintable():
            raise ValueError("must hold printable characters only")
        return v


class EvalConfig(StrictModel):
    enabled: bool = True
    max_new_tokens: Size = 64
    max_examples: NonNegative = 64
    """Questions per split to generate for (train and validation)."""
    batch_size: Size = 16
    compare_base: bool = True
    show_examples: NonNegative = 3


class SearchConfig(StrictModel):
    """Ray Tune search over LoRA hyper-parameters (``ray-ft tune``)."""

    r: Annotated[list[Size], Field(min_length=1)] = [4, 8, 16]
    """LoRA ranks to choose from."""
    alpha: Annotated[list[Size], Field(min_length=1)] | None = None
    """LoRA alphas to choose from; when set it wins over ``alpha_multiple``."""
    alpha_multiple: Annotated[list[Annotated[float, Field(gt=0.0, le=1000)]], Field(min_length=1)] | None = [1.0, 2.0]
    """Alpha as a multiple of the sampled ``r`` (``alpha = round(multiple * r)``)."""
    lr: tuple[Annotated[float, Field(gt=0.0, le=10.0)], Annotated[float, Field(gt=0.0, le=10.0)]] = (1e-4, 2e-3)
    """Learning-rate range ``(low, high)``, sampled log-uniformly; ``low == high`` fixes it."""
    dropout: Annotated[list[Annotated[float, Field(ge=0.0, lt=1.0)]], Field(min_length=1)] | None = None
    """LoRA dropouts to choose from (default: ``method.dropout``)."""
    num_samples: Annotated[int, Field(ge=1, le=100_000)] = 4
    """Trials to run."""
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "fifo"] = "asha"
    """``asha`` stops weak trials early at rungs of ``grace_period * reduction_factor**k`` steps; ``fifo`` runs
    every trial to the end."""
    grace_period: Count = 1
    """Steps a trial runs before ASHA may stop it."""
    reduction_factor: Annotated[int, Field(ge=2, le=1000)] = 2
    search_alg: Literal["random", "optuna"] = "random"
    seed: Seed | None = None
    """Seed for drawing trials: the same seed draws the same hyper-parameters."""
    max_concurrent_trials: Annotated[int, Field(ge=1, le=100_000)] | None = None
    """Default: as many trials as the cluster's CPUs/GPUs hold at once."""
    max_failures: Annotated[int, Field(ge=0, le=1000)] = 1
    """Times a crashed trial is restarted (from its last checkpoint) before it counts as failed."""

    @field_validator("lr")
    @classmethod
    def _lr_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("must be [low, high] with 0 < low <= high")
        return v


# --------------------------------------------------------------------------- tuning methods
# One config class per method, told apart by ``name`` (a discriminated union): validating a config needs no
# registry. Checks that read other sections (``data``, ``train``, ``deepspeed``) are each class's ``check``, run by
# :class:`ExperimentConfig` once every section is valid.


class LoraMethodConfig(StrictModel):
    """LoRA: low-rank adapters on the projections of a frozen model (``ray_ft.methods.lora``)."""

    name: Literal["lora"] = "lora"
    r: Size = 16
    alpha: Size = 32
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    target_modules: list[str] | str | None = None
    """Module names (or ``all-linear``); default: the model family's projections."""
    layers_to_transform: list[NonNegative] | None = None
    """Only adapt these decoder layers (default: all)."""
    top_layers: Size | None = None
    """Only adapt the top N decoder layers: backward stops below them, so steps are faster."""

    def check(self, cfg: ExperimentConfig) -> None:
        if self.top_layers is not None and self.layers_to_transform is not None:
            raise ValueError("method.top_layers and method.layers_to_transform are exclusive; set one")


class QLoraMethodConfig(LoraMethodConfig):
    """QLoRA: LoRA on a base model held in 4-bit NF4 (``ray_ft.methods.qlora``): LoRA plus the quantisation."""

    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype the 4-bit layers compute in; ``auto``: bf16 on GPU, fp32 on CPU (faster there than bf16)."""
    double_quant: bool = True
    """Quantise the quantisation constants too (about 0.4 bit per weight saved)."""

    def check(self, cfg: ExperimentConfig) -> None:
        super().check(cfg)
        if cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3:
            raise ValueError(
                "method 'qlora' with deepspeed.zero_stage=3 is not supported: ZeRO-3 partitions the frozen base "
                "weights, which are bitsandbytes 4-bit tensors loaded whole on every worker (no zero.Init for "
                "4-bit), so it gains no memory and adds an all-gather per layer; use deepspeed.zero_stage 0-2, or "
                "method.name=lora with ZeRO-3"
            )


class PromptTuningMethodConfig(StrictModel):
    """Prompt tuning: trainable virtual-token embeddings before every input (``ray_ft.methods.prompt_tuning``)."""

    name: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: Size = 20
    """How many trainable embeddings are prepended to every sequence."""
    init: Literal["text", "random"] = "text"
    """``text``: start from the embeddings of ``init_text`` (repeated or cut to length); ``random``: random."""
    init_text: str = "Answer the question accurately and concisely:"

    def check(self, cfg: ExperimentConfig) -> None:
        if self.num_virtual_tokens >= cfg.data.max_length:
            raise ValueError(
                f"method.num_virtual_tokens ({self.num_virtual_tokens}) must be smaller than data.max_length "
                f"({cfg.data.max_length})"
            )
        if cfg.train.packing:
            raise ValueError("train.packing does not work with prompt tuning (the virtual tokens lead every example)")
        if cfg.train.fused_linear_cross_entropy:
            raise ValueError("train.fused_linear_cross_entropy does not work with prompt tuning (the virtual tokens)")
        if self.init == "text" and not self.init_text.strip():
            raise ValueError("method.init_text must be non-empty when method.init is 'text'")


class LinearProbeMethodConfig(StrictModel):
    """Linear probe: a linear head on pooled features of a frozen model (``ray_ft.methods.linear_probe``)."""

    name: Literal["linear_probe"] = "linear_probe"
    pooling: Literal["mean", "last"] = "mean"
    """``mean``: average over the text's tokens; ``last``: the hidden state of its last token."""
    layer: Annotated[int, Field(ge=-100_000, le=100_000)] = -1
    """Hidden layer to read: ``-1`` the final, normalised one; ``k`` the output of decoder layer ``k`` (``0``: the
    embeddings). Middle layers often pool better features than the last."""
    feature_batch_size: Size = 16
    """Texts per forward pass of the frozen model."""
    feature_workers: Count | None = None
    """Ray Data actors computing features (each holds one copy of the model); default ``scaling.num_workers``."""

    def check(self, cfg: ExperimentConfig) -> None:
        if cfg.data.format not in ("auto", "classification"):
            raise ValueError(
                f"method 'linear_probe' needs classification data ({{text, label}}); data.format is {cfg.data.format!r}"
            )
        if cfg.train.grad_accum != 1:
            raise ValueError("method 'linear_probe' trains on cached features; train.grad_accum must be 1")
        options = {
            "data.streaming": cfg.data.streaming,
            "train.packing": cfg.train.packing,
            "train.compile": cfg.train.compile,
            "train.fused_linear_cross_entropy": cfg.train.fused_linear_cross_entropy,
        }
        for key, on in options.items():
            if on:
                raise ValueError(f"method 'linear_probe' trains a head on cached features; {key} must be false")


METHOD_CONFIGS: tuple[type[StrictModel], ...] = (
    LoraMethodConfig,
    QLoraMethodConfig,
    PromptTuningMethodConfig,
    LinearProbeMethodConfig,
)
METHOD_NAMES = tuple(c.model_fields["name"].default for c in METHOD_CONFIGS)
MethodConfig = Annotated[
    LoraMethodConfig | QLoraMethodConfig | PromptTuningMethodConfig | LinearProbeMethodConfig,
    Field(discriminator="name"),
]
"""Any tuning method's config; ``name`` selects the class."""


class ExperimentConfig(StrictModel):
    """Everything one training run needs."""

    output_dir: str = "outputs/run"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: MethodConfig = LoraMethodConfig()
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    tune: SearchConfig = SearchConfig()

    @field_validator("method", mode="before")
    @classmethod
    def _method_name(cls, v: Any) -> Any:
        """``name`` defaults to ``lora``; an unknown name is one line listing the known ones."""
        if v is None:
            return {"name": "lora"}
        if isinstance(v, METHOD_CONFIGS):
            return v
        if not isinstance(v, dict):
            raise ValueError("must be a mapping with a 'name'")
        name = v.get("name", "lora")
        if name not in METHOD_NAMES:
            raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHOD_NAMES)}")
        return {**v, "name": name}

    def model_post_init(self, __context: Any) -> None:
        self.method.check(self)
        self._check_kernels()

    def _check_kernels(self) -> None:
        """Refuse GPU-only kernels (``train.attention``, ``train.fused_linear_cross_entropy``) where they cannot run."""
        flash, fused = self.train.attention == "flash_attention_2", self.train.fused_linear_cross_entropy
        for key, on in (("train.attention=flash_attention_2", flash), ("train.fused_linear_cross_entropy", fused)):
            if on and not self.scaling.use_gpu:
                raise ValueError(f"{key} runs on CUDA GPUs only; set scaling.use_gpu=true or turn it off")
        if flash and self.model.dtype == "float32":
            raise ValueError("train.attention=flash_attention_2 computes in bf16/fp16; set model.dtype auto/bfloat16")
        if fused and self.deepspeed.enabled and self.deepspeed.zero_stage == 3:
            raise ValueError(
                "train.fused_linear_cross_entropy reads the output projection's weight directly, which ZeRO-3 "
                "partitions; use deepspeed.zero_stage 0-2 with it"
            )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"override {_short(item)}: expected key=value"])
        parts = key.split(".")
        if len(parts) > MAX_NESTING or not all(parts):
            raise ConfigError([f"override {_short(key)}: expected section.field names separated by single dots"])
        if too_deep_at(raw) is not None:
            raise ConfigError([f"override {_short(key)}: value nested more than {MAX_NESTING} levels deep"])
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        except RecursionError:
            raise ConfigError([f"override {_short(key)}: value nested more than {MAX_NESTING} levels deep"]) from None
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {_short(item)}: {part!r} is not a section"])
        node[parts[-1]] = value
    return tree


def _short(text: str, limit: int = 80) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters (error messages stay one readable line)."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_BOUND_KEYS = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}


def format_validation_error(source: str, err: ValidationError) -> list[str]:
    msgs = []
    for e in err.errors():
        parts = list(e["loc"])
        if parts[:1] == ["method"] and len(parts) > 1 and parts[1] in METHOD_NAMES:
            del parts[1]  # the union's tag: ``method.r``, not ``method.lora.r``
        loc = ".".join(str(p) for p in parts) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] in _BOUNDS:
            msg = f"must be {_BOUNDS[e['type']]} {e['ctx'][_BOUND_KEYS[e['type']]]}"
        elif e["type"] == "finite_number":
            msg = "must be a finite number"
        got = e.get("input")
        detail = "" if e["type"] in ("extra_forbidden", "missing") else f" (got {_short(repr(got), 60)[1:-1]})"
        msgs.append(f"{source}: {loc}: {msg}{detail}")
    return msgs


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader; :func:`_read_yaml` adds the checks PyYAML does not make."""


def _duplicate_key(root: yaml.Node) -> tuple[str, int] | None:
    """``(field, line)`` of the first mapping key that repeats an earlier key of the same mapping (PyYAML keeps the
    last silently), walked iteratively; each node is visited once, so aliases cannot make the walk explode."""
    stack: list[tuple[str, yaml.Node]] = [("", root)]
    visited: set[int] = set()
    while stack:
        path, node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                field = f"{path}.{key.value}" if path else key.value
                if key.value in seen:
                    return field, key.start_mark.line + 1
                seen.add(key.value)
                stack.append((field, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(node.value))
    return None


def _read_yaml(p: Path, source: str) -> Any:
    """Parse a YAML config file, refusing what would crash or mislead later steps: files over
    :data:`MAX_CONFIG_BYTES`, non-UTF-8 bytes, nesting deeper than :data:`ray_ft.text.MAX_NESTING` (PyYAML recurses
    per level), duplicated keys, alias expansions beyond :data:`ray_ft.text.MAX_NODES` values and strings that are
    not valid Unicode text. A UTF-8 byte-order mark is accepted."""
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError([f"{source}: larger than {MAX_CONFIG_BYTES} bytes; not a config file"])
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError([f"{source}:{line}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    deep = too_deep_at(text)
    if deep is not None:
        line = text.count("\n", 0, deep) + 1
        raise ConfigError([f"{source}:{line}: nested more than {MAX_NESTING} levels deep"])
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        duplicate = _duplicate_key(node) if node is not None else None
        if duplicate:
            raise ConfigError([f"{source}:{duplicate[1]}: {duplicate[0]}: duplicated key"])
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"{source}{where}: invalid YAML: {getattr(e, 'problem', e)}"]) from None
    except RecursionError:
        raise ConfigError([f"{source}: nested more than {MAX_NESTING} levels deep"]) from None
    finally:
        loader.dispose()
    return data


def _check_document(data: Any, source: str) -> None:
    problem = check_nesting(data) or find_invalid_text(data)
    if problem:
        raise ConfigError([f"{source}: {problem}"])


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config and apply ``key=value`` overrides.

    Args:
        path: YAML file, or ``None`` for the built-in defaults.
        overrides: ``section.field=value`` strings; they win over the file.

    Raises:
        ConfigError: naming the file and the field for every problem found.
    """
    source = str(path) if path else "<defaults>"
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"{source}: config file not found"])
        data = _read_yaml(p, source) or {}
        _check_document(data, source)
        if not isinstance(data, dict):
            raise ConfigError([f"{source}: top level must be a mapping, got {type(data).__name__}"])
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source = f"{source} (with overrides)"
        _check_document(data, source)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None
    except (ValueError, TypeError) as e:
        raise ConfigError([f"{source}: {e}"]) from None


def save_config(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable by :func:`load_config`).

    The file is written beside ``path`` and renamed over it, so a symlink at ``path`` is replaced, not followed.
    """
    path = Path(path)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)

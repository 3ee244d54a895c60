"""Typed experiment configuration.

A config is a YAML file (see ``jobs/``) plus ``key=value`` overrides from the command line.
Every section is a small pydantic model that forbids unknown keys, so a typo such as
``train.lrr=1e-3`` fails with a message naming the field instead of being ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, SerializeAsAny, ValidationError, field_validator

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class ConfigError(ValueError):
    """A configuration problem, with every message naming the source and the field."""

    def __init__(self, messages: list[str]):
        self.messages = messages
        super().__init__("\n".join(messages))


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    format: Literal["auto", "qa", "io", "chat", "classification"] = "auto"
    template: str = "Human: {question} Assistant: {answer}"
    """Prompt template; must contain ``{question}`` and end with ``{answer}``."""
    use_chat_template: bool = False
    """Render with the tokenizer's chat template instead of ``template``."""
    val_fraction: float = 0.1
    max_length: int = 512
    """Longest sequence kept (longer ones are truncated from the left of the prompt)."""
    dedupe: bool = True
    seed: int = 42
    limit: int | None = None
    """Use a seeded random sample of this many examples (after validation and cleaning), e.g. for quick runs."""
    streaming: bool = False
    """Feed training batches through Ray Data: the records are shuffled and tokenised by Ray Data each epoch and
    streamed to each worker's shard with prefetching, instead of every worker tokenising the whole set up front.
    Micro-batches are length-grouped within windows of 16. A resumed run continues at its step with a fresh pass."""

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        if "{question}" not in v or not v.rstrip().endswith("{answer}"):
            raise ValueError("must contain '{question}' and end with '{answer}'")
        return v

    @field_validator("val_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1)")
        return v


class MethodConfig(StrictModel):
    """Base of every tuning method's config; ``name`` selects the registered method."""

    name: str


class TrainConfig(StrictModel):
    """The optimisation loop."""

    epochs: float = 3.0
    max_steps: int | None = None
    """Optimizer steps; overrides ``epochs`` when set."""
    batch_size: int = 8
    """Micro-batch per worker."""
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 42
    log_every: int = 1
    eval_every: int | None = None
    """Steps between validation passes (and checkpoints); default: once per epoch."""
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False
    packing: bool = False
    """Pack each micro-batch into one row without padding: position ids restart per example and attention
    stays within each example (a block-diagonal causal mask; varlen kernels with flash attention)."""
    compile: bool = False
    """``torch.compile`` the model (inductor, dynamic shapes) through DeepSpeed's ``engine.compile``. The first step
    includes compiling (seconds for a tiny model, about ten minutes for a 135M one on one CPU core; inductor caches
    the result for the next run); it pays off on long runs, mostly on GPU."""

    @field_validator("batch_size", "grad_accum", "log_every", "keep_checkpoints")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("lr", "epochs")
    @classmethod
    def _positive_float(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v


class DeepSpeedConfig(StrictModel):
    enabled: bool = True
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    extra: dict[str, Any] = {}
    """Merged into the generated DeepSpeed config dict (expert escape hatch)."""


class ScalingConfig(StrictModel):
    """Ray resources and storage."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    address: str | None = None
    """Ray cluster address; default ``RAY_ADDRESS`` or a new local Ray."""
    storage_path: str | None = None
    """Where Ray Train persists checkpoints (local dir, NFS, ``s3://``...); default ``OUTPUT_DIR/ray``."""
    max_failures: int = 2


class TrackingConfig(StrictModel):
    tracking_uri: str | None = None
    """MLflow URI; default ``MLFLOW_TRACKING_URI`` or ``sqlite:///<mlflow_dir>/mlflow.db``."""
    mlflow_dir: str = "~/.cache/ray-ft/mlflow"
    experiment: str = "ray-ft"
    registered_model: str | None = "ray-ft-{method}"


class EvalConfig(StrictModel):
    enabled: bool = True
    max_new_tokens: int = 64
    max_examples: int = 64
    """Questions per split to generate for (train and validation)."""
    batch_size: int = 16
    compare_base: bool = True
    show_examples: int = 3


class SearchConfig(StrictModel):
    """Ray Tune search over LoRA hyper-parameters (``ray-ft tune``)."""

    r: list[int] = [4, 8, 16]
    """LoRA ranks to choose from."""
    alpha: list[int] | None = None
    """LoRA alphas to choose from; when set it wins over ``alpha_multiple``."""
    alpha_multiple: list[float] | None = [1.0, 2.0]
    """Alpha as a multiple of the sampled ``r`` (``alpha = round(multiple * r)``)."""
    lr: tuple[float, float] = (1e-4, 2e-3)
    """Learning-rate range ``(low, high)``, sampled log-uniformly; ``low == high`` fixes it."""
    dropout: list[float] | None = None
    """LoRA dropouts to choose from (default: ``method.dropout``)."""
    num_samples: int = 4
    """Trials to run."""
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "fifo"] = "asha"
    """``asha`` stops weak trials early at rungs of ``grace_period * reduction_factor**k`` steps; ``fifo`` runs
    every trial to the end."""
    grace_period: int = 1
    """Steps a trial runs before ASHA may stop it."""
    reduction_factor: int = 2
    search_alg: Literal["random", "optuna"] = "random"
    seed: int | None = None
    """Seed for drawing trials: the same seed draws the same hyper-parameters."""
    max_concurrent_trials: int | None = None
    """Default: as many trials as the cluster's CPUs/GPUs hold at once."""
    max_failures: int = 1
    """Times a crashed trial is restarted (from its last checkpoint) before it counts as failed."""

    @field_validator("r", "alpha")
    @classmethod
    def _positive_ints(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1):
            raise ValueError("must be a non-empty list of values >= 1")
        return v

    @field_validator("alpha_multiple")
    @classmethod
    def _positive_multiples(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or min(v) <= 0):
            raise ValueError("must be a non-empty list of values > 0")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropouts(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or not all(0 <= d < 1 for d in v)):
            raise ValueError("must be a non-empty list of values in [0, 1)")
        return v

    @field_validator("lr")
    @classmethod
    def _lr_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("must be [low, high] with 0 < low <= high")
        return v

    @field_validator("num_samples", "grace_period", "max_concurrent_trials")
    @classmethod
    def _at_least_one(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("reduction_factor")
    @classmethod
    def _reduction(cls, v: int) -> int:
        if v < 2:
            raise ValueError("must be >= 2")
        return v

    @field_validator("max_failures")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v


class ExperimentConfig(StrictModel):
    """Everything one training run needs."""

    output_dir: str = "outputs/run"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: SerializeAsAny[MethodConfig] = None  # type: ignore[assignment]
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    tune: SearchConfig = SearchConfig()

    @field_validator("method", mode="plain")
    @classmethod
    def _method(cls, v: Any) -> MethodConfig:
        from ray_ft.methods import get_method, method_names

        if v is None:
            v = {"name": "lora"}
        if isinstance(v, MethodConfig):
            return v
        if not isinstance(v, dict):
            raise ValueError("must be a mapping with a 'name'")
        name = v.get("name", "lora")
        if name not in method_names():
            raise ValueError(f"unknown method {name!r}; choose one of {method_names()}")
        return get_method(name).config_cls.model_validate({**v, "name": name})

    def model_post_init(self, __context: Any) -> None:
        if self.method is None:
            object.__setattr__(self, "method", self._method(None))
        from ray_ft.methods import get_method

        get_method(self.method.name).check(self)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"override {item!r}: expected key=value"])
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {item!r}: {part!r} is not a section"])
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def format_validation_error(source: str, err: ValidationError) -> list[str]:
    msgs = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != "function-plain[_method()]") or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        detail = "" if e["type"] in ("extra_forbidden", "missing") else f" (got {got!r})"
        msgs.append(f"{source}: {loc}: {msg}{detail}")
    return msgs


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
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError([f"{source}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError([f"{source}{where}: invalid YAML: {getattr(e, 'problem', e)}"]) from None
        if not isinstance(data, dict):
            raise ConfigError([f"{source}: top level must be a mapping, got {type(data).__name__}"])
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source = f"{source} (with overrides)"
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None
    except (ValueError, TypeError) as e:
        raise ConfigError([f"{source}: {e}"]) from None


def save_config(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable by :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")

"""Registry of tuning methods.

A method is one module in this package that defines an object satisfying :class:`TuningMethod` and registers
it with :func:`register_method` where it is defined; its config class is one member of the
``ray_ft.config.MethodConfig`` union. Select one with ``method.name`` in the experiment config.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ray_ft.config import ExperimentConfig

ArtifactKind = Literal["merged", "export"]
"""``merged``: a standalone HF model in ``OUTPUT_DIR/merged``; ``export``: ``OUTPUT_DIR/export``."""
TrainingLoop = Literal["causal_lm", "probe_head"]
"""Which training loop of :mod:`ray_ft.train` trains the method: ``causal_lm`` (next-token loss through DeepSpeed)
or ``probe_head`` (features from the frozen model once, then a classification head)."""


class Classifier(Protocol):
    labels: list[str]

    def predict(self, texts: list[str], batch_size: int = 16) -> list[dict[str, Any]]:
        """``[{"label": str, "probabilities": {label: float}}]``, one per text."""


class TuningMethod(Protocol):
    """One tuning method. Every hook is defined by every method; one that does not apply raises ``ValueError``
    with a line saying what to use instead. Its config class lives in :mod:`ray_ft.config`."""

    name: str
    config_cls: type
    artifact: ArtifactKind
    task: Literal["generation", "classification"]
    loop: TrainingLoop

    def load_for_training(self, cfg: ExperimentConfig, model_dir: str, device: torch.device) -> PreTrainedModel:
        """Load the base model and make only this method's parameters trainable."""

    def save_trainable(self, model: torch.nn.Module, path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
        """Write the trained parameters (adapter, prompt, head) to ``path``."""

    def export(self, cfg: ExperimentConfig, model_dir: str, trained_dir: Path, out_dir: Path) -> None:
        """Turn the trained parameters into the servable artifact in ``out_dir`` (not yet existing)."""

    def load_export(self, export_dir: Path, meta: dict[str, Any]) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
        """The generation model (``forward``/``generate`` like a causal LM) and tokenizer of an ``export`` artifact;
        used by ``ray_ft.inference.Generator.load``. ``merged`` artifacts are plain model directories."""

    def load_classifier(self, model_dir: Path, meta: dict[str, Any]) -> Classifier:
        """The classifier of a ``classification`` artifact, from its directory and ``ray_ft.json`` metadata."""

    def evaluate_run(
        self, cfg: ExperimentConfig, model_dir: str, artifact_dir: Path, train: list[dict], val: list[dict]
    ) -> dict[str, Any]:
        """Base vs tuned: ``{"metrics": {model: {split: {name: value}}}, "predictions": ..., "artifacts": [...]}``;
        ``artifacts`` lists files written into ``output_dir`` (logged to the MLflow run)."""


_REGISTRY: dict[str, TuningMethod] = {}
_BUILTIN = ("lora", "qlora", "prompt_tuning", "linear_probe")


def register_method(method: TuningMethod) -> TuningMethod:
    """Add a method to the registry under ``method.name``."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"tuning method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def _load_builtins() -> None:
    for mod in _BUILTIN:
        if Path(__file__).with_name(f"{mod}.py").exists():
            importlib.import_module(f"ray_ft.methods.{mod}")


def method_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_method(name: str) -> TuningMethod:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(_REGISTRY)}") from None


def not_a_classifier(method: TuningMethod, model_dir: Path | str) -> ValueError:
    """The error ``load_classifier`` raises for a generation method."""
    return ValueError(f"{model_dir}: not a classifier (method {method.name!r}, task {method.task!r}); use generate")


def not_an_export(method: TuningMethod, export_dir: Path | str) -> ValueError:
    """The error ``load_export`` raises for a method whose artifact is not an ``export`` generation model."""
    return ValueError(
        f"{export_dir}: method {method.name!r} writes no generation export (artifact {method.artifact!r})"
    )

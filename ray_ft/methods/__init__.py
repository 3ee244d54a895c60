"""Registry of tuning methods.

A method is one module in this package that defines a config class and an object satisfying
:class:`TuningMethod`, and registers it with :func:`register_method` where it is defined.
Select one with ``method.name`` in the experiment config.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ray_ft.config import ExperimentConfig, MethodConfig
    from ray_ft.train import FitResult

ArtifactKind = Literal["merged", "export"]
"""``merged``: a standalone HF model in ``OUTPUT_DIR/merged``; ``export``: ``OUTPUT_DIR/export``."""


class TuningMethod(Protocol):
    name: str
    config_cls: type[MethodConfig]
    artifact: ArtifactKind
    task: Literal["generation", "classification"]

    def check(self, cfg: ExperimentConfig) -> None:
        """Refuse unsupported combinations up front (raise ``ValueError``)."""

    def load_for_training(self, cfg: ExperimentConfig, model_dir: str, device: torch.device) -> PreTrainedModel:
        """Load the base model and make only this method's parameters trainable."""

    def save_trainable(self, model: torch.nn.Module, path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
        """Write the trained parameters (adapter, prompt, head) to ``path``."""

    def export(self, cfg: ExperimentConfig, model_dir: str, trained_dir: Path, out_dir: Path) -> None:
        """Turn the trained parameters into the servable artifact in ``out_dir`` (not yet existing)."""


# Optional hooks: a method defines these only when it needs them (callers use ``getattr``/``meta``).


class LoadsExport(Protocol):
    """Methods with ``artifact == "export"`` and ``task == "generation"`` (``prompt_tuning``)."""

    def load_export(self, export_dir: Path, meta: dict[str, Any]) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
        """The servable model (``forward``/``generate`` like a causal LM) and tokenizer; used by ``Generator.load``."""


class Classifier(Protocol):
    labels: list[str]

    def predict(self, texts: list[str], batch_size: int = 16) -> list[dict[str, Any]]:
        """``[{"label": str, "probabilities": {label: float}}]``, one per text."""


class LoadsClassifier(Protocol):
    """Methods with ``task == "classification"`` (``linear_probe``)."""

    def load_classifier(self, model_dir: Path, meta: dict[str, Any]) -> Classifier:
        """The served classifier, from the exported directory and its ``ray_ft.json`` metadata."""


class OwnDriver(Protocol):
    """Methods that do not train through ``ray_ft.train.train_fn_per_worker`` (``linear_probe``).

    ``ray_ft.job.run_training`` calls ``fit`` instead of ``ray_ft.train.fit`` and ``evaluate_run`` instead of
    ``ray_ft.evaluate.evaluate_run``; the output layout, MLflow run and atomic export stay the same. A report may
    list files it wrote into ``output_dir`` under ``"artifacts"``; they are logged to the run.
    """

    def fit(
        self,
        cfg: ExperimentConfig,
        model_dir: str,
        train_records: list[dict],
        val_records: list[dict],
        tracking_uri: str | None = None,
        run_id: str | None = None,
    ) -> FitResult:
        """Train; the result's checkpoint holds ``trainable/`` as ``ray_ft.train.fit``'s does."""

    def evaluate_run(
        self, cfg: ExperimentConfig, model_dir: str, artifact_dir: Path, train: list[dict], val: list[dict]
    ) -> dict[str, Any]:
        """``{"metrics": {model: {split: {name: value}}}, "predictions": ..., "artifacts": [file, ...]}``."""


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

"""Registry of tuning methods.

A method is one module in this package that defines a config class and an object satisfying
:class:`TuningMethod`, and registers it with :func:`register_method` where it is defined.
Select one with ``method.name`` in the experiment config.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ray_ft.config import ExperimentConfig, MethodConfig

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

"""What an endpoint serves: the directories given to ``ray-ft serve`` resolved into one serving plan.

- A LoRA or QLoRA training output (``OUTPUT_DIR`` or its ``trainable/``) becomes a LoRA adapter on its base
  model; every adapter of one endpoint must share that base, which is listed too.
- A merged model (``OUTPUT_DIR/merged``) or any Hugging Face causal-LM directory is served as it is.
- Both go to the vLLM engine. A prompt-tuning export (vLLM cannot serve soft prompts) or a classifier
  (``linear_probe``) goes to the transformers engine, one per endpoint.

Every model carries the prompt format it was trained with; chat requests are rendered with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ray_ft.export import ArtifactError, read_metadata

ADAPTER_METHODS = ("lora", "qlora")
TRANSFORMERS_METHODS = ("prompt_tuning", "linear_probe")


@dataclass(frozen=True)
class ServedModel:
    """One id of ``/v1/models``."""

    name: str
    path: str
    """The base/merged model directory, the adapter directory, or the transformers artifact."""
    prompt_format: dict[str, Any] = field(default_factory=dict)
    """``PromptFormat.to_dict()`` of training; empty for a plain model (the default format)."""
    lora_rank: int = 0
    """> 0 for a LoRA adapter."""


@dataclass(frozen=True)
class ServingPlan:
    """The engine and the models of one endpoint."""

    engine: Literal["vllm", "transformers"]
    base: ServedModel
    """The model the engine loads (vLLM) or the artifact (transformers)."""
    adapters: tuple[ServedModel, ...] = ()
    task: Literal["generation", "classification"] = "generation"

    @property
    def models(self) -> tuple[ServedModel, ...]:
        return (self.base, *self.adapters)

    def get(self, name: str | None) -> ServedModel | None:
        if name is None:
            return self.base
        return next((m for m in self.models if m.name == name), None)


def _entry(path: Path) -> tuple[str, Path, dict[str, Any]]:
    """``(kind, directory, metadata)`` with kind ``adapter``, ``vllm`` or ``transformers``."""
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise ArtifactError(f"{path}: not a directory")
    trainable = path / "trainable"
    if (trainable / "ray_ft.json").is_file() and not (path / "config.json").is_file():  # a training OUTPUT_DIR
        meta = read_metadata(trainable)
        if meta.get("method") in ADAPTER_METHODS:
            return "adapter", trainable, meta
        artifact = path / str(meta.get("artifact") or "export")
        if meta.get("method") in TRANSFORMERS_METHODS:
            artifact = path / "export"
        if not artifact.is_dir():
            raise ArtifactError(f"{path}: the run exported no servable artifact (no {artifact.name}/)")
        path = artifact
    meta = read_metadata(path)
    if meta.get("artifact") == "trainable":
        if meta.get("method") in ADAPTER_METHODS:
            return "adapter", path, meta
        raise ArtifactError(f"{path}: {meta.get('method')} weights alone are not servable; serve its export/")
    if meta.get("method") in TRANSFORMERS_METHODS or meta.get("task") == "classification":
        return "transformers", path, meta
    return "vllm", path, meta


def _default_name(path: Path) -> str:
    """A run's directory name (``runs/vi-qa`` for ``runs/vi-qa/trainable`` or ``runs/vi-qa/merged``)."""
    if path.name in ("trainable", "merged", "export"):
        return path.parent.name
    return path.name


def _lora_rank(adapter_dir: Path) -> int:
    import json

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return int(config.get("r") or 8)


def resolve_plan(paths: list[str], names: list[str] | None = None, base_name: str | None = None) -> ServingPlan:
    """Resolve ``ray-ft serve`` inputs into one plan.

    Raises:
        ArtifactError: a directory is not servable, adapters have different bases, a name repeats, or a
            transformers-only artifact is mixed with others.
    """
    entries = [_entry(Path(p)) for p in paths]
    given = names or [None] * len(entries)
    ids = [n or _default_name(d) for n, (_, d, _) in zip(given, entries, strict=True)]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ArtifactError(f"model names must differ; {repeated} repeats (name them with --model-name)")

    transformers = [i for i, (kind, _, _) in enumerate(entries) if kind == "transformers"]
    if transformers:
        if len(entries) > 1:
            raise ArtifactError(
                f"{entries[transformers[0]][1]}: prompt-tuning exports and classifiers are served alone, "
                "one per endpoint"
            )
        _, path, meta = entries[0]
        task = "classification" if meta.get("task") == "classification" else "generation"
        model = ServedModel(ids[0], str(path), meta.get("prompt_format") or {})
        return ServingPlan(engine="transformers", base=model, task=task)

    adapters = [(ids[i], d, m) for i, (kind, d, m) in enumerate(entries) if kind == "adapter"]
    bases = [(ids[i], d, m) for i, (kind, d, m) in enumerate(entries) if kind == "vllm"]
    adapter_bases = {str(Path(m["base_model_dir"]).resolve()) for _, _, m in adapters}
    if len(adapter_bases) > 1:
        raise ArtifactError(f"adapters of one endpoint must share a base model; found {sorted(adapter_bases)}")
    if len(bases) > 1 or (bases and adapters and str(bases[0][1]) not in adapter_bases):
        raise ArtifactError(
            "one endpoint serves one base model (plus its adapters); serve other models from another endpoint"
        )
    if bases:
        name, path, meta = bases[0]
        base = ServedModel(name, str(path), meta.get("prompt_format") or {})
    else:
        base_dir = Path(next(iter(adapter_bases)))
        if not (base_dir / "config.json").is_file():
            raise ArtifactError(f"{base_dir}: the adapters' base model is not there (run `ray-ft models prepare`)")
        base = ServedModel(base_name or base_dir.name, str(base_dir), {})
    if base.name in {n for n, _, _ in adapters}:
        raise ArtifactError(f"model names must differ; {base.name!r} names both the base model and an adapter")
    served = tuple(ServedModel(n, str(d), m.get("prompt_format") or {}, _lora_rank(d)) for n, d, m in adapters)
    return ServingPlan(engine="vllm", base=base, adapters=served)

"""The hooks every generation method shares: methods that train a causal LM to answer (LoRA, QLoRA, prompt tuning).

They are evaluated by generating answers for the base and the tuned model (:func:`ray_ft.evaluate.evaluate_run`)
and they are not classifiers. A method subclasses :class:`GenerationMethod` and defines the remaining hooks of
:class:`ray_ft.methods.TuningMethod` itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from ray_ft.config import ExperimentConfig
from ray_ft.evaluate import evaluate_run
from ray_ft.methods import not_a_classifier


class GenerationMethod:
    task: Literal["generation"] = "generation"
    loop: Literal["causal_lm"] = "causal_lm"

    def load_classifier(self, model_dir: Path, meta: dict[str, Any]):
        raise not_a_classifier(self, model_dir)

    def evaluate_run(
        self, cfg: ExperimentConfig, model_dir: str, artifact_dir: Path, train: list[dict], val: list[dict]
    ) -> dict[str, Any]:
        return evaluate_run(cfg, model_dir, artifact_dir, train, val)

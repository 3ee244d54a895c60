"""What a search leaves to use: the best trial's trained parameters and servable model, the best trials'
LoRA adapters under ``OUTPUT_DIR/top/`` (shaped like training outputs so ``ray-ft serve`` serves them on one
engine), and ``--deploy``, which serves them after the search."""

from __future__ import annotations

import logging
from pathlib import Path

from ray_ft.config import ExperimentConfig
from ray_ft.tune.report import TrialOutcome
from ray_ft.tune.space import trial_config

logger = logging.getLogger(__name__)

TOP_ADAPTERS = 3
"""How many of the best trials' LoRA adapters a search keeps under ``OUTPUT_DIR/top/`` for serving."""


def checkpoint_dir(path: str, storage_root: str) -> str:
    """A local directory holding a checkpoint reported at ``path`` (downloaded when storage is remote)."""
    import pyarrow.fs
    from ray.train import Checkpoint

    from ray_ft.train.checkpointing import local_checkpoint_dir

    fs = None if Path(path).is_dir() else pyarrow.fs.FileSystem.from_uri(storage_root)[0]
    return local_checkpoint_dir(Checkpoint(path, filesystem=fs))


def export_best(
    best_cfg: ExperimentConfig,
    best: TrialOutcome,
    model_dir: str,
    storage_root: str,
    out: Path,
    uri: str,
    fallback_run_id: str,
    labels: dict | None,
) -> str:
    """Export the best trial's checkpoint into ``out`` as a training would (``trainable/`` + the artifact)."""
    from ray_ft.job import export_checkpoint

    return str(
        export_checkpoint(
            best_cfg,
            model_dir,
            checkpoint_dir(best.checkpoint_path, storage_root),
            out,
            uri,
            best.run_id or fallback_run_id,
            labels=labels or None,
            tune_trial_id=best.trial_id,
            hyperparameters=best.hyperparameters,
        )
    )


def export_top_adapters(
    cfg: ExperimentConfig, model_dir: str, ranked: list[TrialOutcome], storage_root: str, out: Path
) -> list[str]:
    """Write the best trials' adapters as ``OUTPUT_DIR/top/top<rank>-<trial>/trainable`` (no merge).

    Each directory is shaped like a training output, so ``ray-ft serve`` serves them together as LoRA adapters
    of one engine, named after their directories.
    """
    import shutil

    from ray_ft.export import write_artifact
    from ray_ft.job import artifact_metadata
    from ray_ft.train import TRAINABLE_DIR

    dirs: list[str] = []
    for rank, trial in enumerate([t for t in ranked if t.checkpoint_path][:TOP_ADAPTERS], start=1):
        source = Path(checkpoint_dir(trial.checkpoint_path, storage_root)) / TRAINABLE_DIR
        meta = artifact_metadata(trial_config(cfg, trial.hyperparameters), model_dir, trial.run_id)
        meta.update(artifact="trainable", tune_trial_id=trial.trial_id, hyperparameters=trial.hyperparameters)
        run_dir = out / "top" / f"top{rank}-{trial.trial_id}"
        write_artifact(run_dir / "trainable", lambda d, src=source: shutil.copytree(src, d, dirs_exist_ok=True), meta)
        dirs.append(str(run_dir))
    return dirs


def deploy(models: list[str], host: str, port: int) -> int:
    """Serve ``models`` as ``ray-ft serve`` does, until SIGINT/SIGTERM (on ``$RAY_ADDRESS`` or a new local Ray)."""
    import ray

    from ray_ft.serving import parse_serve_args, serve

    ray.shutdown()  # the search's Ray connection; serving starts or joins its own
    logger.info("[ray-ft] deploying %s", ", ".join(models))
    return serve(parse_serve_args({"models": models}, source="ray-ft tune --deploy"), host, port)

"""Training on Ray Train (V2) with DeepSpeed.

Modules, each one concern (dependencies run down this list's reverse):

- ``runtime``: ``init_ray`` (the package's only ``ray.init``), a local run's process group, collectives, the CPU
  allocator and memory readings.
- ``optim``: the DeepSpeed config dict, AdamW and the learning-rate schedule.
- ``batching``: the step plan, per-rank micro-batches (in memory or streamed through Ray Data), the packing check.
- ``loss``: next-token loss over answer tokens, the validation pass.
- ``checkpointing``: where checkpoints live, reporting a step with its checkpoint, DeepSpeed save and resume.
- ``progress``: throughput, ETA and recompile reporting for the loop.
- ``inputs``: :class:`WorkerInput`, the typed object each worker receives.
- ``loop``: :func:`train_fn_per_worker`, the causal-LM recipe (setup → loop → ``_loss_step`` → ``validate``).
- ``probe``: the linear probe's features and head loop.
- ``driver``: the ``TorchTrainer`` (:func:`build_trainer`) and running it.
- ``recipes``: :func:`fit`, training a method with the loop it names.
"""

from ray_ft.train.batching import plan_steps
from ray_ft.train.checkpointing import TRAINABLE_DIR, existing_checkpoints, storage_path
from ray_ft.train.driver import FitResult, build_trainer
from ray_ft.train.inputs import WorkerInput
from ray_ft.train.recipes import fit
from ray_ft.train.runtime import init_ray

__all__ = [
    "TRAINABLE_DIR",
    "FitResult",
    "WorkerInput",
    "build_trainer",
    "existing_checkpoints",
    "fit",
    "init_ray",
    "plan_steps",
    "storage_path",
]

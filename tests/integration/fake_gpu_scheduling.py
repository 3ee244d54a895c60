"""Run by test_gpu_scheduling.py in its own process: a real local Ray that declares 2 GPUs this machine does not
have (logical resources only), so GPU scheduling is exercised on CPU.

1. ``ray_ft.train.build_trainer`` for ``scaling.use_gpu=true`` with 2 workers: every worker records the GPU ids
   Ray assigned it, its resources and its placement group's bundles;
2. a Ray Tune search whose trials each run a 1-worker GPU trainer (as ``ray-ft tune`` does), as many at once as
   ``ray_ft.tune.concurrent_trials`` allows on the cluster.

The workers run a probe instead of ray-ft's training loop, and the process group uses gloo instead of nccl (there
is no CUDA here); the scheduling, resources and placement groups are Ray's own. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path


def probe(loop_config: dict) -> None:
    import ray
    import ray.train
    from ray.util import get_current_placement_group

    ctx = ray.train.get_context()
    pg = get_current_placement_group()
    record = {
        "rank": ctx.get_world_rank(),
        "world": ctx.get_world_size(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "assigned": ray.get_runtime_context().get_assigned_resources(),
        "bundles": pg.bundle_specs if pg else None,
        "trial": loop_config.get("trial"),
    }
    out = Path(loop_config["out"]) / f"{loop_config.get('trial') or 'train'}-{record['rank']}.json"
    out.write_text(json.dumps(record))
    ray.train.report({"gpu_ids": record["gpu_ids"]})


def trainer_for(cfg, loop_config: dict, name: str, storage: str):
    from ray_ft.train import build_trainer

    trainer = build_trainer(cfg, loop_config, name=name, storage=storage, train_fn=probe)
    assert trainer.backend_config.backend == "nccl", trainer.backend_config.backend  # what a GPU run would use
    trainer.backend_config.backend = "gloo"  # no CUDA on this machine
    return trainer


def tune_trial(config: dict, out: str, storage: str) -> None:
    import ray.tune

    from ray_ft.config import load_config

    cfg = load_config(None, ["scaling.use_gpu=true", "scaling.num_workers=1", "scaling.cpus_per_worker=0.5"])
    trial = ray.tune.get_context().get_trial_id()
    trainer_for(cfg, {"out": out, "trial": trial}, f"trial_{trial}", storage).fit()
    ray.tune.report({"done": 1})


def main() -> None:
    import ray
    from ray import tune

    from ray_ft.config import load_config
    from ray_ft.tune import DRIVER_CPU, concurrent_trials, trial_resources

    out = Path(sys.argv[1])
    storage = tempfile.mkdtemp(prefix="ray-ft-fake-gpu-")
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False)
    try:
        cfg = load_config(None, ["scaling.use_gpu=true", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5"])
        trainer_for(cfg, {"out": str(out)}, "fake-gpu-train", storage).fit()
        trial_cfg = load_config(None, ["scaling.use_gpu=true", "scaling.num_workers=1", "scaling.cpus_per_worker=0.5"])
        at_once = concurrent_trials(trial_cfg, ray.cluster_resources())
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(tune_trial, out=str(out), storage=storage), {"CPU": DRIVER_CPU}),
            param_space={"x": tune.grid_search([1, 2])},
            tune_config=tune.TuneConfig(max_concurrent_trials=at_once),
            run_config=tune.RunConfig(name="fake-gpu-tune", storage_path=storage),
        )
        grid = tuner.fit()
        print(
            "RESULT "
            + json.dumps(
                {
                    "trial_resources": trial_resources(trial_cfg),
                    "concurrent_trials": at_once,
                    "trial_errors": [str(r.error) for r in grid if r.error],
                    "cluster": ray.cluster_resources(),
                }
            ),
            flush=True,
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    main()

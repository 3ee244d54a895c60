"""What ASHA early stopping saves: the same seeded trials searched with and without it.

Runs ``ray-ft tune``'s search twice on the same data and model with the same ``tune.seed`` (so both
searches draw the same r/alpha/lr points): once with ``tune.scheduler=asha`` and once with ``fifo``
(every trial runs to the end). Prints, for each, the optimizer steps the trials actually ran, the
best validation loss and the wall time, then the ratios.

    .venv/bin/python bench/asha_savings.py                       # tiny random model, built in a temp dir
    .venv/bin/python bench/asha_savings.py --model embedded:smollm2-135m-instruct \\
        --data ray_ft/datasets/vi_ai_qa.jsonl --trials 4 --steps 12
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tiny_model_and_data(root: Path) -> tuple[str, str]:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import QA_ROWS, build_tiny_model_dir, write_jsonl

    return str(build_tiny_model_dir(root / "tiny")), str(write_jsonl(root / "qa.jsonl", QA_ROWS))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model.name_or_path (default: a tiny random Llama)")
    p.add_argument("--data", default=None, help="data.path (default: the tiny Q&A rows with --model unset)")
    p.add_argument("--trials", type=int, default=6, help="tune.num_samples")
    p.add_argument("--steps", type=int, default=8, help="train.max_steps per trial")
    p.add_argument("--seed", type=int, default=7, help="tune.seed: both searches draw the same trials")
    p.add_argument("--concurrency", type=int, default=2, help="tune.max_concurrent_trials")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray started here")
    p.add_argument("overrides", nargs="*", help="more section.field=value overrides for jobs/tune_lora.yaml")
    args = p.parse_args()

    import ray

    from ray_ft.config import load_config
    from ray_ft.tune import EARLY_STOPPED, print_summary, run_search

    root = Path(tempfile.mkdtemp(prefix="ray-ft-asha-"))
    if args.model is None:
        model, data = _tiny_model_and_data(root)
        data = args.data or data
        sizing = ["data.val_fraction=0.25", "train.batch_size=2", "tune.lr=[1.0e-5,1.0e-1]"]
    else:
        model, data = args.model, args.data or "ray_ft/datasets/vi_ai_qa.jsonl"
        sizing = []
    ray.init(num_cpus=args.num_cpus, log_to_driver=True)
    results = {}
    for scheduler in ("asha", "fifo"):
        cfg = load_config(
            REPO / "jobs/tune_lora.yaml",
            [
                f"model.name_or_path={model}",
                f"data.path={data}",
                f"output_dir={root / scheduler}",
                f"tracking.mlflow_dir={root / 'mlflow'}",
                "tracking.registered_model=null",
                f"train.max_steps={args.steps}",
                "train.eval_every=1",
                f"tune.num_samples={args.trials}",
                f"tune.seed={args.seed}",
                f"tune.scheduler={scheduler}",
                "tune.grace_period=1",
                f"tune.max_concurrent_trials={args.concurrency}",
                *sizing,
                *args.overrides,
            ],
        )
        print(f"\n========== {scheduler} ==========", flush=True)
        results[scheduler] = run_search(cfg)
        print_summary(results[scheduler], cfg.tune.metric)
    ray.shutdown()

    asha, fifo = results["asha"], results["fifo"]
    points = {name: sorted(tuple(t.hyperparameters.values()) for t in s.trials) for name, s in results.items()}
    print("\n========== ASHA vs FIFO (same seeded trials) ==========")
    same = points["asha"] == points["fifo"]
    print(f"same sampled trials:      {same} ({len(asha.trials)} trials of {args.steps} steps)")
    print(f"{'':26}{'ASHA':>12}{'FIFO':>12}{'ratio':>10}")
    rows = [
        ("trial-steps run", asha.trial_steps, fifo.trial_steps),
        ("trial-steps reported", sum(t.steps for t in asha.trials), sum(t.steps for t in fifo.trials)),
        ("wall s", asha.wall_s, fifo.wall_s),
    ]
    for label, a, f in rows:
        print(f"{label:26}{a:>12.0f}{f:>12.0f}{a / max(f, 1e-9):>10.2f}")
    best_a = asha.best.metrics["val_loss"] if asha.best else float("nan")
    best_f = fifo.best.metrics["val_loss"] if fifo.best else float("nan")
    print(f"{'best val_loss':26}{best_a:>12.4f}{best_f:>12.4f}{best_a / best_f:>10.4f}")
    print(f"trials stopped early:     {asha.count(EARLY_STOPPED)} of {len(asha.trials)}")
    same_best = asha.best and fifo.best and asha.best.hyperparameters == fifo.best.hyperparameters
    print(f"same best trial:          {bool(same_best)}")
    print(f"outputs:                  {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

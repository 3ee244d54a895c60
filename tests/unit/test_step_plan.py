"""Small training sets still get enough optimizer steps, in every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import QA_ROWS, write_jsonl

from ray_ft.config import load_config
from ray_ft.train.batching import fit_batch_to_data, plan_steps

REPO = Path(__file__).resolve().parents[2]
ROWS = [*QA_ROWS, *({"question": f"Câu hỏi {i}?", "answer": f"Đáp án {i}."} for i in range(8))]


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "jobs").glob("*.yaml")))
@pytest.mark.parametrize("n_train", [16, 200, 5000])
def test_every_shipped_config_plans_enough_steps(config, n_train):
    cfg = load_config(REPO / "jobs" / config)
    fitted, line = fit_batch_to_data(cfg, n_train)
    world = max(1, fitted.scaling.num_workers)
    _, total = plan_steps(fitted, n_train, world)
    if cfg.train.max_steps is None:
        smallest = plan_steps(
            cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 1, "grad_accum": 1})}),
            n_train,
            world,
        )[1]
        assert total >= min(cfg.train.min_steps, smallest)
    assert (line is None) == (fitted is cfg)
    assert fitted.train.batch_size <= cfg.train.batch_size


def test_qlora_on_16_pairs_shrinks_its_batch_and_says_why(tmp_path, capsys):
    from ray_ft.job import load_training_data

    data = write_jsonl(tmp_path / "small.jsonl", ROWS)
    cfg = load_config(REPO / "jobs/qlora.yaml", [f"data.path={data}", "data.val_fraction=0", f"output_dir={tmp_path}"])
    assert plan_steps(cfg, 16, cfg.scaling.num_workers) == (1, 6)  # the configured global batch of 16
    fitted, data_ = load_training_data(cfg)
    assert (fitted.train.batch_size, fitted.data.streaming, len(data_.train)) == (1, False, 16)
    assert plan_steps(fitted, 16, 2) == (8, 48)
    printed = capsys.readouterr().out
    assert "data read in memory:" in printed
    assert "16 training examples: the configured global batch of 16" in printed and "48 steps" in printed
    unchanged, line = fit_batch_to_data(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"min_steps": None})}), 16
    )
    assert line is None and unchanged.train.batch_size == 8

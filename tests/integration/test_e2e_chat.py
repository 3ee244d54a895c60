"""Multi-turn chat on the embedded model: facts stated only in an EARLIER assistant turn are learned.

Every conversation states a made-up fact in its first answer and ends with small talk, so a run that took the
loss on the last answer only (the former behaviour) would never see the facts as targets. The model has a chat
template (ChatML), so the run renders the conversations with it, and generation and serving render prompts the
same way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_jsonl

from ray_ft.config import load_config
from ray_ft.job import run_training

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[2]
FACTS = {
    "Mã dự án Sao Biển là gì?": "KX-47.",
    "Ai phụ trách cụm máy Hoa Sen?": "Chị Lan Vy.",
    "Phòng lab Mây Xanh ở tầng mấy?": "Tầng 19.",
    "Mô hình Cá Voi có bao nhiêu lớp?": "88 lớp.",
}
KEYS = ["KX-47", "Lan Vy", "19", "88"]


def test_facts_in_earlier_assistant_turns_are_learned(ray_local, tmp_path, capsys):
    from ray_ft.inference import Generator
    from ray_ft.serving.api import _chat_template
    from ray_ft.serving.catalog import resolve_plan

    rows = [
        {
            "messages": [
                {"role": "system", "content": "Trả lời ngắn gọn."},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
                {"role": "user", "content": "Cảm ơn bạn."},
                {"role": "assistant", "content": "Không có gì."},
            ]
        }
        for q, a in FACTS.items()
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "chat"
    overrides = {
        "data.path": data,
        "data.val_fraction": 0,
        "output_dir": out,
        "tracking.mlflow_dir": tmp_path / "mlflow",
        "scaling.num_workers": 0,
        "train.max_steps": 30,
        "train.batch_size": 2,
        "train.lr": 5e-3,
        "train.warmup_ratio": 0,
        "eval.enabled": "false",
    }
    summary = run_training(load_config(REPO / "jobs/lora.yaml", [f"{k}={v}" for k, v in overrides.items()]))
    assert summary.metrics["step"] == 30
    assert "[ray-ft] prompts: the model's chat template (chat records, and the model has a chat template)" in (
        capsys.readouterr().out
    )

    gen = Generator.load(out / "merged")
    system = {"role": "system", "content": "Trả lời ngắn gọn."}
    prompts = [[system, {"role": "user", "content": q}] for q in FACTS]
    assert gen.fmt.use_chat_template
    rendered = gen.tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, tokenize=False)
    assert (
        rendered.startswith("<|im_start|>system") and gen.fmt.render_conversation(prompts[0], gen.tokenizer) == rendered
    )
    served = {m.name: m for m in resolve_plan([str(out)]).models}["chat"]  # the adapter, beside its base
    assert _chat_template(served, gen.tokenizer) is None  # vLLM renders chats with the model's own template
    answers = gen.answer(prompts, max_new_tokens=16)
    hits = [key in answer for key, answer in zip(KEYS, answers, strict=True)]
    assert sum(hits) >= 3, list(zip(FACTS, answers, strict=True))

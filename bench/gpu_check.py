"""GPU check: the whole GPU matrix in one command, one table, and a machine-readable last line.

Rows (random-weight models of real shapes, no downloads; one Ray runtime for the whole matrix):

1. ``seed`` vs ``lora`` on the Bloom-560m shape and the shipped Vietnamese Q&A set: the seed tutorial's recipe
   (Hugging Face ``Trainer`` + PEFT LoRA r=8, every example padded to 512, batch 2 x accumulation 8, gradient
   checkpointing, fp32; ``bench/train_throughput.py``'s ``run_seed``) against ray-ft LoRA through Ray Train +
   DeepSpeed ZeRO-2 (bf16 on a GPU). ``seed_ratio`` = ray-ft samples/s / seed samples/s.
2. ``packed``: ray-ft LoRA with ``train.packing=true`` on the Llama-3.2-1B shape, every micro-batch packed into one
   2048-token row (8 examples of 256 tokens). Tokens/s and MFU. MFU counts 4·N FLOPs per token (N = all
   parameters): full fine-tuning costs 6·N (2·N forward, 2·N for the activation gradients, 2·N for the weight
   gradients); LoRA freezes the base weights, so their weight gradients are never computed, leaving ~4·N (the
   adapters' own FLOPs are under 1% at r=16). Attention's sequence-length term is left out, and the answer-only
   vocabulary projection skips prompt positions, so the figure is slightly generous.
3. ``bare``: the same ray-ft loop as row 1 without Ray Train (local mode, one process) vs one Ray Train worker:
   ``overhead`` = 1 - (one-worker tokens/s) / (bare tokens/s).
4. ``qlora``: row 2 with ``method.name=qlora`` (4-bit NF4 base): ``qlora_mem_ratio`` = peak accelerator memory of
   QLoRA / LoRA (on CPU the peaks are process RSS, so the ratio means little there).
5. ``generate``: the transformers generation path (``ray_ft.inference.Generator``, used by ``ray-ft generate``,
   evaluation and prompt-tuning serving) on the Llama-1B shape; the check fails unless the model sits on the
   device ``ray_ft.device.select_device`` picks (the GPU when there is one). Prints generated tokens/s.

DeepSpeed gets ray-ft's torch ``AdamW`` (fused on CUDA) through ``deepspeed.initialize``; the check fails if
the DeepSpeed config would make DeepSpeed build its own fused Adam.

``--smoke`` runs every row with tiny shapes on CPU through the same code (about a minute on 2 cores).
The last line: ``gpu_check ok=<0|1> seed_ratio=<x> tokens_per_s=<t> mfu=<m> overhead=<o> qlora_mem_ratio=<q>
generate_tokens_per_s=<g> device=<cuda|cpu>``.

Usage::

    python bench/gpu_check.py            # on a GPU machine, under 8 minutes on one H100
    python bench/gpu_check.py --smoke    # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent

SHAPES = {
    "bloom-560m": {"model_type": "bloom", "hidden_size": 1024, "n_layer": 24, "n_head": 16, "vocab_size": 250880},
    "llama-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 4096,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
    },
    "tiny-bloom": {"model_type": "bloom", "hidden_size": 64, "n_layer": 2, "n_head": 4},
    "tiny-llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    },
}
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 peak by device-name fragment (first match wins; H100 SXM/NVL and H200 share 989)."""


def _settings(smoke: bool) -> dict:
    if smoke:
        return {
            "bloom": "tiny-bloom",
            "llama": "tiny-llama",
            "seed_steps": 2,
            "steps": 3,
            "row_examples": 4,
            "example_tokens": 32,
            "new_tokens": 8,
            "vocab": 512,
        }
    return {
        "bloom": "bloom-560m",
        "llama": "llama-1b",
        "seed_steps": 8,
        "steps": 20,
        "row_examples": 8,
        "example_tokens": 256,
        "new_tokens": 64,
        "vocab": 8000,
    }


# --------------------------------------------------------------------------- inputs


def build_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained in-process on the shipped data sets (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for name in ("vi_ai_qa.jsonl", "en_ai_qa.jsonl"):
        for line in (REPO / "ray_ft/datasets" / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts.append(f"Human: {row['question']} Assistant: {row['answer']}")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)


def build_model(shape: str, tokenizer_dir: Path, out: Path) -> dict:
    """A random-weight model of ``shape`` (bf16 on a GPU) with the tokenizer beside it; returns its facts."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ray_ft.device import select_device

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = dict(SHAPES[shape])
    spec.setdefault("vocab_size", len(tok))
    config = AutoConfig.for_model(
        spec.pop("model_type"), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **spec
    )
    placement = select_device(dtype="auto", training=True)
    torch.manual_seed(0)
    with torch.device(placement.device):
        model = AutoModelForCausalLM.from_config(config, dtype=placement.dtype)
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    facts = {"params": sum(p.numel() for p in model.parameters()), "device_name": _device_name()}
    del model
    _release_memory()
    return facts


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_long_records(path: Path, tokenizer_dir: Path, example_tokens: int, n: int) -> None:
    """``n`` Q&A records whose prompt and answer are each longer than ``example_tokens``: encoded with
    ``data.max_length=example_tokens`` every example is exactly that long (half answer, half prompt)."""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = [ln for ln in (REPO / "ray_ft/datasets/vi_ai_qa.jsonl").read_text(encoding="utf-8").split() if ln.isalpha()]
    rng = random.Random(0)

    def text() -> str:
        out = ""
        while len(tok(out)["input_ids"]) <= example_tokens:
            out += " " + " ".join(rng.choice(words) for _ in range(example_tokens))
        return out.strip()

    rows = [{"question": f"Câu hỏi {i}: {text()}", "answer": text()} for i in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# --------------------------------------------------------------------------- rows run in this process


def _release_memory() -> None:
    """Free what the previous row left (cached GPU blocks) and restart the GPU peak-memory count."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def generate_row(model_dir: str, new_tokens: int, gpu: bool) -> dict:
    import torch

    from ray_ft.device import select_device
    from ray_ft.inference import Generator

    expected = select_device()
    gen = Generator.load(model_dir)
    if gen.device.type != expected.device.type or (gpu and gen.device.type != "cuda"):
        raise AssertionError(f"Generator placed the model on {gen.device}; select_device chose {expected.device}")
    questions = [f"Câu hỏi số {i}: mô hình ngôn ngữ học gì?" for i in range(8)]
    gen.answer(questions[:2], max_new_tokens=4)  # warm-up
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = gen.complete(gen.prompts(questions), max_new_tokens=new_tokens, batch_size=len(questions))
    if gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tokens = sum(r["completion_tokens"] for r in out)
    result = {
        "device": str(gen.device),
        "dtype": str(next(gen.model.parameters()).dtype).removeprefix("torch."),
        "tokens_per_s": tokens / elapsed,
        "tokens": tokens,
    }
    del gen
    _release_memory()
    return result


# --------------------------------------------------------------------------- driver


def check_optimizer(extra: list[str]) -> str:
    """The DeepSpeed config ray-ft builds must leave the optimizer to torch (no DeepSpeed fused Adam)."""
    from ray_ft.config import load_config
    from ray_ft.train.optim import deepspeed_config

    cfg = load_config(REPO / "jobs/lora.yaml", extra)
    ds = deepspeed_config(cfg, world_size=1, bf16=True)
    if "optimizer" in ds:
        raise AssertionError(f"the DeepSpeed config names an optimizer ({ds['optimizer']}); DeepSpeed would build it")
    return "torch AdamW (fused on CUDA) handed to deepspeed.initialize"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, every row through the same code")
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak for MFU (default: by name)")
    p.add_argument("--workdir", default=None, help="where the random models and data go (default: a temp dir)")
    args = p.parse_args()
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(BENCH))
    import ray
    import torch
    from train_throughput import run_ray_ft, run_seed

    from ray_ft.device import select_device

    s = _settings(args.smoke)
    placement = select_device(prefer_gpu=not args.smoke)
    gpu = placement.on_gpu
    if not args.smoke and not gpu:
        print("gpu_check: no CUDA GPU visible; run with --smoke on CPU", file=sys.stderr)
        return 2
    n_gpus = torch.cuda.device_count() if gpu else 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ray-ft-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    # One Ray runtime for the whole matrix; on CPU more logical CPUs than cores (driver + worker + tasks).
    ray.init(num_cpus=max(4, os.cpu_count() or 1), num_gpus=n_gpus, log_to_driver=True)
    rows: dict[str, dict] = {}
    notes: list[str] = []
    try:
        tok_dir = work / "tokenizer"
        build_tokenizer(tok_dir, s["vocab"])
        facts = {}
        for key in ("bloom", "llama"):
            shape = s[key]
            facts[key] = build_model(shape, tok_dir, work / shape)
            print(f"[gpu_check] {shape}: {facts[key]['params'] / 1e6:.1f}M parameters", flush=True)
        device_name = facts["llama"]["device_name"]
        qa = str(REPO / "ray_ft/datasets/vi_ai_qa.jsonl")
        long_data = work / "long.jsonl"
        write_long_records(long_data, tok_dir, s["example_tokens"], s["row_examples"] * (s["steps"] + 2))
        notes.append(check_optimizer([]))
        bloom, llama = str(work / s["bloom"]), str(work / s["llama"])
        common = ["deepspeed.zero_stage=2", "train.batch_size=8"]

        def timed(name: str, fn):
            t0 = time.time()
            print(f"[gpu_check] {name} ...", flush=True)
            rows[name] = {**fn(), "wall_s": time.time() - t0}
            _release_memory()
            print(f"[gpu_check] {name}: {rows[name]['useful_tokens_per_s']:.1f} tokens/s", flush=True)

        # 1. the seed recipe vs ray-ft LoRA; 3. the same loop without Ray Train
        timed("seed", lambda: run_seed(bloom, qa, s["seed_steps"], gpu))
        timed("lora", lambda: run_ray_ft(bloom, qa, s["steps"], gpu, 1, common))
        timed("bare", lambda: run_ray_ft(bloom, qa, s["steps"], gpu, 0, common))
        # 2. packing on the Llama-1B shape; 4. QLoRA on the same shape and rows
        packed = [
            f"train.batch_size={s['row_examples']}",
            f"data.max_length={s['example_tokens']}",
            "train.packing=true",
            "deepspeed.zero_stage=2",
        ]
        timed("packed", lambda: run_ray_ft(llama, str(long_data), s["steps"], gpu, 1, packed))
        timed("qlora", lambda: run_ray_ft(llama, str(long_data), s["steps"], gpu, 1, [*packed, "method.name=qlora"]))
        if not gpu:
            notes.append("qlora: bitsandbytes' CPU 4-bit kernels (fp32 compute); peak memory is process RSS here")
        # 5. the transformers generation path
        t0 = time.time()
        print("[gpu_check] generate ...", flush=True)
        gen = generate_row(llama, s["new_tokens"], gpu)
        gen["wall_s"] = time.time() - t0
    finally:
        ray.shutdown()

    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
    n_llama = facts["llama"]["params"]
    mfu = 4 * n_llama * rows["packed"]["useful_tokens_per_s"] / (peak * 1e12) if peak and gpu else None
    seed_ratio = rows["lora"]["samples_per_s"] / rows["seed"]["samples_per_s"]
    overhead = 1 - rows["lora"]["useful_tokens_per_s"] / rows["bare"]["useful_tokens_per_s"]
    qlora_mem = rows["qlora"]["peak_mem_mb"] / rows["packed"]["peak_mem_mb"]

    print(
        f"\ngpu check on {device_name} ({'smoke: tiny shapes, CPU' if args.smoke else 'GPU'}), "
        f"{s['steps']} steps per ray-ft row, wall {time.time() - t_start:.0f}s"
    )
    print(f"{'row':<9} {'shape':<11} {'samples/s':>10} {'tokens/s':>10} {'peak MB':>9} {'wall s':>7}  what")
    what = {
        "seed": "HF Trainer, pad 512, bs 2x8, grad ckpt, fp32, LoRA r=8",
        "lora": f"ray-ft LoRA, Ray Train 1 worker + ZeRO-2, {placement.describe() if gpu else 'cpu fp32'}",
        "bare": "the same ray-ft loop, no Ray Train (local mode)",
        "packed": f"ray-ft LoRA, packing, {s['row_examples'] * s['example_tokens']}-token rows",
        "qlora": "as packed, 4-bit NF4 base (QLoRA)",
    }
    shapes = {"seed": s["bloom"], "lora": s["bloom"], "bare": s["bloom"], "packed": s["llama"], "qlora": s["llama"]}
    for name, r in rows.items():
        print(
            f"{name:<9} {shapes[name]:<11} {r['samples_per_s']:>10.2f} {r['useful_tokens_per_s']:>10.1f} "
            f"{r['peak_mem_mb']:>9.0f} {r['wall_s']:>7.0f}  {what[name]}"
        )
    print(
        f"{'generate':<9} {s['llama']:<11} {'':>10} {gen['tokens_per_s']:>10.1f} {'':>9} {gen['wall_s']:>7.0f}  "
        f"Generator on {gen['device']} {gen['dtype']}, {gen['tokens']} new tokens, batch 8"
    )
    print(f"seed_ratio (samples/s ray-ft LoRA / seed recipe): {seed_ratio:.2f}x")
    print(f"Ray Train overhead (one worker vs the bare loop): {overhead:.1%}")
    mfu_text = f"{mfu:.1%} of {peak:.0f} TFLOP/s" if mfu is not None else "n/a (no GPU peak)"
    print(f"packed LoRA MFU (4·N·tokens, N={n_llama / 1e9:.3f}B): {mfu_text}")
    print(f"QLoRA / LoRA peak memory: {qlora_mem:.2f}")
    for note in notes:
        print(f"note: {note}")
    print(
        f"gpu_check ok=1 seed_ratio={seed_ratio:.3f} tokens_per_s={rows['packed']['useful_tokens_per_s']:.1f} "
        f"mfu={'nan' if mfu is None else f'{mfu:.4f}'} overhead={overhead:.4f} qlora_mem_ratio={qlora_mem:.3f} "
        f"generate_tokens_per_s={gen['tokens_per_s']:.1f} device={'cuda' if gpu else 'cpu'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

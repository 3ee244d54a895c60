"""Training throughput, measured side by side in one run on one model shape and one dataset.

1. ``seed``: the seed tutorial's recipe — Hugging Face ``Trainer`` + PEFT LoRA (r=8, alpha=32), every example
   padded to 512 tokens, batch 2 x gradient accumulation 8, gradient checkpointing, fp32;
2. ``hf``: Hugging Face ``Trainer`` + PEFT given ray-ft's data handling and settings (same encoded examples in
   ray-ft's own length-grouped global batches, dynamic padding, LoRA config) in one process — the fair baseline;
3. ``ray``: ray-ft's LoRA path through the full Ray Train + DeepSpeed stack (``scaling.num_workers`` workers);
4. ``ray1`` + ``bare``: one Ray Train worker vs the same ray-ft step loop without Ray (local mode, one
   process), which isolates Ray's own overhead.

Each variant runs in its own process (clean peak memory). Throughput is steady state: the first optimizer step
is excluded. MFU uses the 6·N·tokens convention (N = all parameters, frozen ones included, useful tokens only);
pass ``--peak-tflops`` for the device (H100 SXM bf16 dense: 989) — on CPU it is printed only when given.
The last line is machine-readable: ``speedup_vs_seed_recipe=<x> ray_overhead=<y>``.

Usage::

    python bench/train_throughput.py --shape embedded --steps 4
    python bench/train_throughput.py --shape bloom-560m --steps 20 --gpu --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "bloom-560m": {"model_type": "bloom", "hidden_size": 1024, "n_layer": 24, "n_head": 16},
    "llama-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
    },
}
SEED_TARGETS = {"bloom": ["query_key_value"], "llama": ["q_proj", "v_proj"]}


def prepare_model(shape: str, workdir: Path) -> str:
    """The embedded model, or a random-weight model of a named shape (with the embedded tokenizer)."""
    sys.path.insert(0, str(REPO))
    from ray_ft.config import ModelConfig
    from ray_ft.models import load_tokenizer, resolve_model_dir

    embedded = resolve_model_dir(ModelConfig())
    if shape == "embedded":
        return embedded
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = load_tokenizer(embedded)
    spec = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), **spec)
    out = workdir / shape
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


def _time_hf_trainer(model, rows, collator, steps: int, gpu: bool, batch: int, accum: int) -> dict:
    """Run HF ``Trainer`` for ``steps`` optimizer steps over ``rows`` in the given order.

    Steady state: from the end of the first step to the end of the last, counting exactly the examples and
    non-pad tokens those steps trained on.
    """
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if gpu:
                torch.cuda.synchronize()
            ends.append(time.time())

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum,
            max_steps=steps,
            learning_rate=2e-4,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=not gpu,
            dataloader_num_workers=0,
            disable_tqdm=True,
            train_sampling_strategy="sequential",
            remove_unused_columns=False,
        )
        Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Clock()]).train()
    per_step = batch * accum
    steady = [rows[i % len(rows)] for i in range(per_step, per_step * len(ends))]
    elapsed = ends[-1] - ends[0]
    tokens = sum(sum(r["attention_mask"]) if "attention_mask" in r else len(r["input_ids"]) for r in steady)
    return {"samples_per_s": len(steady) / elapsed, "useful_tokens_per_s": tokens / elapsed}


def run_seed(model_dir: str, data: str, steps: int, gpu: bool) -> dict:
    """The seed tutorial: pad to 512, batch 2 x accumulation 8, gradient checkpointing, fp32, r=8, shuffled."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling

    from ray_ft.data import read_jsonl
    from ray_ft.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    records = read_jsonl(data).records
    random.Random(0).shuffle(records)
    texts = [f"Human: {r['question']} Assistant: {r['answer']}" for r in records]
    enc = tok(texts, padding="max_length", truncation=True, max_length=512)
    rows = [{"input_ids": i, "attention_mask": m} for i, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    targets = SEED_TARGETS.get(model.config.model_type, "all-linear")
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM")
    )
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    return {**_time_hf_trainer(model, rows, collator, steps, gpu, batch=2, accum=8), "peak_mem_mb": _peak_mb(gpu)}


def run_hf(model_dir: str, data: str, steps: int, gpu: bool, workers: int, extra: list[str]) -> dict:
    """HF ``Trainer`` + PEFT given ray-ft's own data and settings: the same encoded examples in the same
    length-grouped global batches (dynamic padding, answer-only loss), the same LoRA config, one process
    using every core."""
    import torch
    from peft import get_peft_model

    from ray_ft.config import load_config
    from ray_ft.data import PromptFormat, encode_generation, read_jsonl
    from ray_ft.methods.lora import lora_config
    from ray_ft.models import load_base_for_training, load_tokenizer
    from ray_ft.tensors import collate
    from ray_ft.train.batching import Batches

    cfg = load_config(REPO / "jobs/lora.yaml", [f"model.name_or_path={model_dir}", f"data.path={data}", *extra])
    tok = load_tokenizer(model_dir)
    fmt = PromptFormat.from_config(cfg.data)
    encoded = [encode_generation(r, tok, fmt, cfg.data.max_length) for r in read_jsonl(data).records]
    world = max(workers, 1)
    batch = cfg.train.batch_size * world
    # ray-ft's own first-epoch global batches: step k trains on the same examples in both runs.
    order = Batches(encoded, cfg.train.batch_size, 0, world, cfg.train.seed, tok.pad_token_id, False).global_batches(0)
    rows = [encoded[i] for group in order for i in group]
    base = load_base_for_training(cfg, model_dir, torch.device("cuda" if gpu else "cpu"))
    model = get_peft_model(base, lora_config(cfg.method, base))
    timed = _time_hf_trainer(model, rows, lambda b: collate(b, tok.pad_token_id), steps, gpu, batch=batch, accum=1)
    return {**timed, "peak_mem_mb": _peak_mb(gpu)}


def run_ray_ft(model_dir: str, data: str, steps: int, gpu: bool, workers: int, extra: list[str]) -> dict:
    from ray_ft.config import load_config
    from ray_ft.data import read_jsonl
    from ray_ft.methods import get_method
    from ray_ft.train import fit

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            REPO / "jobs/lora.yaml",
            [
                f"model.name_or_path={model_dir}",
                f"data.path={data}",
                f"output_dir={tmp}/run",
                f"train.max_steps={steps}",
                f"train.eval_every={steps}",
                "data.val_fraction=0.0",
                f"scaling.num_workers={workers}",
                f"scaling.use_gpu={str(gpu).lower()}",
                f"scaling.cpus_per_worker={1 if gpu else max(1, (os.cpu_count() or 1) // max(workers, 1))}",
                "tracking.registered_model=null",
                *extra,
            ],
        )
        records = read_jsonl(data).records
        result = fit(cfg, get_method(cfg.method.name), model_dir, records, [])
    m = result.metrics
    return {
        "samples_per_s": m["steady_samples_per_s"],
        "useful_tokens_per_s": m["steady_tokens_per_s"],
        "peak_mem_mb": m["peak_mem_mb"],
    }


def _peak_mb(gpu: bool) -> float:
    import resource

    if gpu:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_run(runs: list[dict]) -> dict:
    """The run with the median useful tokens/s (its own samples/s, memory and wall time)."""
    return sorted(runs, key=lambda r: r["useful_tokens_per_s"])[(len(runs) - 1) // 2]


def _param_count(model_dir: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="embedded", choices=["embedded", *SHAPES])
    p.add_argument("--data", default=str(REPO / "ray_ft/datasets/vi_ai_qa.jsonl"))
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per variant (the first is warm-up)")
    p.add_argument(
        "--seed-steps", type=int, default=None, help="steps for the seed recipe (default --steps; its steps are long)"
    )
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: GPUs, or 2 on CPU)")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    p.add_argument("--variants", default="seed,hf,ray,bare")
    p.add_argument(
        "--repeat", type=int, default=1, help="run the variants this many times, interleaved; report medians"
    )
    p.add_argument("--ray-ft-args", nargs="*", default=[], help="extra key=value overrides for the ray-ft runs")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    sys.path.insert(0, str(REPO))

    if args.variant:  # child process: one variant, JSON on the last line
        workers = {"seed": 0, "hf": 0, "ray": args.workers, "ray1": 1, "bare": 0}[args.variant]
        if args.variant == "seed":
            out = run_seed(args.model_dir, args.data, args.steps, args.gpu)
        elif args.variant == "hf":
            out = run_hf(args.model_dir, args.data, args.steps, args.gpu, args.workers, args.ray_ft_args)
        else:
            out = run_ray_ft(args.model_dir, args.data, args.steps, args.gpu, workers, args.ray_ft_args)
        print("RESULT " + json.dumps(out))
        return

    if args.workers is None:
        import torch

        args.workers = torch.cuda.device_count() if args.gpu else 2
    workdir = Path(tempfile.mkdtemp(prefix="ray-ft-bench-"))
    model_dir = prepare_model(args.shape, workdir)
    n_params = _param_count(model_dir)
    runs: dict[str, list[dict]] = {}
    variants = args.variants.split(",")
    if args.workers != 1 and "bare" in variants and "ray1" not in variants:
        variants.insert(variants.index("bare"), "ray1")
    for variant in [v for _ in range(args.repeat) for v in variants]:
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--model-dir",
            model_dir,
            "--data",
            args.data,
            "--steps",
            str(args.seed_steps or args.steps if variant == "seed" else args.steps),
            "--workers",
            str(args.workers),
            *(["--gpu"] if args.gpu else []),
            "--ray-ft-args",
            *args.ray_ft_args,
        ]
        print(f"[bench] {variant}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"[bench] {variant} failed (exit {proc.returncode})")
        runs.setdefault(variant, []).append({**json.loads(lines[-1][7:]), "wall_s": time.time() - t0})
        print(f"[bench] {variant}: {runs[variant][-1]['useful_tokens_per_s']:.1f} useful tokens/s", flush=True)
    results = {name: _median_run(rs) for name, rs in runs.items()}

    print(
        f"\nmodel shape {args.shape} ({n_params / 1e6:.0f}M parameters), {args.steps} steps per variant, "
        f"{'GPU' if args.gpu else 'CPU'}, ray workers {args.workers}"
        + (f", median of {args.repeat} interleaved runs" if args.repeat > 1 else "")
    )
    print(f"{'variant':<8} {'samples/s':>10} {'tokens/s':>10} {'MFU':>7} {'peak MB':>9} {'wall s':>7}")
    for name, r in results.items():
        mfu = 6 * n_params * r["useful_tokens_per_s"] / (args.peak_tflops * 1e12) if args.peak_tflops else None
        mfu_s = f"{mfu:.1%}" if mfu is not None else "n/a"
        print(
            f"{name:<8} {r['samples_per_s']:>10.2f} {r['useful_tokens_per_s']:>10.1f} {mfu_s:>7} "
            f"{r['peak_mem_mb']:>9.0f} {r['wall_s']:>7.0f}"
        )
    speedup = (
        results["ray"]["samples_per_s"] / results["seed"]["samples_per_s"]
        if {"ray", "seed"} <= set(results)
        else float("nan")
    )
    # Ray's own overhead: one Ray Train worker vs the same loop in one process without Ray.
    one = "ray" if args.workers == 1 else "ray1"
    overhead = (
        1 - results[one]["useful_tokens_per_s"] / results["bare"]["useful_tokens_per_s"]
        if {one, "bare"} <= set(results)
        else float("nan")
    )
    if {"ray", "seed"} <= set(results):
        tok_ratio = results["ray"]["useful_tokens_per_s"] / results["seed"]["useful_tokens_per_s"]
        print(f"useful tokens/s ray-ft / seed recipe: {tok_ratio:.2f}x")
    if {"ray", "hf"} <= set(results):
        hf_ratio = results["ray"]["useful_tokens_per_s"] / results["hf"]["useful_tokens_per_s"]
        print(f"useful tokens/s ray-ft / HF Trainer with the same data and padding: {hf_ratio:.2f}x")
    print(f"speedup_vs_seed_recipe={speedup:.2f} ray_overhead={overhead:.3f}")


if __name__ == "__main__":
    main()

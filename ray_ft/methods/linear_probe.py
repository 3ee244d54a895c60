"""Linear probe: a linear classifier on pooled hidden states of a frozen model (feature-based tuning).

Use it for text classification (``{"text", "label"}`` data) when a quick, cheap, hard-to-overfit baseline is
wanted, or when the backbone must stay shared and untouched: it trains ``hidden_size × labels`` numbers.

It is fast because the backbone runs exactly once per text: features are computed by a pool of Ray Data
actors (``map_batches`` over the frozen model, ``method.feature_workers`` of them), then the head trains on the
cached features in a Ray Train ``TorchTrainer`` run (plain DDP over gloo/NCCL; DeepSpeed has nothing to shard
in a linear layer, so ``deepspeed.*`` is not used by this method). Features are standardised with the training
set's mean and standard deviation, which are stored with the head.

The artifact is ``OUTPUT_DIR/export/``: ``head.safetensors`` (weights and the standardisation), ``probe.json``
(labels, pooling, layer), the tokenizer, and the base model reference in ``ray_ft.json``. Load it with
``get_method("linear_probe").load_classifier(dir, meta)``; ``ray-ft classify DIR TEXT...`` prints predictions.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field

from ray_ft.config import Count, ExperimentConfig, MethodConfig, Size
from ray_ft.data import clean_text
from ray_ft.device import select_device
from ray_ft.methods import register_method
from ray_ft.models import load_causal_lm, load_tokenizer, torch_dtype

HEAD_FILE = "head.safetensors"
PROBE_FILE = "probe.json"
CONFUSION_PNG = "confusion_matrix.png"


class LinearProbeMethodConfig(MethodConfig):
    name: Literal["linear_probe"] = "linear_probe"
    pooling: Literal["mean", "last"] = "mean"
    """``mean``: average over the text's tokens; ``last``: the hidden state of its last token."""
    layer: Annotated[int, Field(ge=-100_000, le=100_000)] = -1
    """Hidden layer to read: ``-1`` the final, normalised one; ``k`` the output of decoder layer ``k`` (``0``: the
    embeddings). Middle layers often pool better features than the last."""
    feature_batch_size: Size = 16
    """Texts per forward pass of the frozen model."""
    feature_workers: Count | None = None
    """Ray Data actors computing features (each holds one copy of the model); default ``scaling.num_workers``."""


# --------------------------------------------------------------------------- features


@torch.inference_mode()
def pooled_features(
    model, tokenizer, texts: list[str], pooling: str, layer: int, max_length: int
) -> tuple[torch.Tensor, int]:
    """``(features [len(texts), hidden_size] fp32, tokens read)`` for one batch of texts.

    Right padding with causal attention leaves each text's hidden states exactly as if it were alone.
    """
    tokenizer.padding_side = "right"
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    device = next(model.parameters()).device
    mask = enc["attention_mask"].to(device)
    out = model.base_model(input_ids=enc["input_ids"].to(device), attention_mask=mask, output_hidden_states=layer != -1)
    hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        features = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    else:
        features = hidden[torch.arange(hidden.shape[0], device=device), mask.sum(1) - 1]
    return features.float().cpu(), int(mask.sum())


def load_backbone(
    model_dir: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, allow_pickle: bool = False
):
    """The frozen base model, in eval mode."""
    model = load_causal_lm(model_dir, dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    model.requires_grad_(False)
    return model.eval()


def check_layer(cfg: ExperimentConfig, model_dir: str) -> None:
    """Refuse a ``method.layer`` the model does not have (before any actor starts)."""
    from transformers import AutoConfig

    depth = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code).num_hidden_layers
    if not -1 <= cfg.method.layer <= depth:
        raise ValueError(
            f"method.layer: {cfg.method.layer} is not a layer of {model_dir} ({depth} decoder layers: use -1 "
            f"for the final one, or 0..{depth})"
        )


class FeatureExtractor:
    """Ray Data actor: loads the frozen model once, then pools features for each batch of texts."""

    def __init__(
        self,
        model_dir: str,
        pooling: str,
        layer: int,
        max_length: int,
        dtype: str,
        threads: int,
        trust_remote_code: bool,
        allow_pickle: bool,
    ):
        torch.set_num_threads(threads)
        device = select_device(dtype=dtype).device
        self.model = load_backbone(model_dir, getattr(torch, dtype), trust_remote_code, allow_pickle).to(device)
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code)
        self.pooling, self.layer, self.max_length = pooling, layer, max_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features, tokens = pooled_features(
            self.model, self.tokenizer, [str(t) for t in batch["text"]], self.pooling, self.layer, self.max_length
        )
        n = len(batch["idx"])
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            "idx": batch["idx"],
            "features": features.numpy(),
            "tokens": np.full(n, tokens / n),
            "peak_rss_mb": np.full(n, peak_mb),
        }


def extract_features(cfg: ExperimentConfig, model_dir: str, texts: list[str]) -> tuple[np.ndarray, dict[str, float]]:
    """Features of ``texts`` (in order) from a pool of Ray Data actors; also tokens/s and the actors' peak RSS."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    workers = cfg.method.feature_workers or cfg.scaling.num_workers
    # Similar lengths in a batch mean little padding; the index restores the caller's order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    items = [{"idx": i, "text": texts[i]} for i in order]
    dtype = torch_dtype(cfg.model, cfg.scaling.use_gpu)
    t0 = time.time()
    rows = (
        ray.data.from_items(items, override_num_blocks=max(1, min(len(items), workers * 4)))
        .map_batches(
            FeatureExtractor,
            fn_constructor_kwargs={
                "model_dir": model_dir,
                "pooling": cfg.method.pooling,
                "layer": cfg.method.layer,
                "max_length": cfg.data.max_length,
                "dtype": str(dtype).removeprefix("torch."),
                "threads": max(1, int(cfg.scaling.cpus_per_worker)),
                "trust_remote_code": cfg.model.trust_remote_code,
                "allow_pickle": cfg.model.allow_pickle,
            },
            batch_size=cfg.method.feature_batch_size,
            concurrency=workers,
            num_cpus=cfg.scaling.cpus_per_worker,
            num_gpus=1 if cfg.scaling.use_gpu else 0,
        )
        .take_all()
    )
    elapsed = time.time() - t0
    rows.sort(key=lambda r: r["idx"])
    features = np.stack([r["features"] for r in rows]).astype(np.float32)
    tokens = float(sum(r["tokens"] for r in rows))
    stats = {
        "feature_s": elapsed,
        "feature_tokens": tokens,
        "tokens_per_s": tokens / max(elapsed, 1e-9),
        "peak_rss_mb": max(float(r["peak_rss_mb"]) for r in rows),
    }
    return features, stats


# --------------------------------------------------------------------------- head


class ProbeHead(torch.nn.Module):
    """Standardise the features (fixed training-set statistics), then one linear layer to label logits.

    ``info`` (labels, pooling, layer, max_length, hidden_size) travels with the head into ``probe.json``.
    """

    def __init__(self, hidden_size: int, num_labels: int, info: dict[str, Any] | None = None):
        super().__init__()
        self.info = info or {}
        self.register_buffer("feature_mean", torch.zeros(hidden_size))
        self.register_buffer("feature_std", torch.ones(hidden_size))
        self.linear = torch.nn.Linear(hidden_size, num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.feature_mean) / self.feature_std)


def save_head(head: ProbeHead, path: Path) -> None:
    """``head.safetensors`` + ``probe.json`` (``head.info``) into ``path``."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(path / HEAD_FILE))
    (path / PROBE_FILE).write_text(json.dumps(head.info, indent=1, ensure_ascii=False))


def load_head(path: Path) -> ProbeHead:
    from safetensors.torch import load_file

    info = json.loads((Path(path) / PROBE_FILE).read_text())
    head = ProbeHead(info["hidden_size"], len(info["labels"]), info)
    head.load_state_dict(load_file(str(Path(path) / HEAD_FILE)))
    return head.eval()


def train_head_per_worker(loop_config: dict[str, Any]) -> None:
    """The head's training loop on every Ray Train worker (DDP; each rank takes its share of every batch)."""
    import ray.train
    import ray.train.torch

    from ray_ft.tracking import StepLogger
    from ray_ft.train import (
        STATE_FILE,
        TRAINABLE_DIR,
        _all_reduce,
        lr_lambda,
        plan_steps,
        quiet_report_log,
        report_checkpoint,
    )

    cfg = ExperimentConfig.model_validate(loop_config["config"])
    quiet_report_log()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)
    info = loop_config["probe_info"]
    x_train = torch.tensor(np.asarray(loop_config["train_features"]), dtype=torch.float32)
    y_train = torch.tensor(loop_config["train_label_ids"], dtype=torch.long)
    x_val = torch.tensor(np.asarray(loop_config["val_features"]), dtype=torch.float32).reshape(-1, x_train.shape[1])
    y_val = torch.tensor(loop_config["val_label_ids"], dtype=torch.long)

    head = ProbeHead(x_train.shape[1], len(info["labels"]), info)
    head.feature_mean.copy_(x_train.mean(0))
    head.feature_std.copy_(x_train.std(0, unbiased=False).clamp(min=1e-6))
    model = ray.train.torch.prepare_model(head)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    steps_per_epoch, total_steps = plan_steps(cfg, len(x_train), world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            head.load_state_dict(load_head(Path(d) / TRAINABLE_DIR).state_dict())
            state = torch.load(Path(d) / "optimizer.pt", weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_step = int(json.loads((Path(d) / STATE_FILE).read_text())["step"])
        if rank == 0:
            print(f"[ray-ft] resumed the probe head from step {start_step}/{total_steps}", flush=True)

    logger = StepLogger(loop_config.get("tracking_uri"), loop_config.get("run_id")) if rank == 0 else None
    if logger is not None:
        logger.log({"trainable_params": sum(p.numel() for p in head.parameters())}, step=start_step)
    global_batch = cfg.train.batch_size * world
    eval_every = cfg.train.eval_every or steps_per_epoch
    loss_fn = torch.nn.CrossEntropyLoss()
    order: torch.Tensor | None = None
    for step in range(start_step, total_steps):
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0 or order is None:
            # One shuffle per epoch, padded by wrapping so every rank gets a full share of every batch.
            perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(cfg.train.seed + epoch))
            order = perm.repeat(math.ceil(steps_per_epoch * global_batch / len(perm)))
        batch = order[i * global_batch : (i + 1) * global_batch][rank::world]
        model.train()
        loss = loss_fn(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        (loss_mean,) = _all_reduce([loss.item()])
        done = step + 1
        metrics: dict[str, Any] = {
            "step": done,
            "epoch": done / steps_per_epoch,
            "loss": loss_mean / world,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
        }
        is_eval = done % eval_every == 0 or done == total_steps
        if is_eval:
            head.eval()
            with torch.no_grad():
                metrics["train_accuracy"] = float((head(x_train).argmax(1) == y_train).float().mean())
                if len(x_val):
                    val_logits = head(x_val)
                    metrics["val_loss"] = float(loss_fn(val_logits, y_val))
                    metrics["val_accuracy"] = float((val_logits.argmax(1) == y_val).float().mean())
        if rank == 0 and (is_eval or done % cfg.train.log_every == 0):
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("step", "epoch"))
            print(f"[ray-ft] step {done}/{total_steps} epoch {metrics['epoch']:.2f} {shown}", flush=True)
            logger.log({k: v for k, v in metrics.items() if k != "step"}, step=done)
        if is_eval:

            def write(out: Path, done: int = done) -> None:
                save_head(head, out / TRAINABLE_DIR)
                torch.save(
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, out / "optimizer.pt"
                )
                (out / STATE_FILE).write_text(json.dumps({"step": done}))

            report_checkpoint(cfg, metrics, done, write, has_checkpoint=rank == 0)
        elif done % cfg.train.log_every == 0:
            ray.train.report(metrics)


# --------------------------------------------------------------------------- serving side


@dataclass
class ProbeClassifier:
    """The exported probe: frozen backbone + head. ``predict(texts)`` → ``[{"label", "probabilities"}]``."""

    backbone: Any
    tokenizer: Any
    head: ProbeHead

    @property
    def info(self) -> dict[str, Any]:
        return self.head.info

    @property
    def labels(self) -> list[str]:
        return list(self.info["labels"])

    @torch.inference_mode()
    def predict(self, texts: list[str], batch_size: int = 16) -> list[dict[str, Any]]:
        """Label and per-label probabilities for each text (texts are cleaned as training data was)."""
        cleaned = [clean_text(t) for t in texts]
        results: list[dict[str, Any]] = []
        for i in range(0, len(cleaned), batch_size):
            features, _ = pooled_features(
                self.backbone,
                self.tokenizer,
                cleaned[i : i + batch_size],
                self.info["pooling"],
                self.info["layer"],
                self.info["max_length"],
            )
            probabilities = torch.softmax(self.head(features), dim=-1)
            for row in probabilities:
                scores = {label: float(p) for label, p in zip(self.labels, row, strict=True)}
                results.append({"label": self.labels[int(row.argmax())], "probabilities": scores})
        return results


# --------------------------------------------------------------------------- the method


class LinearProbeMethod:
    name = "linear_probe"
    config_cls = LinearProbeMethodConfig
    artifact = "export"
    task = "classification"

    def check(self, cfg: ExperimentConfig) -> None:
        if cfg.data.format not in ("auto", "classification"):
            raise ValueError(
                f"method 'linear_probe' needs classification data ({{text, label}}); data.format is {cfg.data.format!r}"
            )
        if cfg.train.grad_accum != 1:
            raise ValueError("method 'linear_probe' trains on cached features; train.grad_accum must be 1")
        options = {
            "data.streaming": cfg.data.streaming,
            "train.packing": cfg.train.packing,
            "train.compile": cfg.train.compile,
            "train.fused_linear_cross_entropy": cfg.train.fused_linear_cross_entropy,
        }
        for key, on in options.items():
            if on:
                raise ValueError(f"method 'linear_probe' trains a head on cached features; {key} must be false")

    def load_for_training(self, cfg: ExperimentConfig, model_dir: str, device: torch.device):
        """The frozen backbone (nothing in it trains; the head is built on its features)."""
        return load_backbone(
            model_dir,
            torch_dtype(cfg.model, device.type == "cuda"),
            cfg.model.trust_remote_code,
            cfg.model.allow_pickle,
        ).to(device)

    def save_trainable(self, model: ProbeHead, path: Path, tokenizer=None) -> None:
        save_head(model, path)

    def fit(
        self,
        cfg: ExperimentConfig,
        model_dir: str,
        train_records: list[dict],
        val_records: list[dict],
        tracking_uri: str | None = None,
        run_id: str | None = None,
    ):
        """Features once (Ray Data actors), then the head (Ray Train); returns ``ray_ft.train.FitResult``."""
        from ray_ft.tracking import StepLogger
        from ray_ft.train import fit, init_ray

        check_layer(cfg, model_dir)
        init_ray(cfg)
        labels = sorted({str(r["label"]) for r in [*train_records, *val_records]})
        label_id = {label: i for i, label in enumerate(labels)}
        texts = [r["text"] for r in [*train_records, *val_records]]
        workers = cfg.method.feature_workers or cfg.scaling.num_workers
        if cfg.deepspeed.enabled:
            print(
                "[ray-ft] linear_probe: the head trains with plain DDP; deepspeed.* settings are not used", flush=True
            )
        print(
            f"[ray-ft] features: {len(texts)} texts through the frozen model on {workers} Ray Data actor(s), "
            f"{cfg.method.pooling} pooling, layer {cfg.method.layer}",
            flush=True,
        )
        t0 = time.time()
        features, stats = extract_features(cfg, model_dir, texts)
        print(
            f"[ray-ft] features: {features.shape[0]}×{features.shape[1]} in {stats['feature_s']:.1f}s "
            f"({stats['tokens_per_s']:.0f} tokens/s, actor peak RSS {stats['peak_rss_mb']:.0f} MB)",
            flush=True,
        )
        StepLogger(tracking_uri, run_id).log(stats, step=0)
        n_train = len(train_records)
        info = {
            "labels": labels,
            "pooling": cfg.method.pooling,
            "layer": cfg.method.layer,
            "max_length": cfg.data.max_length,
            "hidden_size": int(features.shape[1]),
        }
        result = fit(
            cfg,
            model_dir,
            train_records,
            val_records,
            tracking_uri=tracking_uri,
            run_id=run_id,
            train_fn=train_head_per_worker,
            extra_loop_config={
                "probe_info": info,
                "train_features": features[:n_train],
                "train_label_ids": [label_id[str(r["label"])] for r in train_records],
                "val_features": features[n_train:],
                "val_label_ids": [label_id[str(r["label"])] for r in val_records],
            },
        )
        result.metrics = {
            **result.metrics,
            **stats,
            "peak_mem_mb": max(stats["peak_rss_mb"], result.metrics.get("peak_mem_mb", 0.0)),
        }
        result.wall_s = time.time() - t0
        return result

    def export(self, cfg: ExperimentConfig, model_dir: str, trained_dir: Path, out_dir: Path) -> None:
        for name in (HEAD_FILE, PROBE_FILE):
            shutil.copy2(Path(trained_dir) / name, out_dir / name)
        load_tokenizer(model_dir, cfg.model.trust_remote_code).save_pretrained(out_dir)

    def load_classifier(self, model_dir: str | Path, meta: dict[str, Any]) -> ProbeClassifier:
        """The classifier served from an exported directory (backbone from the base model reference)."""
        from ray_ft.methods.prompt_tuning import base_model_dir

        head = load_head(Path(model_dir))
        placement = select_device()  # the backbone on the GPU when there is one; features come back to the CPU head
        backbone = load_backbone(base_model_dir(meta), placement.dtype).to(placement.device)
        return ProbeClassifier(backbone=backbone, tokenizer=load_tokenizer(str(model_dir)), head=head)

    def evaluate_run(
        self, cfg: ExperimentConfig, model_dir: str, artifact_dir: Path, train: list[dict], val: list[dict]
    ) -> dict[str, Any]:
        """Tuned (the exported classifier) vs base (always the most frequent training label), per split."""
        from ray_ft.evaluate import classification_metrics, evaluate_classification, plot_confusion_matrix
        from ray_ft.export import read_metadata

        classifier = self.load_classifier(artifact_dir, read_metadata(artifact_dir))
        labels = classifier.labels
        counts = {label: sum(str(r["label"]) == label for r in train) for label in labels}
        majority = max(labels, key=lambda label: counts[label])
        n = cfg.eval.max_examples
        metrics: dict[str, dict[str, Any]] = {"base": {}, "tuned": {}}
        predictions: dict[str, Any] = {"tuned": {}}
        for split_name, records in {"train": train[:n], "validation": val[:n]}.items():
            if not records:
                continue
            print(f"[ray-ft] evaluating the probe on {len(records)} {split_name} texts", flush=True)
            references = [str(r["label"]) for r in records]
            metrics["base"][split_name] = classification_metrics([majority] * len(records), references, labels)
            tuned = evaluate_classification(classifier, records, labels, batch_size=cfg.eval.batch_size)
            predictions["tuned"][split_name] = tuned.pop("predictions")
            metrics["tuned"][split_name] = tuned
        shown = "validation" if "validation" in metrics["tuned"] else "train"
        plot_confusion_matrix(
            metrics["tuned"][shown]["confusion_matrix"],
            labels,
            Path(cfg.output_dir) / CONFUSION_PNG,
            title=f"linear probe, {shown}",
        )
        report = {"metrics": metrics, "predictions": predictions, "artifacts": [CONFUSION_PNG]}
        print(format_classification_report(report, cfg.eval.show_examples), flush=True)
        return report


def format_classification_report(report: dict[str, Any], show_examples: int = 3) -> str:
    lines = ["", f"{'model':<8} {'split':<11} {'accuracy':>9} {'macro_f1':>9} {'n':>5}"]
    for model, splits in report["metrics"].items():
        for split_name, m in splits.items():
            lines.append(f"{model:<8} {split_name:<11} {m['accuracy']:>9.3f} {m['macro_f1']:>9.3f} {m['n']:>5}")
    for split_name, rows in report["predictions"].get("tuned", {}).items():
        for ex in rows[:show_examples]:
            lines.append(
                f"  [{split_name}] {ex['text'][:70]!r}: {ex['reference']} → {ex['prediction']} (p={ex['p']:.2f})"
            )
        break
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def cmd_classify(args: argparse.Namespace) -> int:
    from ray_ft.export import read_metadata
    from ray_ft.methods import get_method

    meta = read_metadata(args.model_dir)
    if meta.get("task") != "classification":
        raise ValueError(
            f"{args.model_dir}: not a classifier (task {meta.get('task', 'generation')!r}); use `ray-ft generate`"
        )
    classifier = get_method(meta["method"]).load_classifier(Path(args.model_dir), meta)
    for text, result in zip(args.texts, classifier.predict(args.texts), strict=True):
        print(json.dumps({"text": text, **result}, ensure_ascii=False))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("classify", help="label texts with a trained classifier (linear probe); JSON lines")
    p.add_argument("model_dir", help="an exported classifier (OUTPUT_DIR/export)")
    p.add_argument("texts", nargs="+")
    p.set_defaults(func=cmd_classify)


register_method(LinearProbeMethod())

"""Linear probe: a linear classifier on pooled hidden states of a frozen model (feature-based tuning).

Use it for text classification (``{"text", "label"}`` data) when a quick, cheap, hard-to-overfit baseline is
wanted, or when the backbone must stay shared and untouched: it trains ``hidden_size × labels`` numbers.

It is fast because the backbone runs exactly once per text: features are computed by a pool of Ray Data
actors (``map_batches`` over the frozen model, ``method.feature_workers`` of them), then the head trains on the
cached features in a Ray Train ``TorchTrainer`` run (:mod:`ray_ft.train.probe`; plain DDP over gloo/NCCL;
DeepSpeed has nothing to shard in a linear layer, so ``deepspeed.*`` is not used by this method). Features are
standardised with the training set's mean and standard deviation, which are stored with the head.

The artifact is ``OUTPUT_DIR/export/``: ``head.safetensors`` (weights and the standardisation), ``probe.json``
(labels, pooling, layer), the tokenizer, and the base model reference in ``ray_ft.json``. Load it with
``get_method("linear_probe").load_classifier(dir, meta)``; ``ray-ft classify DIR TEXT...`` prints predictions.
Its config is :class:`ray_ft.config.LinearProbeMethodConfig`.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ray_ft.config import ExperimentConfig, LinearProbeMethodConfig
from ray_ft.data import clean_text
from ray_ft.device import select_device
from ray_ft.evaluate import classification_metrics, evaluate_classification, plot_confusion_matrix
from ray_ft.export import read_metadata
from ray_ft.methods import not_an_export, register_method
from ray_ft.models import base_model_dir, load_causal_lm, load_tokenizer, torch_dtype

logger = logging.getLogger(__name__)

HEAD_FILE = "head.safetensors"
PROBE_FILE = "probe.json"
CONFUSION_PNG = "confusion_matrix.png"


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
    loop = "probe_head"

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

    def export(self, cfg: ExperimentConfig, model_dir: str, trained_dir: Path, out_dir: Path) -> None:
        for name in (HEAD_FILE, PROBE_FILE):
            shutil.copy2(Path(trained_dir) / name, out_dir / name)
        load_tokenizer(model_dir, cfg.model.trust_remote_code).save_pretrained(out_dir)

    def load_export(self, export_dir: Path, meta: dict[str, Any]):
        raise not_an_export(self, export_dir)

    def load_classifier(self, model_dir: str | Path, meta: dict[str, Any]) -> ProbeClassifier:
        """The classifier served from an exported directory (backbone from the base model reference)."""
        head = load_head(Path(model_dir))
        placement = select_device()  # the backbone on the GPU when there is one; features come back to the CPU head
        backbone = load_backbone(base_model_dir(meta), placement.dtype).to(placement.device)
        return ProbeClassifier(backbone=backbone, tokenizer=load_tokenizer(str(model_dir)), head=head)

    def evaluate_run(
        self, cfg: ExperimentConfig, model_dir: str, artifact_dir: Path, train: list[dict], val: list[dict]
    ) -> dict[str, Any]:
        """Tuned (the exported classifier) vs base (always the most frequent training label), per split."""
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
            logger.info("[ray-ft] evaluating the probe on %d %s texts", len(records), split_name)
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
        logger.info("%s", format_classification_report(report, cfg.eval.show_examples))
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


register_method(LinearProbeMethod())

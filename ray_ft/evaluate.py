"""Metrics, base vs tuned: answer loss/perplexity, ROUGE-L and exact match for generation; accuracy,
macro-F1 and a confusion matrix for classification."""

from __future__ import annotations

import logging
import math
import re
import unicodedata
import warnings
from typing import Any

import torch

from ray_ft import logs
from ray_ft.chat import IGNORE_INDEX
from ray_ft.data import PromptFormat, answer_of, context_of, encode_generation, question_of
from ray_ft.tensors import collate

logger = logging.getLogger(__name__)


class _WhitespaceTokenizer:
    """ROUGE tokeniser that keeps non-ASCII words (rouge-score's default drops Vietnamese letters)."""

    def tokenize(self, text: str) -> list[str]:
        return normalize_answer(text).split()


def normalize_answer(text: str) -> str:
    text = unicodedata.normalize("NFC", text).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def rouge_l(predictions: list[str], references: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer())
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / max(len(scores), 1)


def exact_match(predictions: list[str], references: list[str]) -> float:
    hits = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)]
    return sum(hits) / max(len(hits), 1)


@torch.inference_mode()
def answer_loss(
    model, tokenizer, records: list[dict], fmt: PromptFormat, max_length: int = 512, batch_size: int = 16
) -> float:
    """Mean cross-entropy over answer tokens (teacher forcing)."""
    device = next(model.parameters()).device
    encoded = [encode_generation(r, tokenizer, fmt, max_length) for r in records]
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = collate(encoded[i : i + batch_size], tokenizer.pad_token_id)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits.float()
        labels = batch["labels"][:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += loss.item()
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def evaluate_generation(
    generator, records: list[dict], *, max_new_tokens: int = 64, batch_size: int = 16, max_length: int = 512
) -> dict[str, Any]:
    """Metrics for one model on one split, plus the predictions."""
    questions = [question_of(r) for r in records]
    references = [answer_of(r) for r in records]
    # Each prompt is the whole conversation before the answer (earlier turns too), rendered as in training.
    contexts = [context_of(r) for r in records]
    predictions = generator.answer(contexts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    loss = answer_loss(generator.model, generator.tokenizer, records, generator.fmt, max_length, batch_size)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "rouge_l": rouge_l(predictions, references),
        "exact_match": exact_match(predictions, references),
        "n": len(records),
        "predictions": [
            {"question": q, "reference": r, "prediction": p}
            for q, r, p in zip(questions, references, predictions, strict=True)
        ],
    }


def evaluate_run(cfg, model_dir: str, artifact_dir, train: list[dict], val: list[dict]) -> dict[str, Any]:
    """Base vs tuned on training and validation questions; logs a table and a few examples."""
    from ray_ft.data import PromptFormat
    from ray_ft.inference import Generator

    logs.configure()
    n = cfg.eval.max_examples
    splits = {"train": train[:n], "validation": val[:n]}
    # Generator.load places each model with ray_ft.device.select_device: on the GPU when the driver has one.
    models = {"tuned": Generator.load(artifact_dir)}
    if cfg.eval.compare_base:
        base = Generator.load(
            model_dir, trust_remote_code=cfg.model.trust_remote_code, allow_pickle=cfg.model.allow_pickle
        )
        base.fmt = PromptFormat.from_config(cfg.data)
        models = {"base": base, **models}
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    for name, gen in models.items():
        metrics[name] = {}
        for split_name, records in splits.items():
            if not records:
                continue
            logger.info("[ray-ft] evaluating %s on %s %s questions (%s)", name, len(records), split_name, gen.device)
            metrics[name][split_name] = evaluate_generation(
                gen,
                records,
                max_new_tokens=cfg.eval.max_new_tokens,
                batch_size=cfg.eval.batch_size,
                max_length=cfg.data.max_length,
            )
    predictions = {m: {s: v.pop("predictions") for s, v in splits_.items()} for m, splits_ in metrics.items()}
    report = {"metrics": metrics, "predictions": predictions}
    logger.info("%s", format_report(report, cfg.eval.show_examples))
    return report


def format_report(report: dict[str, Any], show_examples: int = 3) -> str:
    lines = ["", f"{'model':<8} {'split':<11} {'loss':>7} {'ppl':>9} {'rouge_l':>8} {'exact':>6}"]
    for model, splits in report["metrics"].items():
        for split_name, m in splits.items():
            lines.append(
                f"{model:<8} {split_name:<11} {m['loss']:>7.3f} {m['perplexity']:>9.2f} "
                f"{m['rouge_l']:>8.3f} {m['exact_match']:>6.2f}"
            )
    preds = report["predictions"]
    tuned = preds.get("tuned", {}).get("train", [])
    base = preds.get("base", {}).get("train", [])
    for i, ex in enumerate(tuned[:show_examples]):
        lines += ["", f"Q: {ex['question']}", f"  reference: {ex['reference']}"]
        if i < len(base):
            lines.append(f"  base:      {base[i]['prediction']}")
        lines.append(f"  tuned:     {ex['prediction']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- classification


def classification_metrics(predictions: list[str], references: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and the confusion matrix (rows: reference, columns: prediction).

    Macro-F1 averages the per-label F1 over every label that occurs in ``references`` or ``predictions`` (as
    scikit-learn does); ``labels`` orders the confusion matrix and may list labels that occur in neither.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    order = list(labels) + sorted({*references, *predictions} - set(labels))
    n = len(references)
    if n == 0:
        return {
            "accuracy": 0.0,
            "macro_f1": 0.0,
            "n": 0,
            "labels": order,
            "confusion_matrix": [[0] * len(order) for _ in order],
        }
    with warnings.catch_warnings():  # a one-label matrix is the right shape here: ``labels`` gives the order
        warnings.filterwarnings("ignore", "A single label was found", UserWarning)
        matrix = confusion_matrix(references, predictions, labels=order)
    return {
        "accuracy": float(accuracy_score(references, predictions)),
        "macro_f1": float(
            f1_score(
                references, predictions, labels=sorted({*references, *predictions}), average="macro", zero_division=0.0
            )
        ),
        "n": n,
        "labels": order,
        "confusion_matrix": matrix.tolist(),
    }


def evaluate_classification(classifier, records: list[dict], labels: list[str], batch_size: int = 16) -> dict:
    """Metrics of a classifier (anything with ``predict(texts)``) on ``{"text", "label"}`` records."""
    predicted = classifier.predict([r["text"] for r in records], batch_size=batch_size)
    predictions = [p["label"] for p in predicted]
    references = [str(r["label"]) for r in records]
    return {
        **classification_metrics(predictions, references, labels),
        "predictions": [
            {"text": r["text"], "reference": ref, "prediction": p["label"], "p": p["probabilities"][p["label"]]}
            for r, ref, p in zip(records, references, predicted, strict=True)
        ],
    }


def plot_confusion_matrix(matrix: list[list[int]], labels: list[str], path, title: str = "") -> None:
    """Write the confusion matrix as a PNG (counts in the cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 1.5 + 0.6 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    from ray_ft.outputs import replacing

    with replacing(path) as tmp:  # a symlink at ``path`` is replaced, not written through
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)

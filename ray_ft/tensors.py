"""Micro-batches as tensors: tokenised examples padded (:func:`collate`) or packed (:func:`pack`) for the model.

Kept apart from ``ray_ft.data`` so that reading and checking records (the CLI's ``data check``, Ray Data read
tasks) never imports torch.
"""

from __future__ import annotations

import torch

from ray_ft.chat import IGNORE_INDEX


def pack(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Concatenate a micro-batch into one row with no padding.

    ``position_ids`` restart at 0 for every example; with no ``attention_mask``, transformers derives a
    block-diagonal causal mask from them, so no token attends across an example boundary. Each example's first
    label is a prompt token (ignored), so no loss is taken across a boundary either.
    """
    ids = [t for b in batch for t in b["input_ids"]]
    labels = [t for b in batch for t in b["labels"]]
    positions = [i for b in batch for i in range(len(b["input_ids"]))]
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
    }


def batch_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(tokens, examples)`` in a padded or packed micro-batch (padding not counted)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum()), int(batch["input_ids"].shape[0])
    return int(batch["input_ids"].numel()), int((batch["position_ids"] == 0).sum())


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in the batch (dynamic padding)."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}

"""The training objective: next-token loss over labelled (answer) tokens, and the validation pass."""

from __future__ import annotations

import torch

from ray_ft.chat import IGNORE_INDEX
from ray_ft.train.runtime import all_reduce


def answer_only_logits(model) -> bool:
    """Whether :func:`causal_lm_loss` may project only the positions that carry a label.

    Needs a forward that takes ``logits_to_keep``; prompt learning prepends virtual tokens, which shifts the
    positions, so it keeps the model's own loss.
    """
    import inspect

    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def labelled_hidden_states(model, batch: dict[str, torch.Tensor]):
    """``(hidden, targets, head)``: the final hidden states at the positions whose next token is labelled, those
    tokens, and the output projection, for a loss that applies the projection itself (fused)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep], base.get_output_embeddings()


def fused_linear_cross_entropy(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over labelled tokens through Liger-Kernel's fused linear + cross-entropy (CUDA): the
    projection runs chunk by chunk inside the loss, so the (tokens x vocabulary) logits never exist at once."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    hidden, targets, head = labelled_hidden_states(model, batch)
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)(head.weight, hidden, targets, head.bias)


def causal_lm_loss(model, batch: dict[str, torch.Tensor], answer_only: bool, fused: bool = False) -> torch.Tensor:
    """Mean next-token loss over labelled tokens (the model's own loss, same value).

    With ``answer_only`` the vocabulary projection and softmax run only at positions whose next token is
    labelled (answers), not at prompt and padding positions: with a large vocabulary this is a good part of a
    step on CPU and of activation memory everywhere. ``fused`` (``train.fused_linear_cross_entropy``) computes the
    same loss at the same positions with :func:`fused_linear_cross_entropy`.
    """
    if fused:
        return fused_linear_cross_entropy(model, batch)
    if not answer_only:
        return model(**batch, use_cache=False).loss
    targets = batch["labels"][:, 1:]
    keep = torch.nonzero((targets != IGNORE_INDEX).any(0)).flatten()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=IGNORE_INDEX
    )


@torch.no_grad()
def validation_loss(engine, batches: list[dict[str, torch.Tensor]], device, answer_only: bool) -> float:
    """Mean next-token loss over every labelled validation token of all ranks (the engine is left in train mode)."""
    engine.eval()
    total = count = 0.0
    # Eager even under train.compile: a no-grad eval graph (and its odd-sized last batch) would each cost a
    # compile, more than the few validation forwards gain from it.
    with torch.compiler.set_stance("force_eager"):
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            loss = causal_lm_loss(engine, b, answer_only)
            n = float((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n:  # a filler batch (see ray_ft.train.loop) runs the forward but counts for nothing
                total += loss.item() * n
                count += n
    engine.train()
    total, count = all_reduce([total, count])
    return total / max(count, 1.0)

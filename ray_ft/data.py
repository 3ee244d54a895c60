"""Read, validate, clean and tokenise JSONL training data.

Supported line shapes (``data.format: auto`` picks by the first valid line):

- ``qa``: ``{"question": str, "answer": str}`` (the seed tutorial's shape)
- ``io``: ``{"input": str, "output": str, "context": str?}``
- ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``,
  ending with an assistant message (the one the loss is taken on)
- ``classification``: ``{"text": str, "label": str|int}`` (linear probe)

The whole file is validated before anything trains; every problem is reported as
``file:line: field: message``.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ray_ft.config import DataConfig

IGNORE_INDEX = -100
MAX_REPORTED_ERRORS = 50
FORMATS = {
    "qa": {"question": True, "answer": True},
    "io": {"input": True, "output": True, "context": False},
    "chat": {"messages": True},
    "classification": {"text": True, "label": True},
}
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Invalid data; ``messages`` holds one ``file:line: field: problem`` string per problem."""

    def __init__(self, messages: list[str]):
        self.messages = messages
        shown = messages[:MAX_REPORTED_ERRORS]
        if len(messages) > MAX_REPORTED_ERRORS:
            shown.append(f"... and {len(messages) - MAX_REPORTED_ERRORS} more problems")
        super().__init__("\n".join(shown))


@dataclass
class Dataset:
    """Validated, cleaned records and what cleaning did to them."""

    path: str
    format: str
    records: list[dict[str, Any]]
    stats: dict[str, int] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    """Sorted label names (classification only)."""


def clean_text(text: str) -> str:
    """NFC-normalise and collapse runs of spaces/tabs; strip each line and the whole text."""
    text = unicodedata.normalize("NFC", text)
    lines = [re.sub(r"[^\S\n]+", " ", line).strip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip()


def _detect_format(obj: dict[str, Any]) -> str | None:
    """The format sharing most required fields with ``obj`` (so a missing field is reported as such)."""
    overlap = {name: sum(k in obj for k, req in fields.items() if req) for name, fields in FORMATS.items()}
    best = max(overlap, key=overlap.get)
    return best if overlap[best] else None


def _check_fields(obj: dict[str, Any], fmt: str, where: str) -> list[str]:
    errors = []
    fields = FORMATS[fmt]
    for key, required in fields.items():
        if key not in obj:
            if required:
                errors.append(f"{where}: {key}: missing")
            continue
        value = obj[key]
        if fmt == "chat":
            errors += _check_messages(value, where)
        elif key == "label":
            if isinstance(value, bool) or not isinstance(value, str | int):
                errors.append(f"{where}: label: expected a string or integer, got {type(value).__name__}")
            elif isinstance(value, str) and not value.strip():
                errors.append(f"{where}: label: empty")
        elif not isinstance(value, str):
            errors.append(f"{where}: {key}: expected a string, got {type(value).__name__}")
        elif required and not value.strip():
            errors.append(f"{where}: {key}: empty")
    extra = sorted(set(obj) - set(fields))
    if extra:
        errors.append(f"{where}: {extra[0]}: unexpected field for the {fmt!r} format (fields: {sorted(fields)})")
    return errors


def _check_messages(messages: Any, where: str) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return [f"{where}: messages: expected a non-empty list"]
    errors = []
    for i, m in enumerate(messages):
        loc = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            errors.append(f"{loc}: expected an object with role and content")
            continue
        if m.get("role") not in ROLES:
            errors.append(f"{loc}.role: expected one of {list(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            errors.append(f"{loc}.content: expected a non-empty string")
    if not errors and messages[-1]["role"] != "assistant":
        errors.append(f"{where}: messages: the last message must be the assistant's answer")
    return errors


def read_jsonl(path: str | Path, fmt: str = "auto", dedupe: bool = True) -> Dataset:
    """Validate the whole file, then clean and de-duplicate it.

    Raises:
        DataError: listing every invalid line (``file:line: field: problem``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError([f"{path}: file not found"])
    errors: list[str] = []
    raw: list[tuple[int, dict[str, Any]]] = []
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.append(f"{where}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                errors.append(f"{where}: invalid JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(obj, dict):
                errors.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
                continue
            if fmt == "auto":
                detected = _detect_format(obj)
                if detected is None:
                    errors.append(
                        f"{where}: cannot tell the format from fields {sorted(obj)}; expected one of "
                        + "; ".join(f"{n}: {sorted(k for k, r in fs.items() if r)}" for n, fs in FORMATS.items())
                    )
                    continue
                fmt = detected
            errors += _check_fields(obj, fmt, where)
            raw.append((lineno, obj))
    if not raw and not errors:
        errors.append(f"{path}: no examples (the file is empty)")
    if errors:
        raise DataError(errors)

    records, seen, changed, dupes = [], set(), 0, 0
    for lineno, obj in raw:
        rec = _clean_record(obj, fmt)
        if rec != obj:
            changed += 1
        key = json.dumps(rec, sort_keys=True, ensure_ascii=False)
        if dedupe and key in seen:
            dupes += 1
            continue
        seen.add(key)
        rec["_line"] = lineno
        records.append(rec)
    labels = sorted({str(r["label"]) for r in records}) if fmt == "classification" else []
    if fmt == "classification" and len(labels) < 2:
        raise DataError([f"{path}: label: need at least 2 distinct labels, found {labels}"])
    stats = {"lines": len(raw), "normalized": changed, "duplicates_dropped": dupes, "examples": len(records)}
    return Dataset(path=str(path), format=fmt, records=records, stats=stats, labels=labels)


def _clean_record(obj: dict[str, Any], fmt: str) -> dict[str, Any]:
    if fmt == "chat":
        return {"messages": [{"role": m["role"], "content": clean_text(m["content"])} for m in obj["messages"]]}
    return {k: clean_text(v) if isinstance(v, str) else v for k, v in obj.items()}


def split(records: list[dict[str, Any]], val_fraction: float, seed: int, limit: int | None = None) -> tuple[list, list]:
    """Shuffle with a fixed seed, keep the first ``limit`` (all when ``None``), and hold out ``val_fraction``
    of those (at least one example when > 0)."""
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    idx = idx[:limit]
    n_val = round(len(idx) * val_fraction)
    if val_fraction > 0 and len(idx) >= 2:
        n_val = max(1, n_val)
    val = [records[i] for i in idx[:n_val]]
    train = [records[i] for i in idx[n_val:]]
    return train, val


# --------------------------------------------------------------------------- prompts


def question_of(rec: dict[str, Any]) -> str:
    """The user-facing question of a generation record."""
    if "question" in rec:
        return rec["question"]
    if "input" in rec:
        return f"{rec['context']}\n{rec['input']}" if rec.get("context") else rec["input"]
    return next(m["content"] for m in reversed(rec["messages"][:-1]) if m["role"] == "user")


def answer_of(rec: dict[str, Any]) -> str:
    if "answer" in rec:
        return rec["answer"]
    if "output" in rec:
        return rec["output"]
    return rec["messages"][-1]["content"]


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes a prompt; saved next to every exported model."""

    template: str = "Human: {question} Assistant: {answer}"
    use_chat_template: bool = False

    @classmethod
    def from_config(cls, cfg: DataConfig) -> PromptFormat:
        return cls(template=cfg.template, use_chat_template=cfg.use_chat_template)

    def to_dict(self) -> dict[str, Any]:
        return {"template": self.template, "use_chat_template": self.use_chat_template}

    def prompt(self, question: str | list[dict[str, str]], tokenizer=None) -> str:
        """Render everything before the answer (no trailing whitespace)."""
        if self.use_chat_template:
            messages = question if isinstance(question, list) else [{"role": "user", "content": question}]
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError("data.use_chat_template: the tokenizer has no chat template")
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if isinstance(question, list):
            question = next(m["content"] for m in reversed(question) if m["role"] == "user")
        head = self.template[: self.template.rindex("{answer}")]
        return head.replace("{question}", question).rstrip()

    def answer_prefix(self) -> str:
        """Whitespace the template puts between prompt and answer (re-attached to the answer)."""
        if self.use_chat_template:
            return ""
        head = self.template[: self.template.rindex("{answer}")]
        return head[len(head.rstrip()) :]


def encode_generation(rec: dict[str, Any], tokenizer, fmt: PromptFormat, max_length: int) -> dict[str, list[int]]:
    """Token ids with loss on the answer (and EOS) only."""
    q = rec["messages"][:-1] if "messages" in rec else question_of(rec)
    prompt_ids = tokenizer(fmt.prompt(q, tokenizer), add_special_tokens=not fmt.use_chat_template)["input_ids"]
    answer_ids = tokenizer(fmt.answer_prefix() + answer_of(rec), add_special_tokens=False)["input_ids"]
    answer_ids = [*answer_ids, tokenizer.eos_token_id]
    if len(answer_ids) >= max_length:  # keep room for the prompt; the answer keeps its EOS
        answer_ids = [*answer_ids[: max_length // 2 - 1], tokenizer.eos_token_id]
    prompt_ids = prompt_ids[-(max_length - len(answer_ids)) :]
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    }


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


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffle, then sort within windows of 50 batches so each batch holds similar lengths."""
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    window = batch_size * 50
    batches = []
    for start in range(0, len(idx), window):
        chunk = sorted(idx[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches

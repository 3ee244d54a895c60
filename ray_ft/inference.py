"""Load any ray-ft artifact (or plain HF model directory) and generate answers with its template."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ray_ft.data import PromptFormat
from ray_ft.device import select_device
from ray_ft.export import read_metadata
from ray_ft.methods import get_method
from ray_ft.models import load_causal_lm, load_tokenizer


@dataclass
class Generator:
    model: Any
    tokenizer: Any
    fmt: PromptFormat
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        prefer_gpu: bool | None = None,
        dtype: str | None = "auto",
    ) -> Generator:
        """Load a merged model, an exported adapter, or a plain Hugging Face model directory.

        The model is placed by :func:`ray_ft.device.select_device` (``prefer_gpu``, ``dtype``): on the GPU in
        bf16 when there is one.
        """
        placement = select_device(prefer_gpu, dtype)
        meta = read_metadata(model_dir)
        if meta.get("task") == "classification":
            raise ValueError(f"{model_dir}: a classifier ({meta.get('method')}); use `ray-ft classify`")
        if meta.get("artifact") == "export":
            model, tokenizer = get_method(meta["method"]).load_export(Path(model_dir), meta)
        else:
            tokenizer = load_tokenizer(str(model_dir), trust_remote_code)
            model = load_causal_lm(
                str(model_dir), placement.dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
            )
        model = model.to(device=placement.device, dtype=placement.dtype).eval()
        fmt = PromptFormat(**meta["prompt_format"]) if "prompt_format" in meta else PromptFormat()
        return cls(model=model, tokenizer=tokenizer, fmt=fmt, meta=meta)

    @property
    def device(self) -> torch.device:
        """The device the model runs on."""
        return next(self.model.parameters()).device

    def stop_text(self) -> str | None:
        """Text that starts a new turn in the template (cut from answers), e.g. ``Human:``."""
        if self.fmt.use_chat_template:
            return None
        head = self.fmt.template.split("{question}")[0].strip()
        return head or None

    def prompts(self, questions: list[str | list[dict[str, str]]]) -> list[str]:
        """Prompts for questions or conversations ending with a user turn, rendered as in training."""
        return [self.fmt.prompt(q, self.tokenizer) for q in questions]

    @torch.inference_mode()
    def complete(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        batch_size: int = 16,
        stop: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Continue raw prompts; returns ``{"text", "prompt_tokens", "completion_tokens", "finish_reason"}``."""
        tok = self.tokenizer
        tok.padding_side = "left"
        stops = [s for s in (stop or []) if s]
        out: list[dict[str, Any]] = []
        device = self.device
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            # Rendered prompts carry their BOS text already (see PromptFormat.render_conversation).
            rendered = bool(tok.bos_token) and all(p.startswith(tok.bos_token) for p in chunk)
            special = not self.fmt.use_chat_template and not rendered
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=special)
            enc = {k: v.to(device) for k, v in enc.items()}
            sampling = (
                {"do_sample": True, "temperature": temperature, "top_p": top_p}
                if temperature > 0
                else {"do_sample": False}
            )
            gen = self.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                **sampling,
            )
            width = enc["input_ids"].shape[1]
            for row, mask in zip(gen, enc["attention_mask"], strict=True):
                new = row[width:]
                finished = bool((new == tok.eos_token_id).any())
                text = tok.decode(new, skip_special_tokens=True)
                for s in stops:
                    if s in text:
                        text, finished = text.split(s, 1)[0], True
                n_new = (
                    int((new != tok.pad_token_id).sum())
                    if tok.pad_token_id != tok.eos_token_id
                    else len(tok(text, add_special_tokens=False)["input_ids"])
                )
                out.append(
                    {
                        "text": text.strip(),
                        "prompt_tokens": int(mask.sum()),
                        "completion_tokens": n_new,
                        "finish_reason": "stop" if finished else "length",
                    }
                )
        return out

    def answer(self, questions: list[str | list[dict[str, str]]], **kwargs) -> list[str]:
        """Answer questions with the training template; the text only."""
        stop = [self.stop_text()] if self.stop_text() else None
        return [r["text"] for r in self.complete(self.prompts(questions), stop=stop, **kwargs)]

"""Conversations: record shapes mapped onto one message list, rendered as prompts, encoded with loss masks.

Every generation record becomes a list of ``{"role", "content"}`` messages (:func:`to_messages`):

- ``qa`` ``{question, answer}`` and ``io`` ``{input, output, context?}``: one user turn, one assistant turn;
- ``chat`` ``{messages: [{role, content}]}``;
- ``sharegpt`` ``{conversations: [{from: human|gpt|system, value}]}``;
- ``alpaca`` ``{instruction, input?, output}``: the user turn is ``instruction`` (then a blank line and ``input``
  when it is not empty).

A conversation is an optional system message, then user and assistant turns alternating, ending with an
assistant turn when it is trained on (with a user turn when it is a prompt).

With a plain template (``Human: {question} Assistant: {answer}`` by default) a conversation renders as::

    [BOS][system + "\\n"]Human: q1 Assistant: a1<EOS>\\nHuman: q2 Assistant: a2<EOS>

that is, every completed turn in the template followed by the EOS token, turns separated by
:data:`TURN_SEPARATOR`; the BOS token text starts it when the tokenizer adds one by itself. With
``use_chat_template`` the tokenizer's own template renders it, prefix by prefix: each assistant turn's text is
what the template adds when that turn is appended to the conversation before it (the template's own end-of-turn
text included), so the masks come from the template, never from searching the text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

DEFAULT_TEMPLATE = "Human: {question} Assistant: {answer}"
TURN_SEPARATOR = "\n"
"""Text between one completed turn's EOS and the next turn (plain template)."""
SYSTEM_SEPARATOR = "\n"
"""Text after the system message (plain template)."""
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
"""ShareGPT ``from`` values: the original ``human``/``gpt``/``system``, and the ``user``/``assistant`` that many
exports write instead."""
TRAIN_ON = ("all_assistant", "last_assistant")
CONVERSATION_FORMATS = ("chat", "sharegpt", "alpaca")
"""Record formats rendered with the model's chat template when ``data.use_chat_template`` is unset."""
IGNORE_INDEX = -100


class ConversationError(ValueError):
    """A conversation the chosen template cannot render as training data."""


def to_messages(rec: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation of a generation record of any supported shape."""
    if "messages" in rec:
        return [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
    if "conversations" in rec:
        return [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in rec["conversations"]]
    if "instruction" in rec:
        user = f"{rec['instruction']}\n\n{rec['input']}" if rec.get("input") else rec["instruction"]
        return [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
    if "question" in rec:
        return [{"role": "user", "content": rec["question"]}, {"role": "assistant", "content": rec["answer"]}]
    user = f"{rec['context']}\n{rec['input']}" if rec.get("context") else rec["input"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]


def check_turns(roles: list[str]) -> str | None:
    """Why a role sequence is not a trainable conversation, or ``None``.

    Allowed: an optional system message first, then user/assistant alternating from a user turn, ending with an
    assistant turn.
    """
    body = roles[1:] if roles and roles[0] == "system" else roles
    if not body:
        return "no user and assistant turns"
    for i, role in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            at = i + (len(roles) - len(body))
            if role == "system":
                return f"[{at}]: a system message is only allowed first"
            article = "an" if want == "assistant" else "a"
            return f"[{at}]: expected {article} {want} turn (turns alternate user/assistant), got {role}"
    if body[-1] != "assistant":
        return ": the last message must be the assistant's answer"
    return None


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front of text by itself."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def choose_chat_template(setting: bool | None, record_format: str, tokenizer) -> tuple[bool, str]:
    """Whether to render with the tokenizer's chat template (``data.use_chat_template``, ``None`` meaning auto: see
    :data:`CONVERSATION_FORMATS`), and why, for the run's log.

    Raises:
        ConversationError: it is asked for and the tokenizer has none.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting and not has_template:
        raise ConversationError("data.use_chat_template: the tokenizer has no chat template")
    if setting is not None:
        return setting, f"data.use_chat_template={str(setting).lower()}"
    if record_format not in CONVERSATION_FORMATS:
        return False, f"{record_format} records"
    if not has_template:
        return False, "the tokenizer has no chat template"
    return True, f"{record_format} records, and the model has a chat template"


@dataclass(frozen=True)
class PromptFormat:
    """How a conversation becomes text; saved next to every exported model.

    Attributes:
        template: Plain template with ``{question}`` and ending with ``{answer}``.
        use_chat_template: Render with the tokenizer's chat template instead of ``template``.
    """

    template: str = DEFAULT_TEMPLATE
    use_chat_template: bool = False

    @classmethod
    def from_config(cls, cfg) -> PromptFormat:
        """From a ``DataConfig`` whose ``use_chat_template`` a run has resolved (``ray_ft.job``); unset reads as
        the plain template."""
        return cls(template=cfg.template, use_chat_template=bool(cfg.use_chat_template))

    def to_dict(self) -> dict[str, Any]:
        return {"template": self.template, "use_chat_template": self.use_chat_template}

    # ------------------------------------------------------------------ plain template pieces

    def _parts(self) -> tuple[str, str, str]:
        """``(before the question, the assistant cue, answer prefix)`` of the plain template."""
        head = self.template[: self.template.rindex("{answer}")]
        before, _, between = head.partition("{question}")
        cue = between.rstrip()
        return before, cue, between[len(cue) :]

    def answer_prefix(self) -> str:
        """Whitespace the template puts between prompt and answer (trained as part of the answer)."""
        return "" if self.use_chat_template else self._parts()[2]

    def segments(self, messages: list[dict[str, str]], tokenizer) -> list[tuple[str, bool]]:
        """The conversation as ``(text, is_assistant_turn)`` pieces whose concatenation is the rendered text.

        A conversation ending with a user turn ends with the context before the next answer (the generation
        prompt included); one ending with an assistant turn ends with that turn.

        Raises:
            ConversationError: the chat template does not render the conversation prefix by prefix.
        """
        if self.use_chat_template:
            return self._template_segments(messages, tokenizer)
        before, cue, prefix = self._parts()
        eos = tokenizer.eos_token or ""
        out: list[tuple[str, bool]] = []
        context = tokenizer.bos_token if adds_bos(tokenizer) else ""
        for i, m in enumerate(messages):
            if m["role"] == "system":
                context += m["content"] + SYSTEM_SEPARATOR
            elif m["role"] == "user":
                context += before + m["content"] + cue
            else:
                out += [(context, False), (prefix + m["content"] + eos, True)]
                context = TURN_SEPARATOR if i + 1 < len(messages) else ""
        if context:
            out.append((context, False))
        return out

    def _template_segments(self, messages: list[dict[str, str]], tokenizer) -> list[tuple[str, bool]]:
        if not getattr(tokenizer, "chat_template", None):
            raise ConversationError("data.use_chat_template: the tokenizer has no chat template")

        def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=generation_prompt, tokenize=False)

        out: list[tuple[str, bool]] = []
        done = ""
        for j, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt, full = render(messages[:j], True), render(messages[: j + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ConversationError(
                    "data.use_chat_template: the tokenizer's chat template does not render this conversation "
                    f"prefix by prefix (turn {j} changes the text before it), so its assistant turns cannot be "
                    "told apart; use the plain data.template"
                )
            out += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        if not messages or messages[-1]["role"] != "assistant":
            prompt = render(messages, True)
            if not prompt.startswith(done):
                raise ConversationError("data.use_chat_template: the chat template rewrites earlier turns")
            out.append((prompt[len(done) :], False))
        return [(text, is_answer) for text, is_answer in out if text or is_answer]

    # ------------------------------------------------------------------ prompts (training, generation, serving)

    def render_conversation(self, messages: list[dict[str, str]], tokenizer) -> str:
        """The prompt for a conversation ending with a user turn, exactly the text training puts before that
        turn's answer (system message, earlier turns and the assistant cue included)."""
        return "".join(text for text, _ in self.segments(messages, tokenizer))

    def chat_template(self, tokenizer=None) -> str | None:
        """A Jinja chat template rendering what :meth:`render_conversation` renders (``None`` when the tokenizer's
        own template is used).

        It follows ``apply_chat_template`` semantics: ``messages``, ``add_generation_prompt``, ``eos_token`` and
        ``bos_token``. Pass the tokenizer when it adds a BOS token by itself: the template then starts with it.
        """
        if self.use_chat_template:
            return None
        before, cue, prefix = self._parts()

        def lit(text: str) -> str:
            return json.dumps(text, ensure_ascii=False)

        bos = "{{- bos_token -}}" if tokenizer is not None and adds_bos(tokenizer) else ""
        return (
            bos + "{%- for m in messages -%}"
            "{%- if m['role'] == 'system' -%}{{- m['content'] + " + lit(SYSTEM_SEPARATOR) + " -}}"
            "{%- elif m['role'] == 'user' -%}"
            "{%- if loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'assistant' -%}"
            "{{- " + lit(TURN_SEPARATOR) + " -}}{%- endif -%}"
            "{{- " + lit(before) + " + m['content'] -}}"
            "{%- if not loop.last or add_generation_prompt -%}{{- " + lit(cue) + " -}}{%- endif -%}"
            "{%- else -%}{{- " + lit(prefix) + " + m['content'] + eos_token -}}"
            "{%- endif -%}{%- endfor -%}"
        )

    def prompt(self, question: str | list[dict[str, str]], tokenizer=None) -> str:
        """The prompt for a question (one user turn) or a conversation ending with a user turn.

        Without a tokenizer (plain template only) it is the single turn's text, BOS not included.
        """
        messages = question if isinstance(question, list) else [{"role": "user", "content": question}]
        if tokenizer is not None:
            return self.render_conversation(messages, tokenizer)
        if self.use_chat_template:
            raise ConversationError("data.use_chat_template: rendering a prompt needs the tokenizer")
        before, cue, _ = self._parts()
        user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        return before + user + cue


def encode_conversation(
    messages: list[dict[str, str]], tokenizer, fmt: PromptFormat, max_length: int, train_on: str = "all_assistant"
) -> dict[str, list[int]]:
    """Token ids of a conversation ending with an assistant turn, labelled on assistant turns only.

    ``train_on="all_assistant"`` labels every assistant turn, ``"last_assistant"`` only the last (earlier ones are
    context). System and user turns are always context. Each piece is tokenised on its own (no special tokens
    added: BOS and EOS are in the rendered text), so the ids before a turn are exactly the ids of
    ``render_conversation`` of the conversation up to that turn. The last answer always ends with EOS. A sequence
    over ``max_length`` loses tokens from the left, keeping the last answer (itself cut to half of
    ``max_length`` if it alone is too long).
    """
    pieces = fmt.segments(messages, tokenizer)
    last = max(i for i, (_, is_answer) in enumerate(pieces) if is_answer)
    ids: list[int] = []
    labels: list[int] = []
    eos = tokenizer.eos_token_id
    for i, (text, is_answer) in enumerate(pieces):
        part = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if i == last:
            if eos is not None and eos not in part:
                part = [*part, eos]
            if len(part) >= max_length:  # keep room for some context; the answer keeps its EOS
                part = [*part[: max_length // 2 - 1], eos]
        trained = is_answer and (train_on == "all_assistant" or i == last)
        ids += part
        labels += part if trained else [IGNORE_INDEX] * len(part)
        if i == last:
            break
    return {"input_ids": ids[-max_length:], "labels": labels[-max_length:]}

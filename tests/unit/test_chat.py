"""Conversations: the plain template's Jinja twin, loss masks from the template, ShareGPT/Alpaca shapes."""

from __future__ import annotations

import pytest

from ray_ft.chat import (
    IGNORE_INDEX,
    ConversationError,
    PromptFormat,
    choose_chat_template,
    encode_conversation,
    to_messages,
)
from ray_ft.data import DataError, encode_generation, read_data

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TURNS = [
    ("LoRA là gì?", "Ma trận hạng thấp."),
    ("QLoRA thì sao?", "Bốn bit NF4."),
    ("What is Ray Train?", "Distributed training."),
]


def _conversation(turns: int, system: bool, answered: bool) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "Trả lời ngắn gọn."}] if system else []
    for q, a in TURNS[:turns]:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs if answered else msgs[:-1]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from ray_ft.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def chatml_tok(tiny_model_dir):
    """The tiny tokenizer with ChatML special tokens and template (EOS is ``<|im_end|>``, as in SmolLM2)."""
    from ray_ft.models import load_tokenizer

    t = load_tokenizer(str(tiny_model_dir))
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.eos_token = "<|im_end|>"
    t.chat_template = CHATML
    return t


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("turns", [1, 2, 3])
@pytest.mark.parametrize(
    "template", ["Human: {question} Assistant: {answer}", "### Câu hỏi: {question}\n### Đáp: {answer}"]
)
def test_jinja_template_renders_what_training_renders(tok, turns, system, template):
    fmt = PromptFormat(template=template)
    prompt = _conversation(turns, system, answered=False)
    rendered = fmt.render_conversation(prompt, tok)
    via_jinja = tok.apply_chat_template(
        prompt, chat_template=fmt.chat_template(tok), add_generation_prompt=True, tokenize=False
    )
    assert via_jinja == rendered
    # The served prompt's ids are exactly the context training put before this turn's answer.
    enc = encode_conversation(_conversation(turns, system, answered=True), tok, fmt, max_length=1024)
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert enc["input_ids"][: len(ids)] == ids
    assert enc["labels"][len(ids) - 1] == IGNORE_INDEX and enc["labels"][len(ids)] != IGNORE_INDEX
    # Earlier turns are in the prompt, each closed by EOS.
    assert rendered.count(tok.eos_token) == turns - 1
    assert all(q in rendered for q, _ in TURNS[:turns])


def test_plain_multi_turn_layout(tok):
    fmt = PromptFormat()
    text = fmt.render_conversation(_conversation(2, True, answered=False), tok)
    eos = tok.eos_token
    assert text == (
        f"Trả lời ngắn gọn.\nHuman: LoRA là gì? Assistant: Ma trận hạng thấp.{eos}\nHuman: QLoRA thì sao? Assistant:"
    )
    assert fmt.chat_template() is not None and PromptFormat(use_chat_template=True).chat_template() is None


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_plain_template_labels_every_assistant_turn(tok, train_on):
    enc = encode_conversation(_conversation(3, True, answered=True), tok, PromptFormat(), 1024, train_on)
    trained = tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != IGNORE_INDEX])
    eos = tok.eos_token
    answers = [a for _, a in TURNS] if train_on == "all_assistant" else [TURNS[-1][1]]
    assert trained == "".join(f" {a}{eos}" for a in answers)


def _spans(enc) -> list[list[int]]:
    """Runs of labelled tokens."""
    spans, current = [], []
    for t, lab in zip(enc["input_ids"], enc["labels"], strict=True):
        if lab != IGNORE_INDEX:
            assert lab == t
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


@pytest.mark.parametrize("system", [False, True])
def test_chat_template_masks_cover_exactly_the_assistant_turns(chatml_tok, system):
    fmt = PromptFormat(use_chat_template=True)
    msgs = _conversation(3, system, answered=True)
    enc = encode_conversation(msgs, chatml_tok, fmt, max_length=1024)
    spans = _spans(enc)
    assert [chatml_tok.decode(s) for s in spans] == [f"{a}<|im_end|>\n" for _, a in TURNS]
    # Everything else is context: the full rendering, token for token, with the masks laid over it.
    full = chatml_tok.apply_chat_template(msgs, tokenize=False)
    assert chatml_tok.decode(enc["input_ids"]) == full
    prompt = fmt.render_conversation(msgs[:-1], chatml_tok)
    ids = chatml_tok(prompt, add_special_tokens=False)["input_ids"]
    assert enc["input_ids"][: len(ids)] == ids and prompt.endswith("<|im_start|>assistant\n")
    last_only = encode_conversation(msgs, chatml_tok, fmt, 1024, train_on="last_assistant")
    assert [chatml_tok.decode(s) for s in _spans(last_only)] == [f"{TURNS[-1][1]}<|im_end|>\n"]


def test_a_template_that_rewrites_earlier_turns_is_refused(chatml_tok):
    rewriting = (
        "{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    chatml_tok.chat_template, saved = rewriting, chatml_tok.chat_template
    try:
        with pytest.raises(ConversationError, match="prefix by prefix"):
            encode_conversation(_conversation(2, False, True), chatml_tok, PromptFormat(use_chat_template=True), 256)
    finally:
        chatml_tok.chat_template = saved


def test_truncation_keeps_the_last_answer_and_drops_early_context(tok):
    enc = encode_conversation(_conversation(3, True, answered=True), tok, PromptFormat(), max_length=24)
    assert len(enc["input_ids"]) == 24
    assert tok.decode(_spans(enc)[-1]) == f" {TURNS[-1][1]}{tok.eos_token}"


def test_sharegpt_and_alpaca_map_onto_conversations(tmp_path, tok):
    from conftest import write_jsonl

    share = {
        "conversations": [
            {"from": "system", "value": "Trả lời ngắn gọn."},
            {"from": "human", "value": "LoRA là gì?"},
            {"from": "gpt", "value": "Ma trận hạng thấp."},
        ]
    }
    alpaca = {"instruction": "Dịch sang tiếng Anh", "input": "xin chào", "output": "hello"}
    ds = read_data(write_jsonl(tmp_path / "s.jsonl", [share]))
    assert ds.format == "sharegpt"
    assert to_messages(ds.records[0]) == _conversation(1, True, answered=True)
    renamed = {"human": "user", "gpt": "assistant"}  # the from values many ShareGPT exports write
    share["conversations"] = [{**t, "from": renamed.get(t["from"], t["from"])} for t in share["conversations"]]
    ds = read_data(write_jsonl(tmp_path / "s2.jsonl", [share]))
    assert ds.format == "sharegpt" and to_messages(ds.records[0]) == _conversation(1, True, answered=True)
    ds = read_data(write_jsonl(tmp_path / "a.jsonl", [alpaca, {"instruction": "Chào", "output": "hi"}]))
    assert ds.format == "alpaca"
    assert to_messages(ds.records[0])[0] == {"role": "user", "content": "Dịch sang tiếng Anh\n\nxin chào"}
    assert to_messages(ds.records[1])[0]["content"] == "Chào"
    enc = encode_generation(ds.records[0], tok, PromptFormat(), 128)
    assert tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab >= 0]).startswith(
        " hello"
    )


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"conversations": [{"from": "bot", "value": "x"}]}, ":1: conversations[0].from: expected one of"),
        ({"conversations": [{"from": "human", "value": "q"}]}, ":1: conversations: the last message must be"),
        (
            {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
            ":1: conversations[0]: expected a user turn",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]},
            ":1: messages[1]: expected an assistant turn",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]},
            ":1: messages[1]: a system message is only allowed first",
        ),
        ({"instruction": "i", "output": ""}, ":1: output: empty"),
    ],
)
def test_bad_conversations_are_named(tmp_path, row, expected):
    from conftest import write_jsonl

    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as e:
        read_data(path)
    assert any(m.startswith(str(path)) and expected in m for m in e.value.messages), e.value.messages


def test_a_tokenizer_that_adds_bos_gets_it_in_the_text_once(tiny_model_dir):
    """Rendered prompts carry the BOS text themselves (tokenised without special tokens), so training, the Jinja
    template (given the tokenizer) and generation all start with exactly one BOS."""
    from tokenizers.processors import TemplateProcessing

    from ray_ft.chat import adds_bos
    from ray_ft.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    tok.add_special_tokens({"bos_token": "<s>"})
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert adds_bos(tok)
    fmt = PromptFormat()
    prompt = _conversation(2, True, answered=False)
    rendered = fmt.render_conversation(prompt, tok)
    assert rendered.startswith("<s>Trả lời") and rendered.count("<s>") == 1
    assert (
        tok.apply_chat_template(
            prompt, chat_template=fmt.chat_template(tok), tokenize=False, add_generation_prompt=True
        )
        == rendered
    )
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    enc = encode_conversation(_conversation(2, True, answered=True), tok, fmt, 1024)
    assert enc["input_ids"][: len(ids)] == ids and ids.count(tok.bos_token_id) == 1


def test_conversations_use_the_models_chat_template_when_it_has_one(tok, chatml_tok):
    """``data.use_chat_template`` unset: chat, ShareGPT and Alpaca records take the tokenizer's template when there
    is one; Q/A and io records keep the plain template; an explicit setting wins, and asking for a template the
    tokenizer lacks is refused."""
    assert not getattr(tok, "chat_template", None)
    for shape in ("chat", "sharegpt", "alpaca"):
        assert choose_chat_template(None, shape, chatml_tok) == (
            True,
            f"{shape} records, and the model has a chat template",
        )
        assert choose_chat_template(None, shape, tok) == (False, "the tokenizer has no chat template")
    for shape in ("qa", "io"):
        assert choose_chat_template(None, shape, chatml_tok) == (False, f"{shape} records")
    assert choose_chat_template(False, "chat", chatml_tok) == (False, "data.use_chat_template=false")
    assert choose_chat_template(True, "qa", chatml_tok) == (True, "data.use_chat_template=true")
    with pytest.raises(ConversationError, match="the tokenizer has no chat template"):
        choose_chat_template(True, "chat", tok)

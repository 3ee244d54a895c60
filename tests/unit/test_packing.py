"""Sequence packing: a packed micro-batch trains exactly like the padded one, and unsafe models are refused."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ray_ft.chat import IGNORE_INDEX
from ray_ft.config import ConfigError, load_config
from ray_ft.data import PromptFormat, encode_generation
from ray_ft.models import load_tokenizer
from ray_ft.tensors import batch_counts, collate, pack
from ray_ft.train.batching import check_packing
from ray_ft.train.loss import answer_only_logits, causal_lm_loss
from tests.conftest import QA_ROWS


@pytest.fixture(scope="module")
def encoded(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    return tok, [encode_generation(r, tok, PromptFormat(), 128) for r in QA_ROWS[:4]]


def test_pack_restarts_positions_and_counts_tokens_and_examples(encoded):
    _, examples = encoded
    packed = pack(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    starts = torch.nonzero(packed["position_ids"][0] == 0).flatten().tolist()
    assert starts == [sum(lengths[:i]) for i in range(len(lengths))]
    # Every example starts with a prompt token, so no loss crosses a boundary.
    assert all(packed["labels"][0, s] == IGNORE_INDEX for s in starts)
    assert batch_counts(packed) == (sum(lengths), len(examples))
    assert batch_counts(collate(examples, 0)) == (sum(lengths), len(examples))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_logits_equal_the_padded_batch(tiny_model_dir, encoded, attn):
    tok, examples = encoded
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    padded, packed = collate(examples, tok.pad_token_id), pack(examples)
    with torch.no_grad():
        out_pad, out_pack = model(**padded, use_cache=False), model(**packed, use_cache=False)
    torch.testing.assert_close(out_pack.loss, out_pad.loss, rtol=1e-5, atol=1e-5)
    offset = 0
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        torch.testing.assert_close(out_pack.logits[0, offset : offset + n], out_pad.logits[i, :n], rtol=1e-4, atol=1e-4)
        offset += n
    # Without the restarted positions the examples would see each other: the logits differ.
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False)
    assert not torch.allclose(leaky.logits, out_pack.logits, atol=1e-3)


@pytest.mark.parametrize(
    ("model_type", "dims", "accepted"),
    [
        ("llama", {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}, True),
        ("bloom", {"hidden_size": 64, "n_head": 4}, False),  # builds its own mask: examples would see each other
        ("mamba", {"hidden_size": 64, "state_size": 4}, False),  # the recurrent state runs across examples
    ],
)
def test_packing_is_checked_on_the_models_own_architecture(tmp_path, model_type, dims, accepted):
    AutoConfig.for_model(model_type, vocab_size=300, num_hidden_layers=2, **dims).save_pretrained(tmp_path)
    if accepted:
        check_packing(str(tmp_path))
    else:
        with pytest.raises(ConfigError, match=rf"train\.packing: model type '{model_type}'"):
            check_packing(str(tmp_path))


def test_packing_refused_for_prompt_tuning():
    with pytest.raises(ConfigError, match=r"train\.packing"):
        load_config("jobs/prompt_tuning.yaml", ["train.packing=true"])


@pytest.mark.parametrize("packed", [False, True])
def test_answer_only_logits_give_the_models_own_loss_and_gradients(tiny_model_dir, encoded, packed):
    tok, examples = encoded
    batch = pack(examples) if packed else collate(examples, tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert answer_only_logits(model)
    losses, grads = [], []
    for answer_only in (False, True):
        model.zero_grad()
        loss = causal_lm_loss(model, batch, answer_only)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_prompt_tuning_keeps_the_models_own_loss(tiny_model_dir):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    assert not answer_only_logits(peft_model)

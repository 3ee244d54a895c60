import torch

from ray_ft.config import load_config
from ray_ft.export import read_metadata, write_artifact
from ray_ft.methods import get_method


def _cfg(model_dir, **extra):
    overrides = [f"model.name_or_path={model_dir}"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def test_lora_trains_only_adapters(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, **{"method.r": 4})
    model = get_method("lora").load_for_training(cfg, str(tiny_model_dir), torch.device("cpu"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # default targets for the llama family: attention and MLP projections
    assert any("q_proj.lora_A" in n for n in trainable) and any("down_proj.lora_B" in n for n in trainable)


def test_merge_round_trip_matches_adapter_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tiny_model_dir, **{"method.r": 4, "method.alpha": 8})
    method = get_method("lora")
    model = method.load_for_training(cfg, str(tiny_model_dir), torch.device("cpu"))
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero; give the adapter a real effect
            p.data.normal_(0, 0.2)
    model.eval()
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        expected = model(input_ids=x).logits
        base = model.get_base_model()
        with model.disable_adapter():
            plain = base(input_ids=x).logits
    assert not torch.allclose(expected, plain, atol=1e-4), "adapter had no effect"

    method.save_trainable(model, tmp_path / "adapter", None)
    out = write_artifact(
        tmp_path / "merged",
        lambda d: method.export(cfg, str(tiny_model_dir), tmp_path / "adapter", d),
        {"method": "lora", "artifact": "merged", "task": "generation"},
    )
    assert read_metadata(out)["method"] == "lora"
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(input_ids=x).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

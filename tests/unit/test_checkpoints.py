"""Checkpoints are verified (manifest, pickle globals) before anything is unpickled, and load weights-only."""

import pickle
from pathlib import Path

import pytest
import torch

from ray_ft.checkpoints import CheckpointError, safe_globals, seal_checkpoint, verify_checkpoint


class _RunsCode:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _deepspeed_like(directory: Path) -> Path:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    (directory / "ds").mkdir(parents=True)
    state = {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0), "w": torch.ones(3)}
    torch.save(state, directory / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (directory / "latest").write_text("ds")
    return directory


def test_sealed_checkpoint_verifies_and_loads_weights_only(tmp_path):
    ckpt = _deepspeed_like(tmp_path / "ckpt")
    seal_checkpoint(ckpt, 0)
    verify_checkpoint(ckpt)
    with torch.serialization.safe_globals(safe_globals()):
        state = torch.load(ckpt / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=True)
    assert state["w"].sum() == 3 and int(state["zero_stage"]) == 2


def test_unsealed_checkpoint_is_refused(tmp_path):
    ckpt = _deepspeed_like(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="ray-ft did not write it"):
        verify_checkpoint(ckpt)


def test_planted_file_is_refused(tmp_path):
    ckpt = _deepspeed_like(tmp_path / "ckpt")
    seal_checkpoint(ckpt, 0)
    (ckpt / "ds" / "extra.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="ds/extra.pt is not listed in any MANIFEST"):
        verify_checkpoint(ckpt)


def test_code_running_pickle_is_refused_without_running(tmp_path):
    ckpt = _deepspeed_like(tmp_path / "ckpt")
    marker = tmp_path / "code-ran"
    target = ckpt / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    seal_checkpoint(ckpt, 0)
    torch.save({"optimizer_state_dict": _RunsCode(marker)}, target)
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        verify_checkpoint(ckpt)
    seal_checkpoint(ckpt, 0)  # manifest rewritten to match
    with pytest.raises(CheckpointError, match="references io.open"):
        verify_checkpoint(ckpt)
    with torch.serialization.safe_globals(safe_globals()), pytest.raises(pickle.UnpicklingError):
        torch.load(target, weights_only=True)
    assert not marker.exists()


def test_garbage_pickle_is_refused(tmp_path):
    ckpt = _deepspeed_like(tmp_path / "ckpt")
    (ckpt / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\x80\x04garbage")
    seal_checkpoint(ckpt, 0)
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        verify_checkpoint(ckpt)

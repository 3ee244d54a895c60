import json

import pytest

from ray_ft.export import MANIFEST, ArtifactError, read_metadata, verify_manifest, write_artifact


def _write(d):
    (d / "weights.bin").write_bytes(b"\x00" * 1000)
    (d / "sub").mkdir()
    (d / "sub" / "x.json").write_text("{}")


def test_artifact_is_complete_and_verified(tmp_path):
    out = write_artifact(tmp_path / "model", _write, {"method": "lora"})
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert set(files) == {"weights.bin", "sub/x.json", "ray_ft.json"}
    assert read_metadata(out)["method"] == "lora"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_tampered_or_truncated_artifact_is_refused(tmp_path):
    out = write_artifact(tmp_path / "model", _write, {})
    (out / "weights.bin").write_bytes(b"\x00" * 999)
    with pytest.raises(ArtifactError, match="weights.bin does not match"):
        verify_manifest(out)
    (out / "weights.bin").unlink()
    with pytest.raises(ArtifactError, match="weights.bin is missing"):
        verify_manifest(out)


def test_failed_write_leaves_previous_artifact_intact(tmp_path):
    out = write_artifact(tmp_path / "model", _write, {"version": 1})

    def broken(d):
        (d / "half.bin").write_bytes(b"1")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_artifact(tmp_path / "model", broken, {"version": 2})
    assert read_metadata(out)["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_directory_without_manifest_is_not_a_model(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "ray_ft.json").write_text("{}")
    with pytest.raises(ArtifactError, match="no MANIFEST.json"):
        read_metadata(tmp_path / "half")

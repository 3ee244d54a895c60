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


def test_own_artifact_is_replaced(tmp_path):
    write_artifact(tmp_path / "merged", _write, {"version": 1})
    out = write_artifact(tmp_path / "merged", _write, {"version": 2})
    assert read_metadata(out)["version"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize(
    ("prepare", "reason"),
    [
        (lambda d: (d.mkdir(), (d / "my_model.safetensors").write_bytes(b"x")), "no readable MANIFEST.json"),
        (lambda d: d.write_text("a file"), "is not a directory"),
        (
            lambda d: (write_artifact(d, _write, {}), (d / "notes.md").write_text("mine")),
            "holds notes.md, which ray-ft did not write",
        ),
        (lambda d: (write_artifact(d, _write, {}), (d / "weights.bin").write_bytes(b"1")), "does not match"),
    ],
    ids=["foreign-dir", "file", "added-file", "changed-file"],
)
def test_what_ray_ft_did_not_write_is_never_replaced(tmp_path, prepare, reason):
    target = tmp_path / "merged"
    prepare(target)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    calls = []
    with pytest.raises(ArtifactError, match=reason) as e:
        write_artifact(target, lambda d: calls.append(d), {})
    assert str(target) in str(e.value) and "refusing" in str(e.value)
    assert calls == [], "nothing is written before the check"
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_symlinked_artifact_dir_is_not_followed(tmp_path):
    elsewhere = write_artifact(tmp_path / "elsewhere", _write, {"version": 1})
    out = tmp_path / "out"
    out.mkdir()
    (out / "merged").symlink_to(elsewhere)
    with pytest.raises(ArtifactError, match="is a symlink"):
        write_artifact(out / "merged", _write, {"version": 2})
    assert read_metadata(elsewhere)["version"] == 1


def test_manifest_cannot_point_outside_its_directory(tmp_path):
    out = write_artifact(tmp_path / "model", _write, {})
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["../../etc/passwd"] = {"size": 1, "sha256": "0"}
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside the directory"):
        verify_manifest(out)

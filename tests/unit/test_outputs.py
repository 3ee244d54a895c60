"""The output-path policy: where a run may write, and what it may replace there."""

import json
import os
import sys
from pathlib import Path

import pytest

import ray_ft
from ray_ft.cli import main
from ray_ft.outputs import MARKER, OutputPathError, check_output_dir, prepare_output_dir, write_file

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/", "a system directory"),
        ("/etc", "inside the system directory /etc"),
        ("/usr/local/share/x", "inside the system directory /usr"),
        ("/dev/null", "inside the system directory /dev"),
        ("/proc/self", "inside the system directory /proc"),
        ("/tmp", "a system directory"),
        ("/home", "a system directory"),
        ("~", "the home directory"),
        ("/tmp/../etc/ray-ft", "inside the system directory /etc"),
    ],
)
def test_system_and_home_dirs_are_refused(path, reason):
    with pytest.raises(OutputPathError) as e:
        check_output_dir(path)
    assert reason in str(e.value) and str(e.value).startswith(f"output_dir {path}")


def test_package_and_python_installation_are_refused():
    package = Path(ray_ft.__file__).parent
    for path in (package, package / "datasets" / "out", package.parent, Path(sys.prefix) / "out"):
        with pytest.raises(OutputPathError, match="ray_ft package|Python installation"):
            check_output_dir(path)


def test_symlink_to_a_system_dir_is_refused(tmp_path):
    link = tmp_path / "out"
    link.symlink_to("/etc")
    with pytest.raises(OutputPathError, match=r"= /etc\).*inside the system directory /etc"):
        check_output_dir(link)


def test_existing_file_and_file_parent_are_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(OutputPathError, match="notes.txt: a file"):
        check_output_dir(f)
    with pytest.raises(OutputPathError, match="cannot be created"):
        check_output_dir(f / "run")
    assert f.read_text() == "mine"


def test_foreign_non_empty_dir_is_refused_unless_resuming(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    with pytest.raises(OutputPathError, match="not empty and not written by ray-ft"):
        check_output_dir(tmp_path)
    assert check_output_dir(tmp_path, resume=True) == tmp_path.resolve()


def test_new_empty_and_earlier_run_dirs_are_accepted(tmp_path):
    assert check_output_dir(tmp_path / "new" / "run") == (tmp_path / "new" / "run").resolve()
    assert not (tmp_path / "new").exists(), "checking creates nothing"
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty")
    marked = prepare_output_dir(tmp_path / "marked")
    assert (marked / MARKER).is_file()
    (marked / "config.yaml").write_text("x: 1\n")
    check_output_dir(marked)
    old = tmp_path / "old-run"  # a run from before the marker existed
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"tracking_uri": "sqlite:///x", "run_id": "abc"}))
    (old / "config.yaml").write_text("output_dir: x\n")
    check_output_dir(old)
    lookalike = tmp_path / "other-project"  # a config.yaml that is not a ray-ft run's
    lookalike.mkdir()
    (lookalike / "config.yaml").write_text("name: other\n")
    with pytest.raises(OutputPathError):
        check_output_dir(lookalike)


def test_write_file_replaces_a_planted_symlink_instead_of_following_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").symlink_to(victim)
    write_file(out / "eval.json", "{}")
    assert victim.read_text() == "precious"
    assert not (out / "eval.json").is_symlink() and (out / "eval.json").read_text() == "{}"
    assert oct((out / "eval.json").stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in out.iterdir()) == ["eval.json"], "no temporary file left behind"


@pytest.mark.parametrize("output_dir", ["/", "/dev/null", str(Path.home())])
def test_cli_train_refuses_with_one_line_and_writes_nothing(output_dir, capsys):
    target = Path(output_dir)
    before = set(os.listdir(target)) if target.is_dir() else None
    assert main(["train", "jobs/lora.yaml", f"output_dir={output_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: output_dir {output_dir}"), err
    if before is not None:
        assert set(os.listdir(target)) == before


def test_cli_train_refuses_an_existing_file_without_traceback(tmp_path, capsys):
    f = tmp_path / "model.bin"
    f.write_bytes(b"weights")
    assert main(["train", "jobs/lora.yaml", f"output_dir={f}"]) == 2
    assert capsys.readouterr().err == f"error: output_dir {f}: a file\n"
    assert f.read_bytes() == b"weights"


def test_cli_train_refuses_a_foreign_dir(tmp_path, capsys):
    (tmp_path / "data.csv").write_text("a,b\n")
    assert main(["train", "jobs/lora.yaml", f"output_dir={tmp_path}"]) == 2
    assert "not empty and not written by ray-ft" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv"]


@pytest.mark.parametrize("command", ["tune", "compare"])
def test_tune_and_compare_refuse_unsafe_output_dirs_like_train(command, tmp_path, capsys):
    """The one output-path policy guards every command that writes a directory: one line, exit 2, nothing written."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    for output_dir, words in [("/", "output_dir /"), (str(foreign), "not empty and not written by ray-ft")]:
        if command == "tune":
            argv = ["tune", "jobs/tune_lora.yaml", f"output_dir={output_dir}"]
        else:
            argv = ["compare", "--methods", "lora", "--output-dir", output_dir]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

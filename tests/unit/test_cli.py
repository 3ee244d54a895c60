import json

from ray_ft.cli import main


def test_data_check_prints_counts(qa_file, capsys):
    assert main(["data", "check", str(qa_file)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "qa" and out["examples"] == 8


def test_data_check_bad_file_exits_2_with_locations(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    assert main(["data", "check", str(bad)]) == 2
    assert f"{bad}:2: answer: missing" in capsys.readouterr().err


def test_train_with_bad_data_exits_2_before_anything_runs(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    out = tmp_path / "out"
    assert main(["train", "jobs/lora.yaml", f"data.path={bad}", f"output_dir={out}"]) == 2
    assert f"{bad}:1: invalid JSON" in capsys.readouterr().err
    assert not out.exists()


def test_train_with_bad_config_exits_2(tmp_path, capsys):
    assert main(["train", "jobs/lora.yaml", "train.batch_size=0"]) == 2
    assert "train.batch_size: must be >= 1" in capsys.readouterr().err


def test_tune_deploy_refuses_a_busy_port_before_searching(tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["tune", "jobs/tune_lora.yaml", f"output_dir={tmp_path}/t", "--deploy", "--port", str(port)])
    assert code == 2
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert not (tmp_path / "t").exists(), "nothing may start before the port is known to be free"

"""Real storage and every record shape end to end: an S3-compatible server (moto) serves Parquet and JSON Lines
that a streamed run reads through ``s3://``; storage errors are one line; ShareGPT and Alpaca records train."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from conftest import QA_ROWS, tiny_overrides, write_jsonl

from ray_ft.config import load_config
from ray_ft.job import run_training

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
ROWS = [*QA_ROWS, *({"question": f"Câu hỏi số {i}?", "answer": f"Đáp án số {i}."} for i in range(16))]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free local port that checks credentials; yields ``(env, endpoint)`` where ``env``
    holds valid credentials for the ``data`` bucket, which holds ``qa/part-0.parquet`` and ``qa/part-1.jsonl``."""
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq
    import requests
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    admin = {"aws_access_key_id": "admin", "aws_secret_access_key": "admin", "region_name": "us-east-1"}
    iam = boto3.client("iam", endpoint_url=endpoint, **admin)
    iam.create_user(UserName="ray-ft")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="ray-ft", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="ray-ft")["AccessKey"]
    env = {
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    bucket = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    bucket.create_bucket(Bucket="data")
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(ROWS[:12]), sink)
    bucket.put_object(Bucket="data", Key="qa/part-0.parquet", Body=sink.getvalue().to_pybytes())
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS[12:])
    bucket.put_object(Bucket="data", Key="qa/part-1.jsonl", Body=lines.encode())
    bad_line = json.dumps({"question": "Câu hỏi?", "answer": 7}) + "\n"
    bucket.put_object(Bucket="data", Key="bad/part-0.jsonl", Body=(lines.splitlines(True)[0] + bad_line).encode())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist([ROWS[0], {"question": "Câu hỏi?", "answer": None}]), sink)
    bucket.put_object(Bucket="data", Key="bad/part-1.parquet", Body=sink.getvalue().to_pybytes())
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10)  # from now on, credentials count
    yield env
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    return s3


def test_storage_problems_are_one_line(s3_env, monkeypatch, capsys):
    from ray_ft.cli import main

    assert main(["data", "check", "s3://data/qa/*"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["files"], report["examples"]) == (2, len(ROWS))
    assert main(["data", "check", "s3://data/bad/part-0.jsonl"]) == 2  # a bad record is named as locally
    assert capsys.readouterr().err == "error: s3://data/bad/part-0.jsonl:2: answer: expected a string, got int\n"
    assert main(["data", "check", "s3://data/bad/part-1.parquet"]) == 2
    assert capsys.readouterr().err == "error: s3://data/bad/part-1.parquet: row 2: answer: missing\n"
    assert main(["data", "check", "s3://no-such-bucket/qa.jsonl"]) == 2
    assert capsys.readouterr().err == "error: s3://no-such-bucket/qa.jsonl: bucket 'no-such-bucket' not found\n"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    for path in ("s3://data/qa/part-1.jsonl", "s3://data/qa/*"):
        assert main(["data", "check", path]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: cannot ") and err.count("\n") == 1, err
        assert "ACCESS_DENIED" in err or "SIGNATURE_DOES_NOT_MATCH" in err


def test_streamed_run_reads_parquet_and_jsonl_from_s3(ray_local, s3_env, tiny_model_dir, tmp_path, capsys):
    """Remote data streams through Ray Data (read and split by Ray tasks, tokenised once); the run finishes."""
    from mlflow import MlflowClient

    from ray_ft.data import read_data, split

    out = tmp_path / "s3run"
    ov = tiny_overrides(
        tiny_model_dir,
        "s3://data/qa/*",
        out,
        tmp_path / "mlflow",
        **{"train.epochs": 1, "eval.enabled": "false", "train.batch_size": 1},
    )
    cfg = load_config(REPO / "jobs/lora.yaml", ov)
    local = write_jsonl(tmp_path / "same.jsonl", ROWS)
    train, val = split(read_data(local).records, cfg.data.val_fraction, cfg.data.seed)
    summary = run_training(cfg)
    printed = capsys.readouterr().out
    assert "data streamed through Ray Data: remote data (s3://data/qa/part-0.parquet)" in printed
    assert f"train {len(train)}, validation {len(val)}" in printed  # the same split as the same records locally
    steps = -(-len(train) // 2)  # one epoch, 2 workers x batch 1
    assert summary.metrics["step"] == steps
    client = MlflowClient(summary.tracking_uri)
    seen = {m.step: m.value for m in client.get_metric_history(summary.run_id, "samples_seen")}
    assert seen[steps] == 2 * steps
    assert client.get_metric_history(summary.run_id, "val_loss"), "the streamed validation set was not evaluated"
    assert (out / "merged" / "model.safetensors").is_file()


SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": "Trả lời ngắn gọn."},
            {"from": "human", "value": r["question"]},
            {"from": "gpt", "value": r["answer"]},
            {"from": "human", "value": "Cảm ơn!"},
            {"from": "gpt", "value": "Không có gì."},
        ]
    }
    for r in QA_ROWS
]
ALPACA = [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in QA_ROWS]


@pytest.mark.parametrize(("shape", "rows"), [("sharegpt", SHAREGPT), ("alpaca", ALPACA)])
def test_sharegpt_and_alpaca_records_train(ray_local, tiny_model_dir, tmp_path, capsys, shape, rows):
    data = write_jsonl(tmp_path / f"{shape}.jsonl", rows)
    ov = tiny_overrides(
        tiny_model_dir,
        data,
        tmp_path / shape,
        tmp_path / "mlflow",
        **{"scaling.num_workers": 0, "train.max_steps": 2, "eval.max_examples": 2},
    )
    summary = run_training(load_config(REPO / "jobs/lora.yaml", ov))
    assert f": {shape}, {len(rows)} examples" in capsys.readouterr().out
    assert summary.metrics["step"] == 2 and summary.metrics["loss"] > 0
    assert summary.evaluation["metrics"]["tuned"]["train"]["n"] == 2


def test_a_streamed_run_resumes_at_its_step(ray_local, tiny_model_dir, qa_file, tmp_path):
    """A resumed streamed run passes over the micro-batches its epoch already trained on and ends on time."""
    from mlflow import MlflowClient

    out = tmp_path / "resume"
    common = tiny_overrides(
        tiny_model_dir,
        qa_file,
        out,
        tmp_path / "mlflow",
        **{"data.streaming": "true", "train.batch_size": 1, "train.eval_every": 2, "eval.enabled": "false"},
    )
    first = run_training(load_config(REPO / "jobs/lora.yaml", [*common, "train.max_steps=2"]))
    second = run_training(load_config(REPO / "jobs/lora.yaml", [*common, "train.max_steps=5"]), resume=True)
    assert second.run_id == first.run_id and second.metrics["step"] == 5
    client = MlflowClient(second.tracking_uri)
    seen = {m.step: m.value for m in client.get_metric_history(second.run_id, "samples_seen")}
    assert seen == {step: 2.0 * step for step in range(1, 6)}  # 6 examples, 2 workers x 1: 3 steps an epoch


def test_streamed_training_records_come_piece_by_piece_in_a_new_order_each_pass(ray_local, tmp_path, monkeypatch):
    """The training side of a large file is read piece by piece in a seeded order that changes every pass (no
    shuffle of the whole set before the first record): every pass yields each training record exactly once."""
    import ray_ft.sources
    from ray_ft.data import check_data, record_key, summary_records
    from ray_ft.ingest import records_dataset

    rows = [{"question": f"câu hỏi {i}", "answer": f"trả lời {i}"} for i in range(400)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    monkeypatch.setattr(ray_ft.sources, "CHUNK_BYTES", 2000)
    summary = check_data(path, val_fraction=0.1, seed=5)
    assert len(summary.sources) >= 8
    want = sorted(
        record_key(r) for i in range(len(summary.sources)) for side, r in summary_records(summary, i) if side == "train"
    )
    dataset = records_dataset(summary, "train", shuffle_seed=5)
    assert "RandomShuffle" not in str(dataset)  # nothing waits for the whole data set
    passes = []
    for _ in range(3):
        got = [record_key(json.loads(r["record"])) for r in dataset.iter_rows()]
        assert sorted(got) == want and len(got) == summary.plan.n_train
        passes.append(got)
    assert len({tuple(p) for p in passes}) > 1, "every pass read the pieces in the same order"

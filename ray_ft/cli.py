"""The ``ray-ft`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ray_ft.config import ConfigError, ModelConfig, load_config
from ray_ft.data import DataError, check_data, read_jsonl
from ray_ft.export import ArtifactError, read_metadata
from ray_ft.logs import configure
from ray_ft.methods import get_method

# job, inference, evaluate and models import torch (seconds): they load inside the commands that use them.

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError, ArtifactError)


def _user_errors() -> tuple[type[Exception], ...]:
    from ray_ft.job import JobError

    return (*USER_ERRORS, JobError, ValueError, FileNotFoundError)


def cmd_data_check(args: argparse.Namespace) -> int:
    # One pass over the rows holding their split hashes only, so memory stays flat however large the data.
    ds = check_data(args.file, args.format, file_format=args.file_format)
    report = {"file": ds.path, "format": ds.format, "files": len({s.uri for s in ds.sources}), **ds.stats}
    if ds.labels:
        report["labels"] = dict(sorted(ds.labels.items()))
    print(json.dumps(report, ensure_ascii=False, indent=1))
    return 0


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from ray_ft.models import resolve_model_dir

    print(resolve_model_dir(ModelConfig(name_or_path=args.model)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ray_ft.job import run_training

    cfg = load_config(args.config, args.overrides)
    s = run_training(cfg, resume=args.resume)
    tuned = s.evaluation.get("metrics", {}).get("tuned", {})
    print(f"\n[ray-ft] done in {s.wall_s:.0f}s")
    print(f"  artifact:      {s.artifact_dir}")
    print(f"  output dir:    {s.output_dir}")
    print(f"  MLflow:        {s.tracking_uri}  run {s.run_id}")
    for split_name, m in tuned.items():
        print(f"  tuned {split_name}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, float)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ray_ft.inference import Generator

    gen = Generator.load(args.model_dir, trust_remote_code=args.trust_remote_code)
    for answer in gen.answer(args.questions, max_new_tokens=args.max_new_tokens, temperature=args.temperature):
        print(answer)
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    meta = read_metadata(args.model_dir)
    if meta.get("task") != "classification":
        raise ValueError(
            f"{args.model_dir}: not a classifier (task {meta.get('task', 'generation')!r}); use `ray-ft generate`"
        )
    classifier = get_method(meta["method"]).load_classifier(Path(args.model_dir), meta)
    for text, result in zip(args.texts, classifier.predict(args.texts), strict=True):
        print(json.dumps({"text": text, **result}, ensure_ascii=False))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ray_ft.evaluate import evaluate_generation
    from ray_ft.inference import Generator

    ds = read_jsonl(args.data)
    records = ds.records[: args.max_examples] if args.max_examples else ds.records
    meta = read_metadata(args.model_dir)
    if meta.get("task") == "classification":
        from ray_ft.evaluate import evaluate_classification

        if ds.format != "classification":
            raise ValueError(f"{args.data}: a classifier needs {{text, label}} data, got {ds.format!r}")
        classifier = get_method(meta["method"]).load_classifier(Path(args.model_dir), meta)
        result = evaluate_classification(classifier, records, classifier.labels)
    else:
        result = evaluate_generation(Generator.load(args.model_dir), records, max_new_tokens=args.max_new_tokens)
    if not args.predictions:
        result.pop("predictions")
    print(json.dumps(result, ensure_ascii=False, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray-ft", description="Fine-tune LLMs on Ray and serve them.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect training data").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="validate data files and print counts (exit 2 on bad data)")
    check.add_argument("file", help="a file, glob, save_to_disk directory or URI (s3://...)")
    check.add_argument(
        "--format", default="auto", choices=["auto", "qa", "io", "chat", "sharegpt", "alpaca", "classification"]
    )
    check.add_argument("--file-format", default="auto", choices=["auto", "jsonl", "json", "parquet", "csv", "arrow"])
    check.set_defaults(func=cmd_data_check)

    models = sub.add_parser("models", help="base models").add_subparsers(dest="models_command", required=True)
    prep = models.add_parser("prepare", help="convert a GGUF/embedded model into a cached HF directory")
    prep.add_argument("model", nargs="?", default="embedded:smollm2-135m-instruct")
    prep.set_defaults(func=cmd_models_prepare)

    train = sub.add_parser("train", help="train, evaluate and export one config")
    train.add_argument("config", help="YAML config (see jobs/)")
    train.add_argument("overrides", nargs="*", help="section.field=value overrides")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    train.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="answer questions with a tuned model")
    gen.add_argument("model_dir")
    gen.add_argument("questions", nargs="+")
    gen.add_argument("--max-new-tokens", type=int, default=96)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--trust-remote-code", action="store_true")
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="evaluate a model on a JSONL file (prints JSON)")
    ev.add_argument("model_dir")
    ev.add_argument("data")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--max-examples", type=int, default=None)
    ev.add_argument("--predictions", action="store_true", help="include every prediction in the output")
    ev.set_defaults(func=cmd_eval)

    cl = sub.add_parser("classify", help="label texts with a trained classifier (linear probe); JSON lines")
    cl.add_argument("model_dir", help="an exported classifier (OUTPUT_DIR/export)")
    cl.add_argument("texts", nargs="+")
    cl.set_defaults(func=cmd_classify)
    _add_tune(sub)
    _add_serve(sub)
    _add_submit(sub)
    _add_compare(sub)
    return p


def cmd_tune(args: argparse.Namespace) -> int:
    from ray_ft.tune import tune_command

    return tune_command(args.config, args.overrides, args.resume, args.deploy, args.host, args.port)


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="search LoRA r/alpha/learning rate with Ray Tune + ASHA; export the best trial")
    p.add_argument("config", help="YAML config with a `tune` section (see jobs/tune_lora.yaml)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides (e.g. tune.num_samples=8)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in output_dir")
    p.add_argument(
        "--deploy", action="store_true", help="serve the best trials' adapters (or the best model) after the search"
    )
    p.add_argument("--host", default="127.0.0.1", help="with --deploy: address to listen on")
    p.add_argument("--port", type=int, default=8000, help="with --deploy: port to listen on")
    p.set_defaults(func=cmd_tune)


def parse_replicas(text: str) -> tuple[int, int]:
    """``"1:2"`` -> ``(1, 2)``; ``"2"`` -> ``(2, 2)``."""
    low, sep, high = text.partition(":")
    try:
        bounds = (int(low), int(high)) if sep else (int(low), int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX or N, got {text!r}") from None
    if bounds[0] < 0 or bounds[1] < 1 or bounds[0] > bounds[1]:
        raise argparse.ArgumentTypeError(f"need 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return bounds


def cmd_serve(args: argparse.Namespace) -> int:
    from ray_ft.serving import parse_serve_args, serve

    min_replicas, max_replicas = args.replicas
    fields = {
        "models": args.models,
        "model_names": args.model_name or None,
        "api_key": args.api_key,
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "num_cpus": args.num_cpus,
        "num_gpus": args.num_gpus,
    }
    if args.request_timeout_s is not None:
        fields["request_timeout_s"] = args.request_timeout_s
    return serve(parse_serve_args(fields, source="ray-ft serve"), args.host, args.port)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve tuned models over an OpenAI-compatible HTTP API (Ray Serve + vLLM)",
        description=(
            "Serve MODEL ... until SIGINT/SIGTERM. Each MODEL is a training output directory, an artifact "
            "(merged/, export/) or a Hugging Face model directory; LoRA/QLoRA outputs sharing a base are served "
            "as adapters of one engine, each under its directory's name. The API key defaults to $RAY_FT_API_KEY."
        ),
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="output or model directories")
    p.add_argument(
        "--model-name",
        action="append",
        default=[],
        help="model id in the API, once per MODEL in order (default: each directory's name)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $RAY_FT_API_KEY)")
    p.add_argument(
        "--replicas", type=parse_replicas, default=(1, 2), metavar="MIN:MAX", help="autoscaling bounds (default 1:2)"
    )
    p.add_argument("--num-cpus", type=float, default=1.0, help="logical CPUs per replica (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (default 0)")
    p.add_argument("--request-timeout-s", type=float, default=None, help="504 after this many seconds (default 300)")
    p.set_defaults(func=cmd_serve)


def cmd_submit(args: argparse.Namespace) -> int:
    from ray_ft.submit import SubmitRequest, submit

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    return submit(SubmitRequest(**fields))


def _add_submit(sub: argparse._SubParsersAction) -> None:
    from ray_ft.submit import DEFAULT_ADDRESS, RUNTIME_ENV_FILE

    p = sub.add_parser(
        "submit",
        help="run `ray-ft train CONFIG` as a Ray Job on a cluster and stream its logs",
        description=(
            "Submit `ray-ft train CONFIG [ARGS]` to a Ray cluster through the Jobs API, uploading the "
            "working dir. Exit code: 0 SUCCEEDED, 1 FAILED/STOPPED, 2 bad input or unreachable cluster."
        ),
    )
    p.add_argument("config", help="experiment YAML inside the working dir (see jobs/)")
    p.add_argument(
        "train_args",
        nargs="*",
        metavar="ARGS",
        help="section.field=value overrides and other `ray-ft train` arguments (after `--`, options too)",
    )
    p.add_argument(
        "--address", help=f"Jobs API URL (default: $RAY_API_SERVER_ADDRESS, an http $RAY_ADDRESS, {DEFAULT_ADDRESS})"
    )
    p.add_argument("--no-wait", action="store_true", help="print the job id and return once it is submitted")
    p.add_argument("--resume", action="store_true", help="pass --resume to `ray-ft train`")
    p.add_argument(
        "--no-local-check",
        dest="local_check",
        action="store_false",
        help="skip validating the config locally (the job then reports any config error itself)",
    )
    p.add_argument("--working-dir", help="directory uploaded as the job's working dir (default: current dir)")
    p.add_argument("--runtime-env", help=f"runtime environment YAML (default: WORKING_DIR/{RUNTIME_ENV_FILE})")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra env var for the job")
    p.add_argument("--job-id", help="submission id (default: generated by Ray)")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the job's driver (default 0)")
    p.add_argument(
        "--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver (its export/evaluation then use one)"
    )
    p.set_defaults(func=cmd_submit)


def cmd_compare(args: argparse.Namespace) -> int:
    from ray_ft.compare import compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return compare(methods, args.output_dir, args.overrides, args.config_dir)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    from ray_ft.compare import METHODS

    p = sub.add_parser("compare", help="train every tuning method on the shipped data and tabulate cost/quality")
    p.add_argument("overrides", nargs="*", help="key=value for every method, or METHOD:key=value for one")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset (default: all four)")
    p.add_argument("--output-dir", default="outputs/compare")
    p.add_argument("--config-dir", default=None, help="where <method>.yaml live (default: jobs/)")
    p.set_defaults(func=cmd_compare)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

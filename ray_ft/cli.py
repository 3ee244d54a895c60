"""The ``ray-ft`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
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
    for extend in EXTENSIONS:
        extend(sub)
    return p


EXTENSIONS: list[Callable[[argparse._SubParsersAction], None]] = []
"""Functions adding more subcommands (tune, serve, submit, ...), registered by their modules."""


def _load_extensions() -> None:
    import importlib

    for mod in ("ray_ft.tune", "ray_ft.serving", "ray_ft.submit", "ray_ft.compare"):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        if hasattr(module, "add_cli") and module.add_cli not in EXTENSIONS:
            EXTENSIONS.append(module.add_cli)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure()
    _load_extensions()
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

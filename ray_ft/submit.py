"""``ray-ft submit``: run ``ray-ft train CONFIG`` as a Ray Job on a running cluster.

The job is submitted through the Ray Jobs API (``ray.job_submission.JobSubmissionClient``) with the
runtime environment of ``cluster/runtime_env.yaml``: the project directory is uploaded as the job's
``working_dir``, so the job sees ``jobs/``, the bundled data and this version of the ``ray_ft``
package (Ray puts the working dir first on ``PYTHONPATH`` of the driver and of every worker, so it
takes precedence over a copy installed on the nodes; third-party packages come from the nodes).

The config is validated here first, so a typo fails in a second with exit code 2 instead of after
the upload. The job's logs are streamed until it ends; the exit code is 0 when it ``SUCCEEDED``
and 1 when it ``FAILED`` or was ``STOPPED``.

Token authentication is the Jobs client's own: with ``RAY_AUTH_MODE=token`` in the environment it sends
``Authorization: Bearer <token>`` with the token from ``RAY_AUTH_TOKEN``, else the file
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` (as the ``ray job`` CLI does).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ray_ft import logs

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
RUNTIME_ENV_FILE = Path("cluster") / "runtime_env.yaml"
DEFAULT_EXCLUDES = [".venv/", ".git/", "outputs/", "mlruns/", ".cache/", "__pycache__/"]
"""Used when the working dir has no ``cluster/runtime_env.yaml`` and none is given."""


class SubmitError(RuntimeError):
    """A submission that cannot go ahead (bad arguments, unreachable cluster, rejected token)."""


def api_address(explicit: str | None = None) -> str:
    """The Jobs API URL: ``--address``, else ``RAY_API_SERVER_ADDRESS``, else an ``http(s)://`` ``RAY_ADDRESS``.

    A ``RAY_ADDRESS`` without a scheme is a GCS address (``host:6379``), not the Jobs API, and is skipped.
    """
    for candidate in (explicit, os.environ.get("RAY_API_SERVER_ADDRESS")):
        if candidate:
            return candidate if "://" in candidate else f"http://{candidate}"
    ray_address = os.environ.get("RAY_ADDRESS", "")
    if ray_address.startswith(("http://", "https://")):
        return ray_address
    return DEFAULT_ADDRESS


def load_runtime_env(path: Path | None, working_dir: Path | None, env: list[str]) -> dict[str, Any]:
    """The job's runtime environment: the YAML file, a local ``working_dir`` made absolute, ``--env`` added.

    Args:
        path: a runtime-env YAML (``None``: ``WORKING_DIR/cluster/runtime_env.yaml`` when it exists).
        working_dir: the directory to upload; ``None`` keeps the file's ``working_dir`` (relative to the
            current directory, as ``ray job submit`` reads it) or the current directory.
        env: ``KEY=VALUE`` items added to ``env_vars``.

    Raises:
        SubmitError: unreadable file, not a mapping, bad ``env_vars`` or ``--env`` item, missing working dir.
    """
    base = (working_dir or Path.cwd()).resolve()
    if path is None and (base / RUNTIME_ENV_FILE).is_file():
        path = base / RUNTIME_ENV_FILE
    runtime_env: dict[str, Any] = {"working_dir": ".", "excludes": list(DEFAULT_EXCLUDES)}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise SubmitError(f"{path}: cannot read the runtime environment ({e.strerror})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise SubmitError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(loaded, dict):
            raise SubmitError(f"{path}: a runtime environment must be a mapping, got {type(loaded).__name__}")
        runtime_env = loaded
    env_vars = dict(runtime_env.get("env_vars") or {})
    for key, value in env_vars.items():
        if not isinstance(value, str):
            raise SubmitError(f"{path}: env_vars.{key}: must be a string (quote it), got {value!r}")
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {item!r}: expected KEY=VALUE")
        env_vars[key] = value
    if env_vars:
        runtime_env["env_vars"] = env_vars

    wd = runtime_env.get("working_dir")
    if working_dir is not None:
        wd = str(base)
    elif wd is None or "://" not in str(wd):
        wd = str((Path.cwd() / (wd or ".")).resolve())
    if "://" not in wd and not Path(wd).is_dir():
        raise SubmitError(f"working dir {wd} does not exist")
    runtime_env["working_dir"] = wd
    return runtime_env


def config_path_in_job(config: str, runtime_env: dict[str, Any]) -> str:
    """``config`` as the job sees it: relative to the uploaded working dir (the job's current directory).

    Raises:
        SubmitError: the config lies outside the local working dir, so the job would not have it.
    """
    wd = runtime_env["working_dir"]
    if "://" in wd:  # a remote package: the path is taken as it is inside that package
        return config
    rel = os.path.relpath(Path(config).resolve(), wd)
    if rel == ".." or rel.startswith("../"):
        raise SubmitError(
            f"{config}: the config is outside the working dir {wd} that is uploaded to the cluster; "
            "run from the project root, or pass --working-dir"
        )
    return rel


def check_config(config: str, overrides: list[str], runtime_env: dict[str, Any]) -> None:
    """Validate the config here as the job will load it (raises ``ConfigError`` / ``SubmitError``)."""
    from ray_ft.config import load_config

    cfg = load_config(config, overrides)
    if not _is_absolute(cfg.output_dir):
        raise SubmitError(
            f"{config}: output_dir {cfg.output_dir!r} is relative: in a Ray Job it would land in the job's "
            "temporary working dir on the head node; pass an absolute path every node can reach, "
            "e.g. output_dir=/mnt/shared/runs/NAME"
        )
    if cfg.scaling.storage_path and not _is_absolute(cfg.scaling.storage_path):
        raise SubmitError(f"{config}: scaling.storage_path {cfg.scaling.storage_path!r} must be absolute or a URI")
    wd = runtime_env["working_dir"]
    if "://" not in wd and not _is_absolute(cfg.data.path) and not (Path(wd) / cfg.data.path).is_file():
        raise SubmitError(f"{config}: data.path {cfg.data.path!r} is not a file under the working dir {wd}")
    if cfg.scaling.address:
        print(
            f"[ray-ft] warning: scaling.address={cfg.scaling.address} makes the job's driver connect there "
            "instead of to the cluster that runs the job",
            file=sys.stderr,
        )


def _is_absolute(path: str) -> bool:
    return "://" in path or Path(path).expanduser().is_absolute() or path.startswith("~")


def train_entrypoint(config_in_job: str, train_args: list[str]) -> str:
    """The job's shell command: ``python -m ray_ft.cli train CONFIG ARGS...`` (each part quoted)."""
    return shlex.join(["python", "-m", "ray_ft.cli", "train", config_in_job, *train_args])


def connect(address: str):
    """A ``JobSubmissionClient`` for ``address``; it sends the cluster token when ``RAY_AUTH_MODE=token``.

    Raises:
        SubmitError: the Jobs API cannot be reached or rejects the request.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:  # the client checks the connection and the token (GET /api/version) right away
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, AuthenticationError) as e:
        token_auth = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
        hint = "" if token_auth else " (a cluster with token auth needs RAY_AUTH_MODE=token here too)"
        raise SubmitError(f"Ray Jobs API at {address}: {e}{hint}") from None


def follow(client, job_id: str, stream_logs: bool = True, poll_s: float = 1.0):
    """Stream the job's logs to stdout until it ends; return its final ``JobStatus``."""
    if stream_logs:

        async def _tail() -> None:
            async for chunk in client.tail_job_logs(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()

        try:
            asyncio.run(_tail())
        except RuntimeError as e:  # the log stream broke off; the job itself may still be running
            print(f"[ray-ft] log stream of {job_id} ended early ({e}); waiting for the job", file=sys.stderr)
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(poll_s)


@dataclass(frozen=True)
class SubmitRequest:
    """What ``ray-ft submit`` was asked to do (parsed by ``ray_ft.cli``)."""

    config: str
    train_args: list[str] = field(default_factory=list)
    address: str | None = None
    no_wait: bool = False
    resume: bool = False
    local_check: bool = True
    working_dir: str | None = None
    runtime_env: str | None = None
    env: list[str] = field(default_factory=list)
    job_id: str | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None


def submit(request: SubmitRequest) -> int:
    """Submit ``ray-ft train`` as a Ray Job and follow it. Exit code: 0 SUCCEEDED, 1 FAILED/STOPPED, 2 bad input
    or unreachable cluster, 130 interrupted while following."""
    logs.configure()
    try:
        return _submit(request)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _submit(args: SubmitRequest) -> int:
    train_args = list(args.train_args)
    if args.resume:
        train_args.append("--resume")
    overrides = [a for a in train_args if not a.startswith("-")]
    runtime_env = load_runtime_env(
        Path(args.runtime_env) if args.runtime_env else None,
        Path(args.working_dir) if args.working_dir else None,
        args.env,
    )
    config_in_job = config_path_in_job(args.config, runtime_env)
    if args.local_check:
        check_config(args.config, overrides, runtime_env)
    entrypoint = train_entrypoint(config_in_job, train_args)
    address = api_address(args.address)
    client = connect(address)
    # Ray lists every ignore file it applies while packaging; keep its warnings (large files), drop the rest.
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)

    logger.info("[ray-ft] submitting to %s: %s", address, entrypoint)
    logger.info("[ray-ft] working dir %s", runtime_env["working_dir"])
    t0 = time.time()
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=args.job_id,
            metadata={"ray_ft.config": config_in_job, "ray_ft.submitted_by": "ray-ft submit"},
            entrypoint_num_cpus=args.entrypoint_num_cpus,
            entrypoint_num_gpus=args.entrypoint_num_gpus,
        )
    except RuntimeError as e:
        raise SubmitError(f"the cluster refused the job: {e}") from None
    where = f"--address {address}"
    logger.info("[ray-ft] job %s submitted", job_id)
    if args.no_wait:
        logger.info("[ray-ft] follow it with: ray job logs --follow %s %s", job_id, where)
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        logger.info(
            "\n[ray-ft] stopped following %s; it keeps running (stop it: ray job stop %s %s)", job_id, job_id, where
        )
        return 130
    info = client.get_job_info(job_id)
    wall = time.time() - t0
    logger.info("\n[ray-ft] job %s %s in %.0fs", job_id, status.value, wall)
    if status.value != "SUCCEEDED":
        reason = (info.message or "no message").splitlines()[0].split(", last available logs")[0]
        print(f"[ray-ft] {reason} (logs: ray job logs {job_id} {where})", file=sys.stderr)
        return 1
    return 0

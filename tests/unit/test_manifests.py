"""Every cluster manifest parses and refers only to what exists: files of this repo, `ray-ft` subcommands
the CLI knows, configs in jobs/ that load, the installed Ray version, names defined by sibling manifests.
Also the pieces of `ray-ft submit` that need no cluster (address, token, runtime env, config checks)."""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from ray_ft.cli import build_parser
from ray_ft.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
SHIPPED_YAML = sorted(CLUSTER.rglob("*.yaml"))
SHARED_MOUNT = "/mnt/shared"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def makefile_var(name: str) -> str:
    return re.search(rf"^{name} \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def subcommands(parser) -> set[str]:
    return set(parser._subparsers._group_actions[0].choices)


def ray_ft_commands(shell: str) -> list[list[str]]:
    """Each `ray-ft ...` invocation in a shell command line, as argv without `ray-ft`."""
    out = []
    for m in re.finditer(r"(?:^|[\s;&|(])ray-ft\s+([^;&|)\n]+)", shell):
        out.append(shlex.split(m.group(1)))
    return out


def check_train_command(parser, argv: list[str]):
    """`ray-ft train CONFIG overrides` parses and its config loads with those overrides; the config."""
    args = parser.parse_args(argv)
    assert args.command == "train", argv
    config = REPO / args.config
    assert config.is_file() and config.parent.name == "jobs", args.config
    cfg = load_config(config, args.overrides)
    for path in (cfg.output_dir, cfg.scaling.storage_path):
        assert path and path.startswith(SHARED_MOUNT + "/"), f"{path} is not on the shared volume"
    return cfg


# --------------------------------------------------------------------------- every file


@pytest.mark.parametrize("path", SHIPPED_YAML, ids=lambda p: str(p.relative_to(REPO)))
def test_every_cluster_yaml_parses(path):
    documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert documents and all(isinstance(d, dict) for d in documents)


def test_expected_manifests_are_shipped():
    names = {str(p.relative_to(CLUSTER)) for p in SHIPPED_YAML}
    assert {"runtime_env.yaml", "aws-gpu.yaml", "kuberay/rayjob-finetune.yaml", "kuberay/rayservice.yaml"} <= names


@pytest.mark.parametrize("script", ["local-up.sh", "local-down.sh"])
def test_cluster_scripts_are_valid_bash(script):
    path = CLUSTER / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_local_down_refuses_without_a_recorded_cluster(tmp_path):
    r = subprocess.run(
        ["bash", str(CLUSTER / "local-down.sh")],
        env={"PATH": "/usr/bin:/bin", "RAY_FT_CLUSTER_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and f"no cluster recorded in {tmp_path}/cluster.env" in r.stderr


def test_local_up_validates_its_settings_before_starting_anything(tmp_path):
    r = subprocess.run(
        ["bash", str(CLUSTER / "local-up.sh")],
        env={"PATH": "/usr/bin:/bin", "RAY_FT_CLUSTER_DIR": str(tmp_path), "RAY_FT_WORKER_NODES": "0"},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "RAY_FT_WORKER_NODES must be >= 1" in r.stderr
    assert not (tmp_path / "cluster.env").exists()


# --------------------------------------------------------------------------- runtime env


def test_runtime_env_is_valid_and_keeps_heavy_dirs_out():
    from ray.runtime_env import RuntimeEnv

    env = load(CLUSTER / "runtime_env.yaml")
    assert set(env) <= RuntimeEnv.known_fields
    RuntimeEnv(**env)  # types, env_vars values are strings
    assert env["working_dir"] == "."
    assert {".venv/", ".git/", "outputs/", "mlruns/", ".cache/"} <= set(env["excludes"])
    assert "RAY_AUTH_TOKEN" not in env.get("env_vars", {})


def test_submit_runtime_env_uploads_the_project_root(monkeypatch):
    from ray_ft.submit import config_path_in_job, load_runtime_env

    monkeypatch.chdir(REPO)
    env = load_runtime_env(None, None, ["MLFLOW_TRACKING_URI=http://mlflow:5000"])
    assert env["working_dir"] == str(REPO)
    assert env["excludes"] == load(CLUSTER / "runtime_env.yaml")["excludes"]
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert config_path_in_job(str(REPO / "jobs/lora.yaml"), env) == "jobs/lora.yaml"


# --------------------------------------------------------------------------- ray up


def test_aws_cluster_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(CLUSTER / "aws-gpu.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert config["head_node_type"] in config["available_node_types"]


def test_aws_cluster_config_refers_to_what_exists(parser):
    config = load(CLUSTER / "aws-gpu.yaml")
    for remote, local in config["file_mounts"].items():
        if not local.startswith("~"):  # "~/..." are the user's files (the token)
            assert (REPO / local).exists(), f"file_mounts {remote}: {local} missing"
    commands = [c for key in config if key.endswith("_commands") for c in config[key]]
    shell = "\n".join(commands)
    assert f"torch=={makefile_var('TORCH_VERSION')}" in shell
    assert f'--no-build-isolation "deepspeed=={makefile_var("DEEPSPEED_VERSION")}"' in shell
    assert "pip install -q ~/ray-ft" in shell and "~/ray-ft" in config["file_mounts"]
    invoked = [argv for c in commands for argv in ray_ft_commands(c)]
    assert invoked, "no ray-ft command in the setup"
    for argv in invoked:
        parser.parse_args(argv)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in "\n".join(config[key]), f"{key} must start Ray with token auth"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_dockerfile_matches_ray_and_the_makefile():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in text
    assert f"ARG TORCH_VERSION={makefile_var('TORCH_VERSION')}" in text
    assert f"ARG DEEPSPEED_VERSION={makefile_var('DEEPSPEED_VERSION')}" in text
    for m in re.finditer(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for source in m.group(1).split():
            assert (REPO / source).exists(), f"COPY {source}: missing"
    assert re.search(r"^WORKDIR /app$", text, re.M)


# --------------------------------------------------------------------------- KubeRay


def pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def check_ray_cluster_spec(spec: dict, images: set[str]) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token", "token authentication must stay on"
    pvc = load(KUBERAY / "shared-storage.yaml")["metadata"]["name"]
    for pod in pod_specs(spec):
        images.update(c["image"] for c in pod["containers"])
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {pvc}
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert SHARED_MOUNT in mounts


def created_secrets(path: Path) -> set[str]:
    return set(re.findall(r"kubectl create secret generic (\S+)", path.read_text()))


def referenced_secrets(node) -> set[str]:
    found = set()
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            found.add(node["secretKeyRef"]["name"])
        if "secretName" in node and isinstance(node["secretName"], str):
            found.add(node["secretName"])
        for v in node.values():
            found |= referenced_secrets(v)
    elif isinstance(node, list):
        for v in node:
            found |= referenced_secrets(v)
    return found


def test_rayjob_runs_a_known_command_on_a_loadable_config(parser):
    path = KUBERAY / "rayjob-finetune.yaml"
    job = load(path)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "ray-ft"
    cfg = check_train_command(parser, argv[1:])

    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    shared_env = load(CLUSTER / "runtime_env.yaml")
    assert runtime_env["working_dir"] == "/app"  # the Dockerfile's WORKDIR
    assert runtime_env["excludes"] == shared_env["excludes"]
    assert runtime_env["env_vars"] == shared_env["env_vars"]

    images: set[str] = set()
    check_ray_cluster_spec(job["spec"]["rayClusterSpec"], images)
    images.update(c["image"] for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"])
    assert len(images) == 1, images
    assert referenced_secrets(job) <= created_secrets(path)

    mlflow = list(yaml.safe_load_all((KUBERAY / "mlflow.yaml").read_text()))
    service = next(d for d in mlflow if d["kind"] == "Service")
    port = service["spec"]["ports"][0]["port"]
    assert cfg.tracking.tracking_uri == f"http://{service['metadata']['name']}:{port}"


def test_rayservice_builds_ray_ft_serving_with_valid_args():
    from ray.serve.schema import ServeDeploySchema

    path = KUBERAY / "rayservice.yaml"
    service = load(path)
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    assert app["import_path"] == "ray_ft.serving:build_app"
    assert app["import_path"] == load(REPO / "serve/config.yaml")["applications"][0]["import_path"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    serving = importlib.import_module("ray_ft.serving")
    args = serving.ServeArgs.model_validate(app["args"])
    assert all(m.startswith(SHARED_MOUNT + "/") for m in args.models)
    assert args.num_gpus >= 1

    images: set[str] = set()
    check_ray_cluster_spec(service["spec"]["rayClusterConfig"], images)
    assert len(images) == 1, images
    assert referenced_secrets(service) <= created_secrets(path)


def test_kuberay_images_are_built_by_the_dockerfile():
    documents = [d for p in sorted(KUBERAY.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    images = set(re.findall(r"image: (\S+)", "\n".join(yaml.safe_dump(d) for d in documents)))
    assert images == {"ray-ft:0.1.0-gpu"}
    assert "-t REGISTRY/ray-ft:0.1.0-gpu" in (CLUSTER / "Dockerfile").read_text()


# --------------------------------------------------------------------------- docs


def test_docs_mention_only_existing_commands_and_files(parser):
    text = (REPO / "docs" / "cluster.md").read_text()
    code = "\n".join(re.findall(r"```\w*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text))
    known = subcommands(parser)
    mentioned = set(re.findall(r"(?<![\w/.-])ray-ft ([a-z][a-z-]*)", code))
    assert {"submit", "train"} <= mentioned
    for name in mentioned:
        assert name in known, f"docs/cluster.md mentions unknown `ray-ft {name}`"
    repo_path = r"(?<![\w/.-])((?:cluster|jobs|serve)/[\w./-]+\.(?:yaml|sh|md|jsonl)|cluster/Dockerfile)"
    for rel in set(re.findall(repo_path, text)):
        assert (REPO / rel).exists(), f"docs/cluster.md mentions missing {rel}"
    parsed = 0
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for argv in ray_ft_commands(block.replace("\\\n", " ")):
            if argv and argv[0] in ("train", "submit"):
                parser.parse_args([a for a in argv if not a.startswith("$")])
                parsed += 1
    assert parsed >= 3


# --------------------------------------------------------------------------- ray-ft submit, no cluster


def test_submit_address_precedence(monkeypatch):
    from ray_ft.submit import DEFAULT_ADDRESS, api_address

    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert api_address() == DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # a GCS address is not the Jobs API
    assert api_address() == DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert api_address() == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "head2:8265")
    assert api_address() == "http://head2:8265"
    assert api_address("https://ray.example:443") == "https://ray.example:443"


def test_submit_unreachable_cluster_is_one_line_naming_the_token_mode(monkeypatch):
    """The token itself is the Jobs client's business; a refused connection says how to turn it on."""
    from ray_ft.submit import SubmitError, connect

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(SubmitError, match=r"^Ray Jobs API at http://127\.0\.0\.1:9: .*RAY_AUTH_MODE=token") as e:
        connect("http://127.0.0.1:9")
    assert "Traceback" not in str(e.value)


def test_submit_refuses_bad_input_before_contacting_a_cluster(monkeypatch, tmp_path, capsys):
    from ray_ft.cli import main

    monkeypatch.chdir(REPO)
    dead = ["--address", "http://127.0.0.1:9"]
    assert main(["submit", *dead, "jobs/lora.yaml", "train.lrr=1e-3", "output_dir=/x"]) == 2
    assert "jobs/lora.yaml (with overrides): train.lrr: unknown key" in capsys.readouterr().err
    assert main(["submit", *dead, "jobs/lora.yaml"]) == 2
    assert "output_dir 'outputs/lora' is relative" in capsys.readouterr().err
    outside = tmp_path / "exp.yaml"
    outside.write_text((REPO / "jobs/lora.yaml").read_text())
    assert main(["submit", *dead, str(outside), "output_dir=/x"]) == 2
    assert "outside the working dir" in capsys.readouterr().err
    assert main(["submit", *dead, "jobs/lora.yaml", "output_dir=/x", "data.path=missing.jsonl"]) == 2
    assert "data.path 'missing.jsonl' is not a file under the working dir" in capsys.readouterr().err
    assert main(["submit", *dead, "--env", "NOEQUALS", "jobs/lora.yaml", "output_dir=/x"]) == 2
    assert "--env 'NOEQUALS': expected KEY=VALUE" in capsys.readouterr().err
    # A valid config gets as far as the (unreachable) cluster, and says so.
    assert main(["submit", *dead, "jobs/lora.yaml", "output_dir=/x"]) == 2
    assert "Ray Jobs API at http://127.0.0.1:9" in capsys.readouterr().err


def test_submit_entrypoint_quotes_every_argument():
    from ray_ft.submit import train_entrypoint

    cmd = train_entrypoint("jobs/lora.yaml", ["data.template=Q: {question} A: {answer}", "--resume"])
    assert shlex.split(cmd) == [
        *("python", "-m", "ray_ft.cli", "train", "jobs/lora.yaml"),
        *("data.template=Q: {question} A: {answer}", "--resume"),
    ]

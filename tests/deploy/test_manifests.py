"""The deployment files under deploy/ checked against the code they deploy, without a Ray cluster.

Serve configs: Ray's own `ServeDeploySchema` (plus a check for keys it would silently ignore), mode_ray's
`AppArgs` (so the YAML cannot drift from the code), the servicer functions, and the builder itself.
KubeRay manifests: the embedded Serve config, GPU workers, ports, token auth, secrets and volumes.
The RayJob entrypoint is parsed by the CLI's own click parser. The Dockerfile: non-root, installs the project.
"""

from __future__ import annotations

import importlib
import inspect
import json
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.version import Version
from pydantic import BaseModel
from ray.serve.schema import (
    HTTPOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
    gRPCOptionsSchema,
)

from mode_ray.serve.config import APP_NAME, GRPC_SERVICER_FUNCTIONS, AppArgs

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
SERVE_CONFIGS = sorted((DEPLOY / "serve").glob("*.yaml"))
RAYSERVICE = DEPLOY / "kuberay" / "rayservice.yaml"
RAYJOB = DEPLOY / "kuberay" / "rayjob-train-expert.yaml"
SECRETS = DEPLOY / "kuberay" / "secrets.example.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
IMAGE = "ghcr.io/your-org/mode-ray:0.1.0"


# ---- helpers ---------------------------------------------------------------------------------------------
def load_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML documents"
    return docs


def one_of_kind(path: Path, kind: str) -> dict[str, Any]:
    found = [d for d in load_docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path}: expected exactly one {kind}, found {len(found)}"
    return found[0]


def unknown_keys(data: dict[str, Any], model: type[BaseModel], where: str) -> list[str]:
    """Keys a (forward-compatible, extra-ignoring) Ray schema would silently drop: typos, mostly."""
    names = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    return [f"{where}.{k}" for k in data if k not in names]


def check_serve_config(cfg: dict[str, Any], where: str) -> tuple[ServeDeploySchema, dict[str, Any], AppArgs]:
    """Everything a Serve config for mode_ray must satisfy; returns the schema, the app entry and its args."""
    schema = ServeDeploySchema.model_validate(cfg)
    typos = unknown_keys(cfg, ServeDeploySchema, where)
    typos += unknown_keys(cfg.get("http_options") or {}, HTTPOptionsSchema, f"{where}.http_options")
    typos += unknown_keys(cfg.get("grpc_options") or {}, gRPCOptionsSchema, f"{where}.grpc_options")
    for i, app in enumerate(cfg["applications"]):
        typos += unknown_keys(app, ServeApplicationSchema, f"{where}.applications[{i}]")
    assert not typos, f"keys Ray's schema does not know (ignored at deploy time): {typos}"

    apps = {a["name"]: a for a in cfg["applications"]}
    assert list(apps) == [APP_NAME], f"{where}: one application named {APP_NAME!r}, got {list(apps)}"
    app = apps[APP_NAME]
    assert app["route_prefix"] == "/"
    assert app["import_path"] == "mode_ray.serve.app:build_app"
    args = AppArgs.model_validate(app.get("args") or {})

    assert schema.grpc_options.grpc_servicer_functions == GRPC_SERVICER_FUNCTIONS, (
        f"{where}: grpc_servicer_functions must equal mode_ray.serve.config.GRPC_SERVICER_FUNCTIONS"
    )
    # The router reaches the experts through the gRPC proxy on its own node at a loopback address: that
    # proxy must listen on grpc_options.port, and exist on every node that runs a replica.
    host, _, port = args.grpc_target.rpartition(":")
    assert host in ("127.0.0.1", "localhost", "[::1]"), f"{where}: grpc_target {args.grpc_target!r}"
    assert int(port) == schema.grpc_options.port, f"{where}: grpc_target port != grpc_options.port"
    assert schema.proxy_location.value == "EveryNode", (
        f"{where}: proxy_location must be EveryNode (grpc_target is the router's local proxy)"
    )
    env_state = (app.get("runtime_env") or {}).get("env_vars", {}).get("MODE_RAY_STATE_DIR")
    if env_state is not None:
        assert Path(env_state) == args.state_dir, f"{where}: MODE_RAY_STATE_DIR != args.state_dir"
    return schema, app, args


def ray_containers(cluster_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The Ray container (index 0, as KubeRay assumes) of the head and of each worker group."""
    out = {"head": cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for group in cluster_spec.get("workerGroupSpecs", []):
        out[group["groupName"]] = group["template"]["spec"]["containers"][0]
    return out


def pod_specs(cluster_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {"head": cluster_spec["headGroupSpec"]["template"]["spec"]}
    for group in cluster_spec.get("workerGroupSpecs", []):
        out[group["groupName"]] = group["template"]["spec"]
    return out


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_ref(container: dict[str, Any], name: str) -> tuple[str, str]:
    entry = env_of(container).get(name)
    assert entry is not None, f"container {container['name']!r} does not set {name}"
    assert "value" not in entry, f"{name} must not be written into the manifest"
    ref = entry.get("valueFrom", {}).get("secretKeyRef")
    assert ref and ref.get("name") and ref.get("key"), f"{name} must come from a secretKeyRef"
    return ref["name"], ref["key"]


def pvc_mounts(pod_spec: dict[str, Any], container: dict[str, Any]) -> dict[PurePosixPath, str]:
    """mountPath -> claimName for the container's mounts backed by a PersistentVolumeClaim."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    return {
        PurePosixPath(m["mountPath"]): claims[m["name"]]
        for m in container.get("volumeMounts", [])
        if m["name"] in claims
    }


def on_pvc(path: Path | str, mounts: dict[PurePosixPath, str]) -> bool:
    p = PurePosixPath(str(path))
    return any(p == m or m in p.parents for m in mounts)


def gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def check_token_auth(cluster_spec: dict[str, Any], where: str) -> None:
    """RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the Secret KubeRay's authOptions names, on every node."""
    auth = cluster_spec.get("authOptions") or {}
    assert auth.get("mode") == "token", f"{where}: authOptions.mode must be token (KubeRay's own API calls)"
    assert auth.get("secretName"), f"{where}: authOptions.secretName must name the token Secret"
    assert Version(str(cluster_spec.get("rayVersion"))) >= Version("2.52.0"), (
        f"{where}: token auth needs Ray >= 2.52"
    )
    containers = dict(ray_containers(cluster_spec))
    autoscaler = cluster_spec.get("autoscalerOptions")
    if cluster_spec.get("enableInTreeAutoscaling") and autoscaler and autoscaler.get("env"):
        containers["autoscaler"] = {"name": "autoscaler", "env": autoscaler["env"]}
    for group, c in containers.items():
        mode = env_of(c).get("RAY_AUTH_MODE", {})
        assert mode.get("value") == "token", f"{where}/{group}: RAY_AUTH_MODE must be token"
        assert secret_ref(c, "RAY_AUTH_TOKEN") == (auth["secretName"], "auth_token"), (
            f"{where}/{group}: RAY_AUTH_TOKEN must come from authOptions.secretName, key auth_token"
        )


def check_common_cluster(cluster_spec: dict[str, Any], where: str) -> None:
    import ray

    assert cluster_spec["rayVersion"] == ray.__version__, f"{where}: rayVersion != the installed Ray"
    for group, c in ray_containers(cluster_spec).items():
        assert c["image"] == IMAGE, f"{where}/{group}: image {c['image']!r}"
        res = c.get("resources", {})
        assert res.get("requests") and res.get("limits"), f"{where}/{group}: set requests and limits"
    for group in [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]:
        for k, v in (group.get("rayStartParams") or {}).items():
            assert isinstance(v, str), f"{where}: rayStartParams.{k} must be a string, got {v!r}"
    for spec in pod_specs(cluster_spec).values():
        sc = spec.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, f"{where}: run as non-root"
    for group in cluster_spec.get("workerGroupSpecs", []):
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    check_token_auth(cluster_spec, where)


def gpu_groups(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        g for g in cluster_spec.get("workerGroupSpecs", []) if gpus(g["template"]["spec"]["containers"][0])
    ]


# ---- Serve configs ---------------------------------------------------------------------------------------
def test_serve_configs_exist() -> None:
    assert {p.name for p in SERVE_CONFIGS} >= {"local-cpu.yaml", "gpu.yaml"}


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_matches_ray_schema_and_app_args(path: Path) -> None:
    (cfg,) = load_docs(path)
    check_serve_config(cfg, path.name)


def test_local_config_is_loopback_cpu_only() -> None:
    (cfg,) = load_docs(DEPLOY / "serve" / "local-cpu.yaml")
    schema, _, args = check_serve_config(cfg, "local-cpu.yaml")
    assert schema.http_options.host == "127.0.0.1"
    assert args.expert.num_gpus == 0
    # 2 cores: four experts at their minimum, the warm pool, the router and the ingress (0.1) must fit.
    experts = (4 * args.expert.min_replicas + args.warm_pool) * args.expert.num_cpus
    assert args.warm_pool >= 1 and experts + args.router.num_cpus + 0.1 <= 2


def test_gpu_config_uses_gpus_and_shared_state() -> None:
    (cfg,) = load_docs(DEPLOY / "serve" / "gpu.yaml")
    schema, _, args = check_serve_config(cfg, "gpu.yaml")
    assert schema.http_options.host == "0.0.0.0"
    assert (schema.http_options.port, schema.grpc_options.port) == (8000, 9000)
    assert 0 < args.expert.num_gpus <= 1
    assert args.expert.min_replicas >= 1 and args.expert.max_replicas >= args.expert.min_replicas
    assert args.state_dir.is_absolute() and args.expert_root is not None and args.expert_root.is_absolute()


def test_grpc_servicer_functions_are_importable() -> None:
    for dotted in GRPC_SERVICER_FUNCTIONS:
        module, _, name = dotted.rpartition(".")
        fn = getattr(importlib.import_module(module), name)
        assert callable(fn), dotted
        assert list(inspect.signature(fn).parameters) == ["servicer", "server"], dotted


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_import_path_builds_the_application(path: Path) -> None:
    """What the Serve controller does with import_path + args, short of deploying."""
    from ray._common.utils import import_attr
    from ray.serve import Application

    (cfg,) = load_docs(path)
    app_cfg = cfg["applications"][0]
    builder = import_attr(app_cfg["import_path"])
    assert callable(builder)
    assert len(inspect.signature(builder).parameters) == 1, "Serve builders take exactly one argument"
    assert isinstance(builder(app_cfg.get("args") or {}), Application)


# ---- KubeRay ---------------------------------------------------------------------------------------------
def rayservice() -> dict[str, Any]:
    return one_of_kind(RAYSERVICE, "RayService")


def test_rayservice_embeds_the_gpu_serve_config() -> None:
    svc = rayservice()
    assert svc["apiVersion"] == "ray.io/v1"
    assert isinstance(svc["spec"]["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    embedded = yaml.safe_load(svc["spec"]["serveConfigV2"])
    check_serve_config(embedded, "rayservice.serveConfigV2")
    (gpu,) = load_docs(DEPLOY / "serve" / "gpu.yaml")
    assert embedded == gpu, "serveConfigV2 must be deploy/serve/gpu.yaml (copy the changes across)"


def test_rayservice_cluster() -> None:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    check_common_cluster(cluster, "rayservice")
    assert cluster.get("enableInTreeAutoscaling") is True
    groups = gpu_groups(cluster)
    assert groups, "a worker group must request nvidia.com/gpu"
    _, _, args = check_serve_config(yaml.safe_load(rayservice()["spec"]["serveConfigV2"]), "serveConfigV2")
    for g in groups:
        c = g["template"]["spec"]["containers"][0]
        assert gpus(c) == int(c["resources"]["requests"]["nvidia.com/gpu"]) >= 1
        assert args.expert.num_gpus <= gpus(c), "an expert replica must fit on one GPU worker"
        assert args.expert.num_cpus <= float(c["resources"]["limits"]["cpu"])


def test_rayservice_ports() -> None:
    svc = rayservice()
    cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    head = ray_containers(svc["spec"]["rayClusterConfig"])["head"]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports.get("dashboard") == 8265
    assert ports.get("serve") == cfg["http_options"]["port"] == 8000
    assert ports.get("serve-grpc") == cfg["grpc_options"]["port"] == 9000


def test_rayservice_secrets_and_state_volume() -> None:
    svc = rayservice()
    cluster = svc["spec"]["rayClusterConfig"]
    _, _, args = check_serve_config(yaml.safe_load(svc["spec"]["serveConfigV2"]), "serveConfigV2")
    claims = {d["metadata"]["name"]: d for d in load_docs(RAYSERVICE) if d["kind"] == "PersistentVolumeClaim"}
    specs = pod_specs(cluster)
    # Ingress (admin token) and Router (state_dir, expert_root) can be placed on any node: every node needs them.
    for group, c in ray_containers(cluster).items():
        secret_ref(c, "MODE_RAY_ADMIN_TOKEN")
        mounts = pvc_mounts(specs[group], c)
        assert on_pvc(args.state_dir, mounts), f"{group}: state_dir {args.state_dir} is not on a PVC"
        assert on_pvc(args.expert_root, mounts), f"{group}: expert_root {args.expert_root} is not on a PVC"
        assert set(mounts.values()) <= set(claims), f"{group}: claim not defined in {RAYSERVICE.name}"
        state_env = env_of(c).get("MODE_RAY_STATE_DIR", {}).get("value")
        assert state_env is None or Path(state_env) == args.state_dir
    for claim in claims.values():
        assert "ReadWriteMany" in claim["spec"]["accessModes"], "every node mounts the registry volume"


# ---- RayJob ----------------------------------------------------------------------------------------------
def rayjob() -> dict[str, Any]:
    return one_of_kind(RAYJOB, "RayJob")


def cli_command(*path: str):  # type: ignore[no-untyped-def]
    import typer.main

    from mode_ray.cli import app

    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    return cmd


def test_rayjob_entrypoint_is_a_valid_cli_call() -> None:
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["mode-ray", "train"], "the entrypoint must start with `mode-ray train`"
    cmd = cli_command("train", argv[2])
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    flags = [a.split("=", 1)[0] for a in argv[3:] if a.startswith("--")]
    assert flags and set(flags) <= known, f"not options of `train {argv[2]}`: {set(flags) - known}"
    # The Jobs supervisor sets RAY_ADDRESS and ray.init(address=None) joins it; --num-cpus is then an error.
    assert "--num-cpus" not in flags
    ctx = cmd.make_context(argv[2], argv[3:])  # types, required options, choices: parsed, not run
    params = ctx.params
    (gpu,) = load_docs(DEPLOY / "serve" / "gpu.yaml")
    served = AppArgs.model_validate(gpu["applications"][0]["args"])
    assert params["out"] / "experts" == served.expert_root, "the new expert must land under the expert root"

    cluster = job["spec"]["rayClusterSpec"]
    groups = gpu_groups(cluster)
    if params.get("gpu"):
        assert groups, "--gpu needs a worker group with nvidia.com/gpu"
        assert params["workers"] <= sum(
            g["maxReplicas"] * gpus(g["template"]["spec"]["containers"][0]) for g in groups
        )
        for g in groups:
            cpu = float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
            assert params["cpus_per_worker"] <= cpu, "a Train worker must fit on one worker pod"


def test_rayjob_cluster() -> None:
    job = rayjob()
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    check_common_cluster(cluster, "rayjob")
    assert gpu_groups(cluster), "a worker group must request nvidia.com/gpu"
    assert spec.get("shutdownAfterJobFinishes") is True, "give the GPUs back when the job ends"
    # The CLI passes runtime_env={"env_vars": {"PYTHONPATH": ...}} to ray.init; a job-level PYTHONPATH
    # would make Ray refuse to merge the two runtime envs.
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    assert "PYTHONPATH" not in (runtime_env.get("env_vars") or {})
    out = (
        cli_command("train", "experts")
        .make_context("experts", shlex.split(spec["entrypoint"])[3:])
        .params["out"]
    )
    specs = pod_specs(cluster)
    for group, c in ray_containers(cluster).items():
        mounts = pvc_mounts(specs[group], c)
        assert on_pvc(out, mounts), f"{group}: --out {out} is not on a PVC"
    head = ray_containers(cluster)["head"]
    # Ray Train's storage path is runs/ray_train relative to the driver's working directory (the head's):
    # it must be on the volume the workers share.
    assert on_pvc(head.get("workingDir", "/"), pvc_mounts(specs["head"], head))


def test_rayjob_uses_the_rayservice_volume() -> None:
    service_claims = {
        d["metadata"]["name"] for d in load_docs(RAYSERVICE) if d["kind"] == "PersistentVolumeClaim"
    }
    cluster = rayjob()["spec"]["rayClusterSpec"]
    for group, c in ray_containers(cluster).items():
        assert set(pvc_mounts(pod_specs(cluster)[group], c).values()) <= service_claims, group


def test_secrets_example_covers_every_reference() -> None:
    secrets = {}
    for doc in load_docs(SECRETS):
        assert doc["kind"] == "Secret"
        secrets[doc["metadata"]["name"]] = set(doc.get("stringData", {})) | set(doc.get("data", {}))
    refs = set()
    for cluster in (rayservice()["spec"]["rayClusterConfig"], rayjob()["spec"]["rayClusterSpec"]):
        refs.add((cluster["authOptions"]["secretName"], "auth_token"))
        for c in ray_containers(cluster).values():
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
    missing = {(n, k) for n, k in refs if k not in secrets.get(n, set())}
    assert not missing, f"referenced but not in {SECRETS.name}: {missing}"


# ---- Dockerfile ------------------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        line, buf = buf + line, ""
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    steps = dockerfile_instructions()
    ops = [op for op, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    users = [arg for op, arg in steps if op == "USER"]
    assert users, "the image must switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0"), "the final USER must not be root"
    last_user = max(i for i, op in enumerate(ops) if op == "USER")
    assert last_user > max(i for i, op in enumerate(ops) if op == "RUN"), (
        "nothing may RUN after the USER switch"
    )
    runs = [arg for op, arg in steps if op == "RUN"]
    assert any("pip install ." in r for r in runs), "the image must install the project (pip install .)"
    copied = " ".join(arg for op, arg in steps if op == "COPY")
    assert "pyproject.toml" in copied and "mode_ray" in copied
    exposed = {p.split("/")[0] for op, arg in steps if op == "EXPOSE" for p in arg.split()}
    assert {"8000", "9000"} <= exposed
    # Docker has no trailing comments: `USER 1000  # x` would make "# x" part of the argument.
    for op, arg in steps:
        if op not in ("RUN",):
            assert " #" not in arg, f"trailing comment in {op} {arg}"
    (cmd,) = [json.loads(arg) for op, arg in steps if op == "CMD"]
    assert cmd[:2] == ["mode-ray", "serve"]
    params = cli_command("serve").make_context("serve", cmd[2:]).params
    assert params["host"] == "0.0.0.0", "in a container the HTTP API must listen on all interfaces"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "!pyproject.toml" in ignore and "!mode_ray/**" in ignore, "the build context must keep the sources"

"""Multi-node smoke run of the expert cluster, as a standalone script (run by tests/serve/test_multinode.py).

A Ray cluster of three raylets is simulated on this machine with `ray.cluster_utils.Cluster`: a head and two
worker nodes that carry the custom resources `node_a` and `node_b` (node_b has no CPUs: only expert `b`, which
asks for none, can live there). The tiny mixture of tests/serve/test_cluster.py (three xs experts) is served
with `expert_overrides` that pin experts `a` and `c` to `node_a` and `b` to `node_b`, and one generation routed
to `a` and `b` must cross nodes and equal the in-process mixture.

Then the fault: node_b's raylet is killed while requests routed to `a` and `b` are stepping. Each must end
within its deadline, completed with the lost routing weight reported (`dropped_mass`), as the engine drops a
failed expert for the rows it could not answer. A replacement node with the `node_b` resource joins (what the
KubeRay autoscaler does); Serve places `b` there again, and a request pinned to `b` must succeed within 30 s.

Serve's HTTP proxy runs on the head only: on one machine every node's proxy would share 127.0.0.1:<port>
(SO_REUSEPORT), so a request could ride on the killed node's proxy, which is not what this run tests.

It cannot run inside pytest: the test session already holds one `ray.init` (tests/conftest.py). Everything
Ray writes (sessions, sockets, the `ray_current_cluster` address file) goes to a private RAY_TMPDIR, so no
other Ray instance on the machine (e.g. a training job, or another pytest) can discover this cluster, and
the driver connects only to `cluster.address`.

Prints one line `MULTINODE_RESULT {json}` and exits 0 on success; exits 1 with `MULTINODE_FAILED: ...` on
failure. Serve, Ray and the cluster are always shut down.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "MULTINODE_RESULT "
NODE_OF_EXPERT = {"a": "node_a", "b": "node_b", "c": "node_a"}
REQUEST = {"prompt": 3, "num_images": 2, "seed": 11, "top_k": 2, "experts": ["a", "b"]}
FAULT_REQUEST = {
    "prompt": 3,
    "num_images": 1,
    "top_k": 2,
    "steps": 300,
    "experts": ["a", "b"],
    "deadline_s": 90,
}
ROUTED_AGAIN_S = 30.0  # after the replacement node joins, b must serve a pinned request within this


class CheckFailed(Exception):
    """An expectation of the run did not hold."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def prepare_environment(work: Path) -> None:
    """Before Ray is imported: every raylet and worker process started below inherits this environment."""
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60 turns token auth on when unset
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_TMPDIR"] = str(work / "ray")  # private sessions and address file (see module doc)
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))  # replicas must import mode_ray
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def build_mixture(root: Path) -> Path:
    """The three-expert mixture of tests/serve/test_cluster.py (same experts, gate and config)."""
    from tests.tiny import build_tiny_mixture

    return build_tiny_mixture(root / "mixture")


def serve_actor_nodes() -> dict[str, str]:
    """Name -> node id (hex) of every live Serve actor, from the GCS actor table (no dashboard needed)."""
    from ray._private import state as ray_state

    out = {}
    for info in ray_state.actors().values():
        name = info.get("Name") or ""
        if info.get("State") == "ALIVE" and name.startswith(("SERVE_", "SERVE_REPLICA::")):
            out[name] = info["Address"]["NodeID"]
    return out


def replica_nodes(actors: dict[str, str], app: str, deployment: str = "") -> list[str]:
    """Node ids of the live replicas of `app` (of one of its deployments if named)."""
    prefix = f"SERVE_REPLICA::{app}#{deployment + '#' if deployment else ''}"
    return sorted({node for name, node in actors.items() if name.startswith(prefix)})


def wait_healthy(http_url: str, timeout_s: float = 60.0) -> None:
    """Several fresh connections in a row answer /healthz: with a proxy per node sharing the port
    (SO_REUSEPORT), each new connection may land on a different proxy."""
    import httpx

    deadline, streak, last = time.monotonic() + timeout_s, 0, None
    while streak < 6:
        check(time.monotonic() < deadline, f"GET /healthz never answered 200 six times in a row: {last}")
        try:
            r = httpx.get(f"{http_url}/healthz", timeout=10)
            last = f"{r.status_code} {r.text[:200]}"
            streak = streak + 1 if r.status_code == 200 else 0
        except httpx.HTTPError as e:
            last, streak = repr(e), 0
        if streak == 0:
            time.sleep(0.5)


def generate(http_url: str, body: dict, timeout_s: float = 120.0):  # noqa: ANN201
    """POST /v1/generate; retries only 404/503 (a proxy whose routes are not there yet)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.post(f"{http_url}/v1/generate", json=body, timeout=120)
        if r.status_code not in (404, 503) or time.monotonic() > deadline:
            return r
        time.sleep(0.5)


def kill_node_under_load(cluster, node, http_url: str, model: Path, timings: dict[str, float]) -> dict:  # noqa: ANN001
    """Kill `node` (expert b's only replica) while 4 requests routed to a and b step; then add a node with the
    same resource and wait for b to serve a pinned request again. Returns what happened."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import ray

    from mode_ray.serve.shared_registry import NAMESPACE, actor_name

    registry = ray.get_actor(actor_name(model / "state"), namespace=NAMESPACE)

    def active() -> int:
        return sum(r["active"] for r in ray.get(registry.replicas.remote()).values())

    def one(i: int) -> tuple[int, dict, float]:
        t = time.monotonic()
        r = httpx.post(
            f"{http_url}/v1/generate", json={**FAULT_REQUEST, "seed": i, "output": "json"}, timeout=120
        )
        body = (
            r.json() if r.headers.get("content-type", "").startswith("application/json") else {"text": r.text}
        )
        return r.status_code, body, time.monotonic() - t

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(4)]
        deadline = time.monotonic() + 60
        while active() < 4:
            check(time.monotonic() < deadline, "the 4 fault requests never all stepped")
            time.sleep(0.05)
        threading.Event().wait(0.5)  # some evaluations with both experts first
        killed_at = time.monotonic()
        cluster.remove_node(node, allow_graceful=False)
        outcomes = [f.result() for f in futures]
    for code, body, seconds in outcomes:
        check(seconds <= FAULT_REQUEST["deadline_s"] + 10, f"a fault request took {seconds:.1f} s")
        check(
            code == 200 and body.get("dropped_mass", 0) > 0,
            f"a request stepping when b's node died should complete with b's routing weight reported as "
            f"dropped: {code} {str(body)[:500]}",
        )
    replacement = cluster.add_node(num_cpus=0, resources={"node_b": 1})
    joined_at = time.monotonic()
    pinned = {"prompt": 4, "num_images": 1, "seed": 5, "steps": 3, "experts": ["b"], "output": "json"}
    while True:
        r = httpx.post(f"{http_url}/v1/generate", json=pinned, timeout=60)
        if r.status_code == 200 and r.json()["dropped_mass"] == 0:
            break
        check(
            time.monotonic() - joined_at < ROUTED_AGAIN_S,
            f"b was not routed again within {ROUTED_AGAIN_S:.0f} s of the replacement node: {r.status_code} "
            f"{r.text[:500]}",
        )
        time.sleep(0.25)
    routed_at = time.monotonic()
    placed = replica_nodes(serve_actor_nodes(), "expert-b")
    check(placed == [replacement.node_id], f"b should run on the replacement node, it runs on {placed}")
    timings["fault_s"] = routed_at - killed_at
    return {
        "requests": [
            {"status": c, "dropped_mass": b.get("dropped_mass"), "seconds": round(s, 2)}
            for c, b, s in outcomes
        ],
        "routed_again_after_join_s": round(routed_at - joined_at, 2),
        "routed_again_after_kill_s": round(routed_at - killed_at, 2),
    }


def run(work: Path, timings: dict[str, float]) -> dict:
    started = time.monotonic()
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    serve_started = False
    try:
        node_a = cluster.add_node(num_cpus=1, resources={"node_a": 1})
        node_b = cluster.add_node(num_cpus=0, resources={"node_b": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = {"head": cluster.head_node.node_id, "node_a": node_a.node_id, "node_b": node_b.node_id}
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        check(alive == set(nodes.values()), f"expected the 3 simulated nodes {nodes}, Ray sees {alive}")
        timings["cluster_s"] = time.monotonic() - started

        t = time.monotonic()
        model = build_mixture(work)
        timings["build_mixture_s"] = time.monotonic() - t

        from ray import serve
        from ray.serve.config import gRPCOptions

        from mode_ray.serve.app import build_app
        from mode_ray.serve.config import APP_NAME, GRPC_SERVICER_FUNCTIONS, AppArgs, expert_app_name

        t = time.monotonic()
        from mode_ray.ports import free_ports

        http_port, grpc_port = free_ports(2)
        serve.start(
            proxy_location="HeadOnly",  # see the module doc
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
        )
        serve_started = True
        small = {"num_cpus": 0.1, "max_replicas": 1, "batch_wait_timeout_s": 0.001}
        args = AppArgs(
            model_dir=model,
            state_dir=model / "state",
            grpc_target=f"127.0.0.1:{grpc_port}",
            expert=small,
            expert_overrides={
                name: {**small, "resources": {node: 0.1}, "num_cpus": 0 if node == "node_b" else 0.1}
                for name, node in NODE_OF_EXPERT.items()
            },
            router={"num_cpus": 0.1, "call_timeout_s": 10.0},
        )
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        timings["deploy_s"] = time.monotonic() - t

        actors = serve_actor_nodes()
        placement = {name: replica_nodes(actors, expert_app_name(name)) for name in NODE_OF_EXPERT}
        for name, node in NODE_OF_EXPERT.items():
            check(
                placement[name] == [nodes[node]],
                f"expert {name!r} should run only on {node} ({nodes[node]}), its replicas are on "
                f"{placement[name]}; Serve actors: {actors}",
            )
        check(placement["a"] != placement["b"], f"experts a and b share a node: {placement}")
        proxies = sorted({node for name, node in actors.items() if name.startswith("SERVE_PROXY_ACTOR")})

        import base64

        import numpy as np
        import torch

        http_url = f"http://127.0.0.1:{http_port}"
        t = time.monotonic()
        wait_healthy(http_url)
        response = generate(http_url, {**REQUEST, "output": "json"})
        timings["generate_s"] = time.monotonic() - t
        check(
            response.status_code == 200, f"POST /v1/generate: {response.status_code} {response.text[:2000]}"
        )
        body = response.json()
        used = sorted({e for step in body["trace"] for row in step["experts"] for e in row})
        check(used == ["a", "b"], f"the trace should use exactly experts a and b, it used {used}")
        arr = np.frombuffer(base64.b64decode(body["images"]), dtype="<f4").reshape(body["shape"])

        from mode_ray.generation import GenerateParams, generate_local, load_bundle

        t = time.monotonic()
        torch.set_num_threads(1)  # as in the replicas: CPU reductions depend on the thread count
        bundle = load_bundle(model)
        expected = generate_local(bundle.mixture, bundle.config, GenerateParams(**REQUEST))
        timings["reference_s"] = time.monotonic() - t
        diff = float((torch.from_numpy(arr.copy()) - expected.images).abs().max())
        check(diff <= 1e-5, f"served images differ from the in-process mixture by {diff} (> 1e-5)")

        fault = kill_node_under_load(cluster, node_b, http_url, model, timings)
        return {
            "fault": fault,
            "nodes": nodes,
            "expert_nodes": {name: nodes_[0] for name, nodes_ in placement.items()},
            "expert_node_names": NODE_OF_EXPERT,
            "router_nodes": replica_nodes(actors, APP_NAME, "Router"),
            "ingress_nodes": replica_nodes(actors, APP_NAME, "Ingress"),
            "proxy_nodes": proxies,
            "trace_experts": used,
            "evaluations": len(body["trace"]),
            "max_abs_diff": diff,
        }
    finally:
        t = time.monotonic()
        if serve_started:
            try:
                from ray import serve

                serve.shutdown()
            except Exception:  # noqa: BLE001 - tear down the rest regardless
                traceback.print_exc()
        try:
            ray.shutdown()
        finally:
            cluster.shutdown()
        timings["shutdown_s"] = time.monotonic() - t


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="mr-mn-", dir="/tmp"))  # short: Ray's unix socket paths live here
    prepare_environment(work)
    timings: dict[str, float] = {}
    started = time.monotonic()
    try:
        result = run(work, timings)
    except CheckFailed as e:
        print(f"MULTINODE_FAILED: {e}", flush=True)
        return 1
    except Exception:  # noqa: BLE001 - report any crash as a failure with its traceback
        traceback.print_exc()
        print("MULTINODE_FAILED: the driver crashed (traceback above)", flush=True)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timings["total_s"] = time.monotonic() - started
    result["timings"] = {k: round(v, 2) for k, v in timings.items()}
    print(RESULT_PREFIX + json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

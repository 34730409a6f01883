"""The Grafana dashboard (deploy/grafana/mode_ray.json) queries only metrics a running cluster exports: every
`ray_mode_ray_*` series in its PromQL is read back from Ray's Prometheus endpoint after real traffic (with an
expert replica killed mid-request, so that dropped routing mass is exported too)."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from mode_ray.proto.mode_ray.v1 import generation_pb2 as gen
from mode_ray.serve.metrics import METRICS
from tests.conftest import REPO_ROOT
from tests.serve.conftest import tiny_app
from tests.serve.test_cluster import post, replica_actors, stream_in_thread
from tests.tiny import build_tiny_mixture

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "mode_ray.json"


def queried() -> set[str]:
    """The series names in the dashboard's PromQL (with their _bucket / _count suffixes)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {name for p in panels for t in p["targets"] for name in re.findall(r"ray_mode_ray_\w+", t["expr"])}


def test_the_dashboard_covers_the_metrics_it_should_and_only_declared_ones() -> None:
    names = queried()
    for topic in (
        "requests_total",
        "request_seconds_bucket",
        "tick_seconds_count",
        "tick_phase_seconds_bucket",
        "routed_rows_total",
        "routing_weight_total",
        "dropped_mass_total",
        "queued_requests",
        "expert_replicas",
    ):
        assert f"ray_mode_ray_{topic}" in names, topic
    declared = {f"ray_{m}" for m in METRICS}
    base = {re.sub(r"_(bucket|count|sum)$", "", n) if n not in declared else n for n in names}
    assert base <= declared, base - declared


def exported() -> str:
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


@pytest.mark.serve
def test_every_series_the_dashboard_queries_is_exported_by_a_running_cluster(serve_cluster, tmp_path) -> None:  # noqa: ANN001
    import ray

    model = build_tiny_mixture(tmp_path)
    with tiny_app(serve_cluster, model, call_timeout_s=2.0):  # b's restart outlasts a call: its rows drop
        first, out = threading.Event(), {}
        request = gen.GenerateRequest(
            prompt="5",
            num_images=2,
            seed=3,
            steps=40,
            experts=["a", "b"],
            top_k=2,
            output="raw",
            deadline_s=150,
        )
        thread = stream_in_thread(serve_cluster.grpc_target, request, first, out)
        assert first.wait(120) and "error" not in out, out.get("error")
        ray.kill(replica_actors("expert-b")[0], no_restart=False)  # b's share of the rows is dropped
        thread.join(170)
        assert "error" not in out and out["result"].dropped_mass > 0, out
        for i in range(3):
            assert (
                post(
                    serve_cluster.http_url, {"prompt": i, "num_images": 1, "steps": 3, "output": "json"}
                ).status_code
                == 200
            )

        def missing() -> set[str]:
            text = exported()
            return {n for n in queried() if not re.search(rf"^{n}[{{ ]", text, re.MULTILINE)}

        deadline = time.monotonic() + 120  # Ray's agent exports what the processes recorded every few seconds
        while (gone := missing()) and time.monotonic() < deadline:
            time.sleep(1.0)
        assert gone == set(), f"the dashboard queries series the cluster does not export: {sorted(gone)}"

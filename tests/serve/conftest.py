"""Shared fixtures for Ray Serve tests: one local Ray + Serve instance per test session.

``serve_cluster`` starts Ray (2 CPUs, no dashboard, token auth explicitly disabled) and
Serve with an HTTP proxy and a gRPC proxy that knows the OIP ``GRPCInferenceService``
and ``mode_ray.v1.GenerationService``. Tests deploy their own applications with
``serve.run(app, name=..., route_prefix=...)`` and should ``serve.delete(name)`` them
when done. Give toy deployments ``ray_actor_options={"num_cpus": 0}``: Serve's default
is 1 CPU per replica and the session cluster only has 2.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mode_ray.ports import free_ports
from mode_ray.serve.config import GRPC_SERVICER_FUNCTIONS  # noqa: E402  (imported by the gRPC proxy actor)


@dataclass(frozen=True)
class ServeCluster:
    http_port: int
    grpc_port: int

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@pytest.fixture(scope="session")
def serve_cluster(ray_session: None) -> Iterator[ServeCluster]:
    """Serve on the session's Ray (see tests/conftest.py), HTTP and gRPC proxies on free loopback ports."""
    from ray import serve
    from ray.serve.config import gRPCOptions

    http_port, grpc_port = free_ports(2)
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
    )
    try:
        yield ServeCluster(http_port=http_port, grpc_port=grpc_port)
    finally:
        serve.shutdown()


@contextlib.contextmanager
def tiny_app(
    cluster: ServeCluster,
    model: Path,
    warm_pool: int = 0,
    expert: dict[str, Any] | None = None,
    expert_overrides: dict[str, dict[str, Any]] | None = None,
    decoder: dict[str, Any] | None = None,
    **router: Any,
) -> Iterator[Path]:
    """The tiny mixture in `model` (tests/tiny.py) deployed as the `mode-ray` app with `warm_pool`, expert
    deployment settings (over small CPU shares for the 2-CPU session cluster) and these router options; the
    app and every expert app (warm ones too) deleted afterwards."""
    from ray import serve

    from mode_ray.serve.app import build_app
    from mode_ray.serve.config import APP_NAME, AppArgs

    args = AppArgs(
        model_dir=model,
        state_dir=model / "state",
        grpc_target=cluster.grpc_target,
        warm_pool=warm_pool,
        expert={"num_cpus": 0.1, "max_replicas": 1, **(expert or {})},
        expert_overrides=expert_overrides or {},
        router={"num_cpus": 0.1, **router},
        decoder={"num_cpus": 0.1, **(decoder or {})},
    )
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    try:
        yield model
    finally:
        serve.delete(APP_NAME)
        for app in list(serve.status().applications):
            if app.startswith("expert-"):
                serve.delete(app)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> float:
    """Poll `predicate` (a counter or a state of the cluster) until it holds; the seconds it took. Fails
    naming `what` after `timeout`."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)
    return time.monotonic() - t0

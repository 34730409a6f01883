"""Shared fixtures for Ray Serve tests: one local Ray + Serve instance per test session.

``serve_cluster`` starts Ray (2 CPUs, no dashboard, token auth explicitly disabled) and
Serve with an HTTP proxy and a gRPC proxy that knows the OIP ``GRPCInferenceService``
and ``mode_ray.v1.GenerationService``. Tests deploy their own applications with
``serve.run(app, name=..., route_prefix=...)`` and should ``serve.delete(name)`` them
when done. Give toy deployments ``ray_actor_options={"num_cpus": 0}``: Serve's default
is 1 CPU per replica and the session cluster only has 2.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_cluster(ray_session: None) -> Iterator[ServeCluster]:
    """Serve on the session's Ray (see tests/conftest.py), HTTP and gRPC proxies on free loopback ports."""
    from ray import serve
    from ray.serve.config import gRPCOptions

    http_port, grpc_port = _free_port(), _free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
    )
    try:
        yield ServeCluster(http_port=http_port, grpc_port=grpc_port)
    finally:
        serve.shutdown()

"""Shared fixtures for Ray Serve tests: one local Ray + Serve instance per test session.

``serve_cluster`` starts Ray (2 CPUs, no dashboard, token auth explicitly disabled) and
Serve with an HTTP proxy and a gRPC proxy that knows the OIP ``GRPCInferenceService``
and ``mode_ray.v1.GenerationService``. Tests deploy their own applications with
``serve.run(app, name=..., route_prefix=...)`` and should ``serve.delete(name)`` them
when done. Give toy deployments ``ray_actor_options={"num_cpus": 0}``: Serve's default
is 1 CPU per replica and the session cluster only has 2.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Dotted paths the Serve gRPC proxy imports (inside its own actor process) to register services.
GRPC_SERVICER_FUNCTIONS = [
    "mode_ray.proto.inference.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server",
    "mode_ray.proto.mode_ray.v1.generation_pb2_grpc.add_GenerationServiceServicer_to_server",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "serve: starts a real local Ray cluster with Ray Serve (slow)")


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
def serve_cluster() -> Iterator[ServeCluster]:
    ray = pytest.importorskip("ray")
    from ray import serve
    from ray.serve.config import gRPCOptions

    saved = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "PYTHONPATH")}
    # Ray 2.60 accepts RAY_AUTH_MODE "disabled" or "token"; unset means token auth is
    # switched on by default for a new local cluster. Tests never want a token.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Ray worker processes (the Serve proxies and replicas) inherit the environment of the
    # raylet started by ray.init; they must be able to import mode_ray (the gRPC proxy
    # imports the servicer functions above).
    paths = [str(REPO_ROOT), *filter(None, (saved["PYTHONPATH"] or "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))

    http_port, grpc_port = _free_port(), _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
        )
        yield ServeCluster(http_port=http_port, grpc_port=grpc_port)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

"""What the benchmarks share: a local Ray with Serve's HTTP and gRPC proxies on free loopback ports."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray_serve() -> tuple[int, int]:
    """ray.init on all local CPUs, then Serve on loopback; returns (http_port, grpc_port)."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from mode_ray.serve.config import GRPC_SERVICER_FUNCTIONS

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    http_port, grpc_port = free_port(), free_port()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
    )
    return http_port, grpc_port

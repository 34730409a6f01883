"""What the benchmarks share: a local Ray with Serve's HTTP and gRPC proxies on free loopback ports."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mode_ray.ports import free_ports


def free_port() -> int:
    return free_ports(1)[0]


def start_ray_serve() -> tuple[int, int]:
    """ray.init on all local CPUs, then Serve on loopback; returns (http_port, grpc_port)."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from mode_ray.serve.config import GRPC_SERVICER_FUNCTIONS

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    http_port, grpc_port = free_ports(2)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
    )
    return http_port, grpc_port


def serve_shipped_mixture(prefix: str = "mode-ray-") -> tuple[str, Path, Callable[[], None]]:
    """A copy of the shipped mixture served on a local Ray + Serve (a warm pool of 1, small CPU shares):
    returns (HTTP URL, the copy's expert root, a function that shuts it down and removes the copy)."""
    import shutil
    import tempfile

    from ray import serve

    from mode_ray.cli import DEFAULT_MODEL
    from mode_ray.serve.app import build_app
    from mode_ray.serve.config import APP_NAME, AppArgs

    work = Path(tempfile.mkdtemp(prefix=prefix))
    model = work / "mnist"
    shutil.copytree(DEFAULT_MODEL, model)
    http_port, grpc_port = start_ray_serve()
    args = AppArgs(
        model_dir=model,
        state_dir=work / "state",
        grpc_target=f"127.0.0.1:{grpc_port}",
        warm_pool=1,
        expert={"num_cpus": 0.25, "max_replicas": 1},
        router={"num_cpus": 0.25},
    )
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")

    def stop() -> None:
        serve.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    return f"http://127.0.0.1:{http_port}", model / "experts", stop

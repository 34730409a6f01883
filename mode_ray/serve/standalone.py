"""Serve one expert as a plain Open Inference Protocol gRPC server, outside Ray.

    python -m mode_ray.serve.standalone <expert-dir> --port 8500

The same `ExpertServer` the Serve deployment runs, behind `grpc.aio`. Such an expert joins a running mixture
by endpoint (`mode-ray experts add <dir> --endpoint host:8500`), as would a Triton or KServe model server.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc

from mode_ray.proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from mode_ray.serve.expert_server import ExpertServer

METHODS = ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer")


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Delegates every OIP method to an ExpertServer, passing the grpc.aio context for status codes."""

    def __init__(self, server: ExpertServer) -> None:
        self.server = server
        for name in METHODS:
            setattr(self, name, self._delegate(name))

    def _delegate(self, name: str) -> Any:
        method = getattr(self.server, name)

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await method(request, grpc_context=context)

        return call


async def serve_expert(
    expert_dir: str, host: str = "127.0.0.1", port: int = 0, **kw: Any
) -> tuple[grpc.aio.Server, int]:
    """Start the server; returns it and the bound port (port 0 picks a free one)."""
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(OipServicer(ExpertServer(expert_dir, **kw)), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


def main() -> None:
    ap = argparse.ArgumentParser(description="Serve one mode_ray expert over OIP gRPC (no Ray).")
    ap.add_argument("expert_dir", help="expert directory (expert.json + model.safetensors)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    ap.add_argument("--port", type=int, default=8500, help="port (0 = any free port)")
    args = ap.parse_args()

    async def run() -> None:
        server, port = await serve_expert(args.expert_dir, args.host, args.port)
        print(f"OIP expert {args.expert_dir} on {args.host}:{port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(run())


if __name__ == "__main__":
    main()

"""gRPC straight to an expert's replicas: each replica also serves OIP on its own port and publishes it.

The router's `direct` transport (mode_ray.serve.transport.DirectExpertClient) skips the Serve gRPC proxy and
Ray's actor RPC: it calls `ModelInfer` on a replica's own grpc.aio server, the same methods (validation,
@serve.batch merging, timings) the proxy reaches. Every expert keeps answering OIP through the proxy as well.

Publication: a replica with `ExpertDeployment.direct_host` set binds `host:0` when it starts and, once it holds
an expert, writes the key `<application>/<replica id>/<host:port>` (empty value) into Ray's GCS key-value
store, namespace `mode_ray_direct`; the router lists the keys of an application's prefix (one call gives
every address). A replica deletes its key when Serve stops it; the router deletes an application's keys when
it removes the expert, and deletes the key of an address that refuses connections (a replica that was
killed); an address that fails otherwise is skipped for a while.

`direct_host`: an address to bind, or `node` for the Ray node's IP (what Ray's own inter-node traffic uses; a
router on another node can reach it). These ports carry cluster-internal traffic only, like Ray's own.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from mode_ray.proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from mode_ray.serve.oip import GRPC_MESSAGE_OPTIONS

logger = logging.getLogger("ray.serve")

NAMESPACE = "mode_ray_direct"
NODE = "node"


def _kv() -> Any:
    from ray.experimental import internal_kv

    return internal_kv


def published(app: str) -> list[str]:
    """The direct addresses (host:port) the replicas of Serve application `app` have published."""
    keys = _kv()._internal_kv_list(f"{app}/".encode(), namespace=NAMESPACE)
    return sorted({k.decode().rsplit("/", 1)[-1] for k in keys})


def forget(app: str, address: str) -> None:
    """Delete the key of `address` under `app`: its replica is gone (it refused a connection) without the
    goodbye a graceful stop gives (a killed process, a lost node)."""
    for key in _kv()._internal_kv_list(f"{app}/".encode(), namespace=NAMESPACE):
        if key.decode().endswith(f"/{address}"):
            _kv()._internal_kv_del(key, namespace=NAMESPACE)


def unpublish_app(app: str) -> None:
    """Forget every address of `app` (its expert was removed)."""
    _kv()._internal_kv_del(f"{app}/".encode(), del_by_prefix=True, namespace=NAMESPACE)


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """OIP v2 methods of one replica: the ExpertServer's own (they take `grpc_context` and set its status)."""

    def __init__(self, expert: Any) -> None:
        self._expert = expert

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._expert.ServerLive(request, grpc_context=context)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._expert.ServerReady(request, grpc_context=context)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._expert.ServerMetadata(request, grpc_context=context)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._expert.ModelReady(request, grpc_context=context)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._expert.ModelMetadata(request, grpc_context=context)

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self._expert.ModelInfer(request, grpc_context=context)


class DirectServer:
    """One replica's own OIP server. Create it on the replica's event loop (the one its methods and
    @serve.batch run on), then `await start()`; `publish()` once the replica holds an expert."""

    def __init__(self, expert: Any, host: str) -> None:
        from ray import serve

        context = serve.get_replica_context()
        self._app, self._replica = context.app_name, context.replica_id.unique_id
        bind = _node_ip() if host == NODE else host
        self._server = grpc.aio.server(options=GRPC_MESSAGE_OPTIONS)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(expert), self._server)
        port = self._server.add_insecure_port(f"{_bracket(bind)}:0")
        if port == 0:
            raise RuntimeError(f"direct_host {host!r}: cannot bind a port on {bind!r}")
        advertised = _node_ip() if bind in ("0.0.0.0", "::") else bind
        self.address = f"{_bracket(advertised)}:{port}"
        self._key = f"{self._app}/{self._replica}/{self.address}".encode()
        self._started = self._published = False

    async def start(self) -> None:
        await self._server.start()
        self._started = True
        logger.info("direct OIP server of %s (replica %s) on %s", self._app, self._replica, self.address)

    def publish(self) -> None:
        """Make this replica's address known to routers (blocking GCS call: a few ms)."""
        if self._started and not self._published:
            _kv()._internal_kv_put(self._key, b"", overwrite=True, namespace=NAMESPACE)
            self._published = True

    def unpublish(self) -> None:
        if self._published:
            try:
                _kv()._internal_kv_del(self._key, namespace=NAMESPACE)
            except Exception:  # noqa: BLE001 - the cluster is going down: routers skip the dead address
                pass
            self._published = False


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host

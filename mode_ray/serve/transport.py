"""The router's transport to experts: one small `ExpertClient` interface, three implementations.

- `GrpcExpertClient`: Open Inference Protocol `ModelInfer` over grpc.aio, through the Serve gRPC proxy
  (metadata `application=expert-<name>`) or straight to any OIP endpoint (Triton, KServe, standalone).
- `HandleExpertClient`: a Serve `DeploymentHandle` call of the expert's `infer_arrays` (Ray actor RPC, numpy
  payloads through the object store, no proxy hop, no protobuf). Only for experts deployed on this cluster.
- `DirectExpertClient`: OIP `ModelInfer` over grpc.aio straight to the expert's replicas, each on its own port
  (mode_ray.serve.direct), rows balanced by the rows each replica has in flight; the handle while no replica
  has published an address (or none answers).

Every reply carries the time split the router's per-tick breakdown needs (`ExpertReply`). (The user-facing
HTTP client of a cluster is `mode_ray.client`.)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import grpc
import numpy as np
import torch

from mode_ray.proto.inference import grpc_predict_v2_pb2 as pb
from mode_ray.proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from mode_ray.serve.config import expert_app_name, expert_deployment_of
from mode_ray.serve.errors import ExpertCallError
from mode_ray.serve.oip import (
    GRPC_MESSAGE_OPTIONS,
    decode_infer_response,
    decode_parameters,
    encode_infer_request,
)

_CHANNELS: dict[str, grpc.aio.Channel] = {}
Transport = Literal["grpc", "handle", "direct"]
DEAD_ADDRESS_S = 30.0  # an address that refused a connection is skipped this long
LIST_EVERY_S = 1.0  # how often a direct client reads the addresses its expert's replicas published


@dataclass(frozen=True)
class ExpertReply:
    """x0_hat: (R, C, H, W) float32, and where the call's time went (seconds): encode and decode in the
    router, wire from send to reply, forward / queue as the expert reported them (0 when it does not), and
    the answering replica's age (None when not reported)."""

    x0_hat: torch.Tensor
    encode_s: float = 0.0
    wire_s: float = 0.0
    decode_s: float = 0.0
    forward_s: float = 0.0
    queue_s: float = 0.0
    age_s: float | None = None

    @property
    def cold_start(self) -> bool:
        """The call was sent before the replica that answered it existed: it waited for a replica to start
        (scale from zero, or every replica lost)."""
        return self.age_s is not None and self.wire_s > self.age_s


class ExpertClient(Protocol):
    name: str

    async def infer(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None, timeout: float
    ) -> ExpertReply:
        """x: (R, C, H, W), sigma: (R,), cond: (R, D) or None -> the expert's x0_hat and timings."""
        ...

    async def ready(self, timeout: float) -> bool: ...


def channel(target: str) -> grpc.aio.Channel:
    """One shared channel per target and event loop process (HTTP/2 multiplexes concurrent calls)."""
    if target not in _CHANNELS:
        _CHANNELS[target] = grpc.aio.insecure_channel(target, options=GRPC_MESSAGE_OPTIONS)
    return _CHANNELS[target]


def wire_inputs(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None, fp16: bool) -> dict:
    """The model inputs as numpy: x FP32 (or FP16 on the wire), sigma and cond FP32; a packed text condition
    (R, 1 + L, D) goes as the pooled `cond` (R, D) and `cond_tokens` (R, L, D)."""
    inputs = {
        "x": x.detach().cpu().numpy().astype(np.float16 if fp16 else np.float32, copy=False),
        "sigma": sigma.detach().cpu().numpy().astype(np.float32, copy=False),
    }
    if cond is not None:
        c = cond.detach().cpu().numpy().astype(np.float32, copy=False)
        if c.ndim == 3:
            inputs["cond"], inputs["cond_tokens"] = (
                np.ascontiguousarray(c[:, 0]),
                np.ascontiguousarray(c[:, 1:]),
            )
        else:
            inputs["cond"] = c
    return inputs


def _x0_hat(name: str, out: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    if out.shape != tuple(x.shape):
        raise ExpertCallError(f"expert {name!r} returned shape {list(out.shape)}, expected {list(x.shape)}")
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def _ms(params: dict[str, Any], key: str) -> float:
    value = params.get(key, 0.0)
    return float(value) / 1e3 if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _reply(x0: torch.Tensor, t0: float, t1: float, t2: float, params: dict[str, Any]) -> ExpertReply:
    """The reply of a call encoded from t0 to t1, answered at t2, with the parameters the expert reported."""
    age = _ms(params, "age_ms") if "age_ms" in params else None
    decode = time.perf_counter() - t2
    return ExpertReply(x0, t1 - t0, t2 - t1, decode, _ms(params, "forward_ms"), _ms(params, "queue_ms"), age)


class GrpcExpertClient:
    """OIP `ModelInfer` over grpc.aio. With `application` set, the call goes through the Serve gRPC proxy
    (metadata `application=expert-<name>`); without it, to a plain OIP server at `target`."""

    def __init__(self, name: str, target: str, application: str | None, fp16: bool = False) -> None:
        self.name, self.target, self.application, self.fp16 = name, target, application, fp16
        self._stub = pb_grpc.GRPCInferenceServiceStub(channel(target))
        self._metadata = (("application", application),) if application else ()

    async def infer(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None, timeout: float
    ) -> ExpertReply:
        t0 = time.perf_counter()
        request = encode_infer_request(
            self.name,
            wire_inputs(x, sigma, cond, self.fp16),
            request_id=uuid.uuid4().hex[:16],
            outputs=["x0_hat"],
        )
        t1 = time.perf_counter()
        try:
            reply = await self._stub.ModelInfer(request, metadata=self._metadata, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise ExpertCallError(f"expert {self.name!r}: {e.code().name}: {e.details()}", e.code()) from None
        t2 = time.perf_counter()
        try:
            out = decode_infer_response(reply)["x0_hat"]
            params = decode_parameters(reply.parameters)
        except (KeyError, ValueError) as e:
            raise ExpertCallError(f"expert {self.name!r} replied without a valid x0_hat: {e}") from None
        x0 = _x0_hat(self.name, out, x)
        return _reply(x0, t0, t1, t2, params)

    async def ready(self, timeout: float = 5.0) -> bool:
        try:
            reply = await self._stub.ModelReady(
                pb.ModelReadyRequest(name=self.name), metadata=self._metadata, timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.ready)


class HandleExpertClient:
    """`ExpertServer.infer_arrays` through a Serve DeploymentHandle (Ray actor RPC; Serve balances calls over
    the expert's replicas by their queue length). Readiness is asked over OIP through the proxy, which every
    expert keeps answering."""

    def __init__(self, name: str, proxy_target: str, fp16: bool = False, app: str | None = None) -> None:
        self.name, self.fp16 = name, fp16
        self.app = app or expert_app_name(name)
        self._oip = GrpcExpertClient(name, proxy_target, self.app, fp16)
        self._handle: Any = None

    def _get_handle(self) -> Any:
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle(expert_deployment_of(self.app, self.name), self.app)
        return self._handle

    async def infer(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None, timeout: float
    ) -> ExpertReply:
        t0 = time.perf_counter()
        inputs = wire_inputs(x, sigma, cond, self.fp16)
        t1 = time.perf_counter()
        try:
            response = self._get_handle().infer_arrays.remote(inputs)
            try:
                out, params = await asyncio.wait_for(asyncio.shield(response), timeout)
            except TimeoutError:
                response.cancel()
                raise ExpertCallError(
                    f"expert {self.name!r}: DEADLINE_EXCEEDED after {timeout:.2f}s",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ) from None
        except ExpertCallError:
            raise
        except Exception as e:  # noqa: BLE001 - a dead replica, a rejected input, Serve's own errors
            cause = getattr(e, "cause", None)
            code = cause.code if isinstance(cause, ExpertCallError) else grpc.StatusCode.UNAVAILABLE
            detail = str(cause or e).strip().splitlines()
            raise ExpertCallError(
                f"expert {self.name!r}: {code.name}: {detail[-1] if detail else type(e).__name__}", code
            ) from None
        t2 = time.perf_counter()
        x0 = _x0_hat(self.name, out, x)
        return _reply(x0, t0, t1, t2, params)

    async def ready(self, timeout: float = 5.0) -> bool:
        return await self._oip.ready(timeout)


class DirectExpertClient:
    """OIP `ModelInfer` straight to the replicas of Serve application `app` (their published addresses, read
    at most every LIST_EVERY_S in a worker thread, never on the call's path). Each call goes to the replica
    with the fewest rows in flight from this router; a replica that cannot be reached (UNAVAILABLE) is
    skipped for DEAD_ADDRESS_S (its published key deleted when nothing listens there) and the call goes to
    the next one, or through the handle when none is left.
    `calls` counts the calls each way (`direct`, `handle`)."""

    def __init__(self, name: str, proxy_target: str, fp16: bool = False, app: str | None = None) -> None:
        self.name, self.fp16 = name, fp16
        self.app = app or expert_app_name(name)
        self._handle = HandleExpertClient(name, proxy_target, fp16, self.app)
        self._replicas: dict[str, GrpcExpertClient] = {}  # address -> client
        self._in_flight: dict[str, int] = {}  # address -> rows sent and not yet answered
        self._dead: dict[str, float] = {}  # address -> monotonic time until which it is skipped
        self._listed_at = -float("inf")
        self._listing: asyncio.Task | None = None
        self.calls = {"direct": 0, "handle": 0}
        self.rows_sent: dict[str, int] = {}  # address -> rows answered there

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._listed_at < LIST_EVERY_S or self._listing is not None:
            return
        self._listed_at = now
        self._listing = asyncio.get_running_loop().create_task(self._list())

    async def _list(self) -> None:
        from mode_ray.serve.direct import published

        try:
            addresses = await asyncio.to_thread(published, self.app)
        except Exception:  # noqa: BLE001 - the GCS briefly unreachable: keep the last list, try again
            addresses = list(self._replicas)
        finally:
            self._listing = None
        for gone in set(self._replicas) - set(addresses):
            self._replicas.pop(gone)
            self._in_flight.pop(gone, None)
        for address in addresses:
            if address not in self._replicas:
                self._replicas[address] = GrpcExpertClient(self.name, address, None, self.fp16)
                self._in_flight[address] = 0

    async def _forget(self, address: str) -> None:
        from mode_ray.serve.direct import forget

        try:
            await asyncio.to_thread(forget, self.app, address)
        except Exception:  # noqa: BLE001 - the GCS briefly unreachable: the address stays skipped meanwhile
            pass

    def addresses(self) -> list[str]:
        """The replicas' addresses this client knows (published, not skipped as dead)."""
        now = time.monotonic()
        return [a for a in self._replicas if self._dead.get(a, 0.0) <= now]

    async def infer(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None, timeout: float
    ) -> ExpertReply:
        self._refresh()
        while live := self.addresses():
            address = min(live, key=lambda a: self._in_flight[a])
            rows = int(x.shape[0])
            self._in_flight[address] += rows
            try:
                reply = await self._replicas[address].infer(x, sigma, cond, timeout)
            except ExpertCallError as e:
                if e.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                self._dead[address] = time.monotonic() + DEAD_ADDRESS_S  # a stopped replica: next one
                if "connection refused" in str(e).lower():  # nothing listens there: a killed replica's key
                    asyncio.get_running_loop().create_task(self._forget(address))
                continue
            finally:
                if address in self._in_flight:
                    self._in_flight[address] -= rows
            self.calls["direct"] += 1
            self.rows_sent[address] = self.rows_sent.get(address, 0) + rows
            return reply
        self.calls["handle"] += 1
        return await self._handle.infer(x, sigma, cond, timeout)

    async def refresh(self) -> list[str]:
        """Read the published addresses now (the router does before an expert's first call); returns the
        live ones."""
        self._listed_at = time.monotonic()
        await self._list()
        return self.addresses()

    async def ready(self, timeout: float = 5.0) -> bool:
        """ModelReady from a replica's own port (the first that says so), else through the proxy."""
        for address in await self.refresh():
            if await self._replicas[address].ready(timeout):
                return True
        return await self._handle.ready(timeout)


def client_for(
    name: str,
    endpoint: str,
    proxy_target: str,
    transport: Transport = "grpc",
    fp16: bool = False,
    app: str | None = None,
) -> ExpertClient:
    """The client of a registered expert: `endpoint` 'serve' (deployed here, as Serve application `app`,
    default expert-<name>) uses `transport`; an external OIP endpoint (host:port) is always called over gRPC."""
    if endpoint != "serve":
        return GrpcExpertClient(name, endpoint, None, fp16)
    if transport == "handle":
        return HandleExpertClient(name, proxy_target, fp16, app)
    if transport == "direct":
        return DirectExpertClient(name, proxy_target, fp16, app)
    return GrpcExpertClient(name, proxy_target, app or expert_app_name(name), fp16)

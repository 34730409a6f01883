"""The router's transport to experts: one small `ExpertClient` interface; gRPC (Open Inference Protocol)
through the Serve gRPC proxy, or straight to any OIP endpoint, is the default. (The user-facing HTTP
client of a cluster is `mode_ray.client`.)"""

from __future__ import annotations

import uuid
from typing import Protocol

import grpc
import numpy as np
import torch

from mode_ray.proto.inference import grpc_predict_v2_pb2 as pb
from mode_ray.proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from mode_ray.serve.config import expert_app_name
from mode_ray.serve.errors import ExpertCallError
from mode_ray.serve.oip import decode_infer_response, encode_infer_request

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_CHANNELS: dict[str, grpc.aio.Channel] = {}


class ExpertClient(Protocol):
    name: str

    async def infer(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None, timeout: float
    ) -> torch.Tensor:
        """x: (R, C, H, W), sigma: (R,), cond: (R, D) or None -> x0_hat: (R, C, H, W) float32."""
        ...

    async def ready(self, timeout: float) -> bool: ...


def channel(target: str) -> grpc.aio.Channel:
    """One shared channel per target and event loop process (HTTP/2 multiplexes concurrent calls)."""
    if target not in _CHANNELS:
        _CHANNELS[target] = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
    return _CHANNELS[target]


class GrpcExpertClient:
    """OIP `ModelInfer` over grpc.aio. With `application` set, the call goes through the Serve gRPC proxy
    (metadata `application=expert-<name>`); without it, to a plain OIP server at `target`."""

    def __init__(self, name: str, target: str, application: str | None, fp16: bool = False) -> None:
        self.name, self.target, self.application, self.fp16 = name, target, application, fp16
        self._stub = pb_grpc.GRPCInferenceServiceStub(channel(target))
        self._metadata = (("application", application),) if application else ()

    @classmethod
    def for_entry(cls, name: str, endpoint: str, proxy_target: str, fp16: bool = False) -> GrpcExpertClient:
        if endpoint == "serve":
            return cls(name, proxy_target, expert_app_name(name), fp16)
        return cls(name, endpoint, None, fp16)

    async def infer(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None, timeout: float
    ) -> torch.Tensor:
        inputs = {
            "x": x.detach().cpu().numpy().astype(np.float16 if self.fp16 else np.float32),
            "sigma": sigma.detach().cpu().float().numpy(),
        }
        if cond is not None:
            inputs["cond"] = cond.detach().cpu().float().numpy()
        request = encode_infer_request(
            self.name, inputs, request_id=uuid.uuid4().hex[:16], outputs=["x0_hat"]
        )
        try:
            reply = await self._stub.ModelInfer(request, metadata=self._metadata, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise ExpertCallError(f"expert {self.name!r}: {e.code().name}: {e.details()}", e.code()) from None
        try:
            out = decode_infer_response(reply)["x0_hat"]
        except (KeyError, ValueError) as e:
            raise ExpertCallError(f"expert {self.name!r} replied without a valid x0_hat: {e}") from None
        if out.shape != tuple(x.shape):
            raise ExpertCallError(
                f"expert {self.name!r} returned shape {list(out.shape)}, expected {list(x.shape)}"
            )
        return torch.from_numpy(out).float()

    async def ready(self, timeout: float = 5.0) -> bool:
        try:
            reply = await self._stub.ModelReady(
                pb.ModelReadyRequest(name=self.name), metadata=self._metadata, timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.ready)

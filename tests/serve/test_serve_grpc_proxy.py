"""Probe of the real Ray Serve gRPC proxy with our generated OIP / generation services.

Pins down the behaviour the serving code relies on (Ray 2.60):

* routing: the ``application`` metadata key picks the Serve application; the method
  name of the gRPC path picks the deployment method of that app's ingress;
* with exactly one application every call goes to it, whatever the metadata says;
* with several, an unknown or missing application gives NOT_FOUND;
* an exception raised in a deployment method gives INTERNAL whose details are the
  (ANSI-coloured) RayTaskError text, which contains ``str(exc)`` somewhere inside;
* a method taking a ``grpc_context`` kwarg can set its own status code and details
  (returning normally or raising); the proxy keeps them;
* server-streaming methods (async generators) stream through the proxy;
* ``serve.run(..., name=...)`` of a second app leaves the first one RUNNING.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
import numpy as np
import pytest
from ray import cloudpickle, serve
from ray.serve.grpc_util import RayServegRPCContext

from mode_ray.proto.inference import grpc_predict_v2_pb2 as pb
from mode_ray.proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from mode_ray.proto.mode_ray.v1 import generation_pb2 as gen
from mode_ray.proto.mode_ray.v1 import generation_pb2_grpc as gen_grpc
from mode_ray.serve.oip import (
    OipError,
    decode_infer_request,
    decode_infer_response,
    decode_parameters,
    encode_infer_request,
    encode_infer_response,
)

pytestmark = [pytest.mark.serve, pytest.mark.timeout(180)]

# The deployment class below lives in this test module, which Ray workers cannot import
# by name: ship it by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT_S = 30.0


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class ToyExpert:
    """OIP server multiplying input ``x`` by ``factor``; ``parameters['fail']`` picks an error path."""

    def __init__(self, name: str, factor: float) -> None:
        self.name = name
        self.factor = factor

    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == self.name)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.name,
            versions=["1"],
            platform="toy",
            inputs=[tensor(name="x", datatype="FP32", shape=[-1])],
            outputs=[tensor(name="y", datatype="FP32", shape=[-1])],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, grpc_context: RayServegRPCContext
    ) -> pb.ModelInferResponse:
        fail = decode_parameters(request.parameters).get("fail", "")
        if fail == "plain":
            raise ValueError(f"{self.name} exploded")
        if fail == "code_then_raise":
            grpc_context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
            grpc_context.set_details(f"{self.name} is not warmed up")
            raise RuntimeError("hidden by the user-set details")
        try:
            inputs = decode_infer_request(request)
        except OipError as e:
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(str(e))
            return pb.ModelInferResponse()
        y = inputs["x"] * np.float32(self.factor)
        return encode_infer_response(self.name, "1", {"y": y}, request.id)

    async def GenerateStream(self, request: gen.GenerateRequest):
        total = request.steps
        for step in range(1, total + 1):
            await asyncio.sleep(0)
            yield gen.GenerateProgress(step=step, total_steps=total, sigma=1.0 / step)
        yield gen.GenerateProgress(
            step=total,
            total_steps=total,
            result=gen.GenerateResponse(request_id=self.name, shape=[request.num_images, 3, 8, 8]),
        )


def test_single_app_receives_any_application_name(serve_cluster):
    """With exactly one application, Serve routes every gRPC call to it, whatever the metadata."""
    # This module runs after the other Serve modules have deleted their applications (module fixtures),
    # and before its own `experts` fixture deploys any: a leftover application is a leak elsewhere.
    assert not serve.status().applications, f"applications left deployed: {list(serve.status().applications)}"
    serve.run(ToyExpert.bind("solo", 5.0), name="solo", route_prefix="/solo")
    try:

        async def main():
            async with grpc.aio.insecure_channel(serve_cluster.grpc_target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                wrong = await _infer(stub, "no-such-app", np.ones(2, np.float32))
                none = await stub.ModelReady(pb.ModelReadyRequest(name="solo"), timeout=TIMEOUT_S)
                return wrong, none

        wrong, none = _run(main())
        assert wrong.model_name == "solo"
        np.testing.assert_array_equal(decode_infer_response(wrong)["y"], [5.0, 5.0])
        assert none.ready
    finally:
        serve.delete("solo")


@pytest.fixture(scope="module")
def experts(serve_cluster):
    serve.run(ToyExpert.bind("expert-a", 2.0), name="expert-a", route_prefix="/experts/a")
    serve.run(ToyExpert.bind("expert-b", 3.0), name="expert-b", route_prefix="/experts/b")
    yield serve_cluster
    serve.delete("expert-a")
    serve.delete("expert-b")


def _run(coro):
    return asyncio.run(coro)


def _md(app: str) -> tuple[tuple[str, str], ...]:
    return (("application", app),)


async def _infer(stub, app: str, x: np.ndarray, **params) -> pb.ModelInferResponse:
    req = encode_infer_request(app, {"x": x}, request_id="req-1", parameters=params)
    return await stub.ModelInfer(req, metadata=_md(app), timeout=TIMEOUT_S)


def test_two_apps_both_running_and_routed_by_application_metadata(experts):
    status = serve.status().applications
    assert status["expert-a"].status == "RUNNING"
    assert status["expert-b"].status == "RUNNING"

    x = np.arange(6, dtype=np.float32).reshape(2, 3)

    async def main():
        async with grpc.aio.insecure_channel(experts.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for app, factor in (("expert-a", 2.0), ("expert-b", 3.0)):
                md = _md(app)
                assert (await stub.ServerLive(pb.ServerLiveRequest(), metadata=md, timeout=TIMEOUT_S)).live
                assert (await stub.ServerReady(pb.ServerReadyRequest(), metadata=md, timeout=TIMEOUT_S)).ready
                ready = await stub.ModelReady(pb.ModelReadyRequest(name=app), metadata=md, timeout=TIMEOUT_S)
                assert ready.ready
                meta = await stub.ModelMetadata(
                    pb.ModelMetadataRequest(name=app), metadata=md, timeout=TIMEOUT_S
                )
                assert meta.name == app and [t.name for t in meta.inputs] == ["x"]

                call = stub.ModelInfer(
                    encode_infer_request(app, {"x": x}, request_id="req-1"), metadata=md, timeout=TIMEOUT_S
                )
                resp = await call
                assert (resp.model_name, resp.id) == (app, "req-1")
                np.testing.assert_array_equal(decode_infer_response(resp)["y"], x * factor)
                # Serve echoes its own request id in the trailing metadata.
                trailing = dict(await call.trailing_metadata())
                assert trailing.get("request_id")

    _run(main())

    # serve.run(name="expert-b") must not have replaced expert-a.
    status = serve.status().applications
    assert status["expert-a"].status == "RUNNING" and status["expert-b"].status == "RUNNING"


def test_unknown_or_missing_application_is_not_found(experts):
    async def main():
        async with grpc.aio.insecure_channel(experts.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await stub.ServerLive(pb.ServerLiveRequest(), metadata=_md("expert-zzz"), timeout=TIMEOUT_S)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.ServerLive(pb.ServerLiveRequest(), timeout=TIMEOUT_S)
            return wrong.value, missing.value

    wrong, missing = _run(main())
    print(f"\n[probe] wrong app: {wrong.code()} {wrong.details()!r}")
    print(f"[probe] no app metadata: {missing.code()} {missing.details()!r}")
    assert wrong.code() == grpc.StatusCode.NOT_FOUND
    assert "Application 'expert-zzz' not found" in wrong.details()
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert "Application metadata not set" in missing.details()


def test_errors_surface_as_grpc_status(experts):
    good = np.ones(4, dtype=np.float32)

    async def main():
        async with grpc.aio.insecure_channel(experts.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            errors = {}
            for fail in ("plain", "code_then_raise"):
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await _infer(stub, "expert-a", good, fail=fail)
                errors[fail] = exc.value
            bad = encode_infer_request("expert-a", {"x": good})
            bad.raw_input_contents[0] = b"\0" * 12
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.ModelInfer(bad, metadata=_md("expert-a"), timeout=TIMEOUT_S)
            errors["invalid"] = exc.value
            # The replica is still healthy afterwards.
            resp = await _infer(stub, "expert-a", good)
            np.testing.assert_array_equal(decode_infer_response(resp)["y"], good * 2)
            return errors

    errors = _run(main())
    for name, err in errors.items():
        print(f"\n[probe] {name}: {err.code()} {err.details()[:300]!r}")

    assert errors["plain"].code() == grpc.StatusCode.INTERNAL
    assert "expert-a exploded" in errors["plain"].details()

    assert errors["code_then_raise"].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert errors["code_then_raise"].details() == "expert-a is not warmed up"

    assert errors["invalid"].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert errors["invalid"].details() == (
        "inputs[0] 'x': raw content has 12 bytes, expected 16 for FP32 shape [4]"
    )


def test_server_streaming_through_proxy(experts):
    async def main():
        async with grpc.aio.insecure_channel(experts.grpc_target) as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            stream = stub.GenerateStream(
                gen.GenerateRequest(prompt="a cat", num_images=2, steps=5),
                metadata=_md("expert-b"),
                timeout=TIMEOUT_S,
            )
            return [msg async for msg in stream]

    messages = _run(main())
    assert [m.step for m in messages] == [1, 2, 3, 4, 5, 5]
    assert not any(m.HasField("result") for m in messages[:-1])
    final = messages[-1]
    assert final.HasField("result")
    assert final.result.request_id == "expert-b" and list(final.result.shape) == [2, 3, 8, 8]

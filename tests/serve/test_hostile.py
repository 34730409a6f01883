"""Hostile inputs against a running cluster (real Serve, real HTTP and gRPC, loopback): every one gets a clean
4xx / INVALID_ARGUMENT (or the one status its case calls for) naming the field, no reply carries a traceback,
and after all of them the cluster answers as before with the state it had. Plus the isolation scenarios: a
large request in flight, a client that goes away, a flood, a request that cannot finish in time.

The tiny mixture (tests/tiny.py) is deployed for this module with small engine limits so that the limits
themselves can be reached: two active and two queued requests, 200k model rows per request at most.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from mode_ray.proto.inference import grpc_predict_v2_pb2 as pb
from mode_ray.proto.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from mode_ray.proto.mode_ray.v1 import generation_pb2 as gen
from mode_ray.proto.mode_ray.v1 import generation_pb2_grpc as gen_grpc
from mode_ray.serve.config import APP_NAME
from mode_ray.serve.oip import encode_infer_request
from tests.conftest import ADMIN_TOKEN
from tests.serve.conftest import tiny_app, wait_for
from tests.tiny import build_tiny_mixture, make_expert

pytestmark = pytest.mark.serve
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MAX_REQUEST_ROWS = 200_000


@pytest.fixture(scope="module")
def hostile(serve_cluster, tmp_path_factory):  # noqa: ANN001, ANN201
    model = build_tiny_mixture(tmp_path_factory.mktemp("hostile"))
    for name in (
        "pool-0123abcd",
        "d--v2",
    ):  # names that would take Serve application names the cluster reserves
        make_expert(model / "experts", name, [9], seed=7)
    limits = {"max_active_requests": 2, "max_queued_requests": 2, "max_request_rows": MAX_REQUEST_ROWS}
    with tiny_app(serve_cluster, model, **limits):
        yield serve_cluster, model


def stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Router", app_name=APP_NAME).engine_stats.remote().result()


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text, text[:500]


# ---- the first test: nothing measured yet, so admission cannot refuse by cost ------------------------------
def test_a_stream_whose_deadline_passes_ends_with_deadline_exceeded(hostile) -> None:  # noqa: ANN001
    """It ended without a status (OK, empty details) before."""
    sc, _ = hostile
    assert stats()["rows_per_s"] is None  # admission by cost is not active yet (see test_admission_by_cost)

    async def main() -> tuple[int, grpc.aio.AioRpcError]:
        async with grpc.aio.insecure_channel(sc.grpc_target) as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            seen = 0
            request = gen.GenerateRequest(prompt="3", num_images=1, steps=1000, seed=1, deadline_s=1.5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.GenerateStream(
                    request, metadata=(("application", APP_NAME),), timeout=60
                ):
                    seen += 1
            return seen, err.value

    seen, err = asyncio.run(main())
    assert seen >= 1 and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (seen, err)
    assert "deadline" in err.details()
    no_traceback(err.details())


# ---- HTTP POST /v1/generate --------------------------------------------------------------------------------
HTTP_CASES = [
    # (id, body or raw bytes, status, words the message must hold)
    ("images 0", {"num_images": 0}, 422, ["num_images"]),
    ("images 257", {"num_images": 257}, 422, ["num_images"]),
    ("images float", {"num_images": 2.5}, 422, ["num_images"]),
    ("images string", {"num_images": "many"}, 422, ["num_images"]),
    ("steps 0", {"steps": 0}, 422, ["steps"]),
    ("steps 1001", {"steps": 1001}, 422, ["steps"]),
    ("seed -1", {"seed": -1}, 422, ["seed"]),
    ("seed 2**64", {"seed": 2**64}, 422, ["seed"]),
    ("guidance -1", {"guidance_scale": -1}, 422, ["guidance_scale"]),
    ("guidance 1e300", {"guidance_scale": 1e300}, 422, ["guidance_scale"]),
    ("guidance NaN", b'{"guidance_scale": NaN}', 422, ["guidance_scale"]),
    ("guidance Infinity", b'{"guidance_scale": Infinity}', 422, ["guidance_scale"]),
    ("top_k 0", {"top_k": 0}, 422, ["top_k"]),
    ("top_k 17", {"top_k": 17}, 422, ["top_k"]),
    ("top_p 0", {"top_p": 0}, 422, ["top_p"]),
    ("top_p 1.5", {"top_p": 1.5}, 422, ["top_p"]),
    ("top_p NaN", b'{"top_p": NaN}', 422, ["top_p"]),
    ("min_weight 1", {"min_weight": 1}, 422, ["min_weight"]),
    ("min_weight -0.1", {"min_weight": -0.1}, 422, ["min_weight"]),
    ("sampler", {"sampler": "magic"}, 422, ["sampler"]),
    ("prompt blank", {"prompt": "   "}, 422, ["prompt", "blank"]),
    ("prompt 5000 chars", {"prompt": "x" * 5000}, 422, ["prompt", "at most 1000"]),
    ("prompt unknown", {"prompt": "giraffe"}, 400, ["prompt", "giraffe"]),
    ("prompt object", {"prompt": {"a": 1}}, 422, ["prompt"]),
    ("class 10", {"class": 10}, 400, ["class", "[0, 9]"]),
    ("class -1", {"class": -1}, 422, ["class"]),
    ("prompt and class", {"prompt": 1, "class": 1}, 400, ["either prompt or class"]),
    ("unconditional unknown", {"unconditional": "maybe"}, 422, ["unconditional", "prior"]),
    ("unconditional with a prompt", {"prompt": 1, "unconditional": "prior"}, 400, ["unconditional"]),
    ("expert unknown", {"prompt": 1, "experts": ["nope"]}, 400, ["experts", "nope"]),
    ("exclude unknown", {"prompt": 1, "exclude_experts": ["nope"]}, 400, ["exclude_experts", "nope"]),
    (
        "exclude all",
        {"prompt": 1, "exclude_experts": ["a", "b", "c"]},
        400,
        ["exclude_experts: excluding", "leaves no expert"],
    ),
    ("experts not a list", {"experts": "a"}, 422, ["experts"]),
    ("expert name 500 chars", {"experts": ["a" * 500]}, 422, ["experts"]),
    ("1000 pinned experts", {"experts": ["a"] * 1000}, 422, ["experts"]),
    ("unknown field", {"prompt": 1, "colour": "red"}, 422, ["colour"]),
    ("output", {"output": "gif"}, 422, ["output"]),
    ("trace", {"output": "json", "trace": "all"}, 422, ["trace"]),
    ("timing", {"timing": [1]}, 422, ["timing"]),
    ("deadline 0", {"deadline_s": 0}, 422, ["deadline_s"]),
    ("deadline 3601", {"deadline_s": 3601}, 422, ["deadline_s"]),
    ("deadline NaN", b'{"deadline_s": NaN}', 422, ["deadline_s"]),
    ("not JSON", b"{num_images: 4", 422, ["JSON"]),
    ("a JSON list", b"[1, 2]", 422, ["body"]),
    ("too many rows", {"num_images": 256, "steps": 1000}, 400, ["max_request_rows", str(MAX_REQUEST_ROWS)]),
]


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/generate/stream"])
@pytest.mark.parametrize(
    ("body", "status", "words"), [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES]
)
def test_http_generate_rejects_at_the_edge(hostile, path, body, status, words) -> None:  # noqa: ANN001
    """The same refusals from the one-shot endpoint and the event stream (which refuses before it starts)."""
    sc, _ = hostile
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {}
    r = httpx.post(f"{sc.http_url}{path}", json=None if kw else body, timeout=60, **kw)
    assert r.status_code == status, r.text
    message = r.json().get("error") or r.json().get("detail")
    for word in words:
        assert word in str(message), (word, message)
    no_traceback(r.text)
    assert len(r.text) < 2000  # never the whole input echoed back


# ---- gRPC Generate and GenerateStream ------------------------------------------------------------------------
GRPC_CASES = [
    ("images -1", gen.GenerateRequest(prompt="4", num_images=-1), ["num_images"]),
    ("images 300", gen.GenerateRequest(prompt="4", num_images=300), ["num_images"]),
    ("steps -3", gen.GenerateRequest(prompt="4", steps=-3), ["steps"]),
    ("deadline nan", gen.GenerateRequest(prompt="4", deadline_s=float("nan")), ["deadline_s"]),
    ("deadline inf", gen.GenerateRequest(prompt="4", deadline_s=float("inf")), ["deadline_s"]),
    ("deadline 1e9", gen.GenerateRequest(prompt="4", deadline_s=1e9), ["deadline_s"]),
    ("deadline -1", gen.GenerateRequest(prompt="4", deadline_s=-1), ["deadline_s"]),
    ("guidance nan", gen.GenerateRequest(prompt="4", guidance_scale=float("nan")), ["guidance_scale"]),
    ("top_p 3", gen.GenerateRequest(prompt="4", top_p=3.0), ["top_p"]),
    ("top_k 0", gen.GenerateRequest(prompt="4", top_k=0), ["top_k"]),
    ("prompt 200 KB", gen.GenerateRequest(prompt="7" * 200_000), ["prompt", "at most 1000"]),
    ("prompt unknown", gen.GenerateRequest(prompt="giraffe"), ["prompt", "giraffe"]),
    ("class 99", gen.GenerateRequest(class_label=99), ["class"]),
    ("unconditional", gen.GenerateRequest(unconditional="maybe"), ["unconditional"]),
    ("unconditional, prompt", gen.GenerateRequest(prompt="4", unconditional="null"), ["unconditional"]),
    ("sampler", gen.GenerateRequest(prompt="4", sampler="magic"), ["sampler"]),
    ("output", gen.GenerateRequest(prompt="4", output="gif"), ["output"]),
    ("trace", gen.GenerateRequest(prompt="4", trace="all"), ["trace"]),
    ("expert unknown", gen.GenerateRequest(prompt="4", experts=["nope"]), ["experts", "nope"]),
    ("too many rows", gen.GenerateRequest(prompt="4", num_images=256, steps=1000), ["max_request_rows"]),
]


def _stub_calls(target: str, fn):  # noqa: ANN001, ANN201
    async def main():  # noqa: ANN202
        async with grpc.aio.insecure_channel(target) as channel:
            return await fn(gen_grpc.GenerationServiceStub(channel))

    return asyncio.run(main())


@pytest.mark.parametrize("stream", [False, True], ids=["Generate", "GenerateStream"])
@pytest.mark.parametrize("request_", [c[1] for c in GRPC_CASES], ids=[c[0] for c in GRPC_CASES])
def test_grpc_generate_rejects_before_anything_is_streamed(hostile, request_, stream) -> None:  # noqa: ANN001
    """INVALID_ARGUMENT naming the field; a stream ends with it before its first message (GenerateStream
    ended with OK and empty details before, and checked nothing but the message fields up front)."""
    sc, _ = hostile
    words = next(c[2] for c in GRPC_CASES if c[1] is request_)
    md = (("application", APP_NAME),)

    async def call(stub):  # noqa: ANN001, ANN202
        messages = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            if stream:
                async for m in stub.GenerateStream(request_, metadata=md, timeout=60):
                    messages.append(m)
            else:
                await stub.Generate(request_, metadata=md, timeout=60)
        return messages, err.value

    messages, err = _stub_calls(sc.grpc_target, call)
    assert messages == []
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    for word in words:
        assert word in err.details(), (word, err.details())
    no_traceback(err.details())
    assert len(err.details()) < 2000


# ---- OIP straight to an expert, and the wrong application ---------------------------------------------------
def _x(rows: int = 2) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(rows, 1, 28, 28)).astype(np.float32)


def _oip(inputs: dict, model: str = "a") -> pb.ModelInferRequest:
    return encode_infer_request(model, inputs)


def _huge_empty() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="a")
    req.inputs.add(name="x", datatype="FP32", shape=[0, 2**40, 2**40, 1])
    req.inputs.add(name="sigma", datatype="FP32", shape=[0])
    req.raw_input_contents.extend([b"", b""])
    return req


SIGMA = np.array([1.0, 5.0], np.float32)
NAN_X = _x()
NAN_X[1, 0, 3, 4] = np.nan
INF_X = _x()
INF_X[0, 0, 0, 0] = np.inf
OIP_CASES = [
    ("x nan", _oip({"x": NAN_X, "sigma": SIGMA}), grpc.StatusCode.INVALID_ARGUMENT, ["'x'", "not finite"]),
    ("x inf", _oip({"x": INF_X, "sigma": SIGMA}), grpc.StatusCode.INVALID_ARGUMENT, ["'x'", "not finite"]),
    (
        "x shape",
        _oip({"x": _x()[:, :, :27], "sigma": SIGMA}),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["'x'", "27"],
    ),
    (
        "x fp64",
        _oip({"x": _x().astype(np.float64), "sigma": SIGMA}),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["FP64"],
    ),
    (
        "sigma 0",
        _oip({"x": _x(), "sigma": np.zeros(2, np.float32)}),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["sigma"],
    ),
    ("sigma rows", _oip({"x": _x(), "sigma": SIGMA[:1]}), grpc.StatusCode.INVALID_ARGUMENT, ["sigma"]),
    (
        "cond width",
        _oip({"x": _x(), "sigma": SIGMA, "cond": np.zeros((2, 3), np.float32)}),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["cond"],
    ),
    ("extra input", _oip({"x": _x(), "sigma": SIGMA, "z": SIGMA}), grpc.StatusCode.INVALID_ARGUMENT, ["'z'"]),
    ("empty but huge", _huge_empty(), grpc.StatusCode.INVALID_ARGUMENT, ["beyond this codec's limits"]),
    ("wrong model", _oip({"x": _x(), "sigma": SIGMA}, "b"), grpc.StatusCode.NOT_FOUND, ["'b'"]),
]


@pytest.mark.parametrize(
    ("request_", "code", "words"), [c[1:] for c in OIP_CASES], ids=[c[0] for c in OIP_CASES]
)
def test_oip_model_infer_rejects_bad_tensors(hostile, request_, code, words) -> None:  # noqa: ANN001
    sc, _ = hostile

    async def main() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(sc.grpc_target) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ModelInfer(request_, metadata=(("application", "expert-a"),), timeout=60)
            return err.value

    err = asyncio.run(main())
    assert err.code() == code, (err.code(), err.details())
    for word in words:
        assert word in err.details(), (word, err.details())
    no_traceback(err.details())


# ---- the admin API ----------------------------------------------------------------------------------------
def _card_variant(model: Path, dirname: str, **changes) -> str:  # noqa: ANN003
    """A new expert in `dirname` with card fields changed (a dict value merges into the field)."""
    path = make_expert(model / "experts", dirname, [1], seed=21)
    card = json.loads((path / "expert.json").read_text())
    for key, value in changes.items():
        card[key] = (
            {**card[key], **value} if isinstance(value, dict) and isinstance(card.get(key), dict) else value
        )
    (path / "expert.json").write_text(json.dumps(card))
    return dirname


def _fifo(model: Path) -> str:
    path = make_expert(model / "experts", "fifo", [1], seed=22)
    (path / "expert.json").unlink()
    os.mkfifo(path / "expert.json")
    return "fifo"


def _link_out(model: Path) -> str:
    path = make_expert(model / "experts", "linked", [1], seed=23)
    outside = model.parent / "elsewhere.safetensors"
    (path / "model.safetensors").rename(outside)
    (path / "model.safetensors").symlink_to(outside)
    return "linked"


ADMIN_CASES = [
    # (id, make the body from the model dir, status, words)
    ("outside the root", lambda m: {"path": "../../etc"}, 400, ["outside the expert root"]),
    ("name too long", lambda m: {"path": "x" * 300}, 400, ["File name too long"]),
    ("missing dir", lambda m: {"path": "nothing-here"}, 400, ["not an expert directory"]),
    ("already registered", lambda m: {"path": "a"}, 409, ["already registered"]),
    ("unknown field", lambda m: {"paht": "d"}, 422, ["paht"]),
    ("bad device", lambda m: {"path": "d", "deployment": {"device": "bogus"}}, 422, ["deployment.device"]),
    (
        "max_call_rows below the router's",
        lambda m: {"path": "d", "deployment": {"max_call_rows": 4}},
        400,
        ["max_call_rows"],
    ),
    ("expert.json is a FIFO", lambda m: {"path": _fifo(m)}, 400, ["not a regular file"]),
    ("weights link outside", lambda m: {"path": _link_out(m)}, 400, ["outside"]),
    ("groups 0", lambda m: {"path": _card_variant(m, "g0", backbone_config={"groups": 0})}, 400, ["groups"]),
    (
        "emb_dim -1",
        lambda m: {"path": _card_variant(m, "e1", backbone_config={"emb_dim": -1})},
        400,
        ["emb_dim"],
    ),
    (
        "cond_dim -3",
        lambda m: {"path": _card_variant(m, "c3", backbone_config={"cond_dim": -3})},
        400,
        ["cond_dim"],
    ),
    (
        "NaN prototype",
        lambda m: {"path": _card_variant(m, "np", prototype=[float("nan")] * 10)},
        400,
        ["prototype"],
    ),
    (
        "diffusers without ddpm",
        lambda m: {"path": _card_variant(m, "df", backbone="diffusers_unet2d")},
        400,
        ["ddpm"],
    ),
    ("name in card invalid", lambda m: {"path": _card_variant(m, "bn", name="Bad Name!")}, 400, ["name"]),
]


@pytest.mark.parametrize(
    ("make", "status", "words"), [c[1:] for c in ADMIN_CASES], ids=[c[0] for c in ADMIN_CASES]
)
def test_hot_add_refuses_bad_experts_quickly(hostile, make, status, words) -> None:  # noqa: ANN001
    """Each refused within seconds (a FIFO card stalled every generation before), nothing registered."""
    sc, model = hostile
    url = f"{sc.http_url}/v1/experts"
    before = httpx.get(url).json()
    t0 = time.monotonic()
    r = httpx.post(url, json=make(model), headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    assert time.monotonic() - t0 < 30
    for word in words:
        assert word in r.json()["detail"], (word, r.text)
    no_traceback(r.text)
    assert httpx.get(url).json()["registry_version"] == before["registry_version"]


AUTH_CASES = [
    ("no token", {}),
    ("wrong token", {"Authorization": "Bearer wrong"}),
    ("basic scheme", {"Authorization": f"Basic {ADMIN_TOKEN}"}),
    ("non-ASCII token", {"Authorization": "Bearer tökén-✓".encode()}),
]


@pytest.mark.parametrize("headers", [c[1] for c in AUTH_CASES], ids=[c[0] for c in AUTH_CASES])
@pytest.mark.parametrize("method", ["add", "replace", "delete", "gate"])
def test_the_admin_api_needs_the_token(hostile, headers, method) -> None:  # noqa: ANN001
    sc, _ = hostile
    if method == "add":
        r = httpx.post(f"{sc.http_url}/v1/experts", json={"path": "d"}, headers=headers)
    elif method == "replace":
        r = httpx.put(f"{sc.http_url}/v1/experts/a", json={"path": "a"}, headers=headers)
    elif method == "delete":
        r = httpx.delete(f"{sc.http_url}/v1/experts/a", headers=headers)
    else:
        r = httpx.put(f"{sc.http_url}/v1/gate", json={"path": "gate"}, headers=headers)
    assert r.status_code == 401, r.text


@pytest.mark.parametrize(
    ("method", "target"), [("POST", "/v1/experts"), ("PUT", "/v1/experts/a"), ("PUT", "/v1/gate")]
)
@pytest.mark.parametrize("raw", [b"[1, 2]", b"{", b"[" * 100_000], ids=["a list", "truncated", "nested"])
def test_an_admin_body_is_read_only_after_the_token(hostile, method, target, raw) -> None:  # noqa: ANN001
    """Without the token a malformed body is a 401 (it was a 422: the body was parsed first); with it, a 422
    naming the body."""
    sc, _ = hostile
    headers = {"content-type": "application/json"}
    r = httpx.request(method, f"{sc.http_url}{target}", content=raw, headers=headers, timeout=60)
    assert r.status_code == 401, r.text
    r = httpx.request(method, f"{sc.http_url}{target}", content=raw, headers={**headers, **AUTH}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"].startswith("body: "), r.text
    no_traceback(r.text)


@pytest.mark.parametrize(
    ("method", "target", "body", "status", "words"),
    [
        ("delete", "/v1/experts/nope", None, 404, ["no expert named 'nope'"]),
        ("put", "/v1/experts/nope", {"path": "a"}, 404, ["no expert named 'nope'"]),
        ("put", "/v1/experts/a", {"path": "a"}, 409, ["version '1' already"]),
        ("put", "/v1/experts/a", {"path": "b"}, 400, ["names expert 'b', not 'a'"]),
        ("put", "/v1/experts/a", {"path": "../../etc"}, 400, ["outside the expert root"]),
        ("put", "/v1/experts/a", {"path": "a", "endpoint": "10.0.0.1:1"}, 400, ["endpoint"]),
        ("put", "/v1/gate", {"path": "../../etc"}, 400, ["outside"]),
        ("put", "/v1/gate", {"path": "nothing-here"}, 400, ["nothing-here"]),
        ("put", "/v1/gate", {"gate": "x"}, 422, ["gate"]),
        ("post", "/v1/experts", {"path": "pool-0123abcd"}, 400, ["starts with 'pool-'", "warm pool"]),
        ("post", "/v1/experts", {"path": "d--v2"}, 400, ["contains '--'", "replacement versions"]),
        (
            "post",
            "/v1/experts",
            {"path": "d", "endpoint": "127.0.0.1"},
            422,
            ["endpoint must be", "host:port"],
        ),
        (
            "post",
            "/v1/experts",
            {"path": "d", "endpoint": "x" * 5000},
            422,
            ["endpoint must be", "(got 'xxxx", "5002 chars"],
        ),
        ("post", "/v1/experts", {"path": "d", "endpoint": "h:0"}, 422, ["port in 1-65535"]),
    ],
    ids=[
        "delete unknown",
        "replace unknown",
        "replace same version",
        "replace with another expert",
        "replace outside the root",
        "replace elsewhere",
        "gate outside",
        "gate missing",
        "gate unknown field",
        "add a warm-pool name",
        "add a replacement-version name",
        "add with an endpoint without a port",
        "add with a huge endpoint",
        "add with port 0",
    ],
)
def test_admin_calls_with_bad_targets(hostile, method, target, body, status, words) -> None:  # noqa: ANN001
    sc, _ = hostile
    r = httpx.request(method.upper(), f"{sc.http_url}{target}", json=body, headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    for word in words:
        assert word in r.json()["detail"], (word, r.text)
    no_traceback(r.text)


# ---- isolation ------------------------------------------------------------------------------------------
def _open_large(port: int, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        (
            f"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        ).encode()
        + payload
    )
    return sock


def test_a_small_request_beside_a_large_one_and_a_client_that_goes_away(hostile) -> None:  # noqa: ANN001
    """A 1-image request succeeds while a 64-image x 300-step request is in flight, and finishes first (it
    failed with 502 before, after 20-25x its time alone); the large request's client then disconnects and the
    engine drops it (it ran on to its deadline before)."""
    sc, _ = hostile
    sock = _open_large(sc.http_port, {"prompt": 5, "num_images": 64, "steps": 300, "seed": 1})
    try:
        wait_for(lambda: stats()["active"] == 1, "the large request to step")
        small = httpx.post(
            f"{sc.http_url}/v1/generate",
            json={"prompt": 2, "num_images": 1, "seed": 2, "output": "json"},
            timeout=120,
        )
        assert small.status_code == 200, small.text
        assert stats()["active"] == 1  # the large one is still running
    finally:
        sock.close()  # the client goes away
    wait_for(lambda: stats()["active"] == 0, "the engine to drop the disconnected request", timeout=30)


def test_a_flood_gets_fast_503s_beyond_the_engine_capacity(hostile) -> None:  # noqa: ANN001
    """12 requests at once against 2 active + 2 queued: 8 are refused at once with 503 naming the capacity,
    the 4 admitted succeed (before, the router's Serve queue grew without bound)."""
    sc, _ = hostile
    body = {"prompt": 1, "num_images": 1, "steps": 200, "seed": 3, "output": "json"}
    with ThreadPoolExecutor(12) as pool:
        futures = [
            pool.submit(httpx.post, f"{sc.http_url}/v1/generate", json=body, timeout=120) for _ in range(12)
        ]
        responses = [f.result() for f in futures]
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 4 + [503] * 8, [r.text[:200] for r in responses]
    refused = [r.json()["detail"] for r in responses if r.status_code == 503]
    assert all("at capacity" in d for d in refused), refused


def test_admission_by_cost(hostile) -> None:  # noqa: ANN001
    """Once a full tick has measured throughput, a request that cannot finish within its deadline is refused
    at once with 503 (it was a 504 after the whole deadline before)."""
    sc, _ = hostile
    full = httpx.post(
        f"{sc.http_url}/v1/generate", json={"prompt": 1, "num_images": 16, "steps": 3, "seed": 4}, timeout=120
    )
    assert full.status_code == 200 and stats()["rows_per_s"] is not None
    t0 = time.monotonic()
    r = httpx.post(f"{sc.http_url}/v1/generate", json={"prompt": 1, "deadline_s": 0.001}, timeout=60)
    assert r.status_code == 503 and "cannot finish within its deadline of 0.001 s" in r.json()["detail"], (
        r.text
    )
    assert time.monotonic() - t0 < 5


def test_after_everything_the_cluster_answers_with_its_state(hostile) -> None:  # noqa: ANN001
    sc, _ = hostile
    listing = httpx.get(f"{sc.http_url}/v1/experts").json()
    assert sorted(e["name"] for e in listing["experts"]) == ["a", "b", "c"]
    assert all(e["state"] == "ready" for e in listing["experts"])
    r = httpx.post(
        f"{sc.http_url}/v1/generate", json={"prompt": 3, "num_images": 2, "seed": 0, "output": "json"}
    )
    assert (
        r.status_code == 200
        and r.json()["trace_mode"] == "full"
        and len(r.json()["trace"][0]["weights"]) == 2
    )
    assert stats()["active"] == 0 and stats()["queued"] == 0
    status = httpx.get(f"{sc.http_url}/v1/status").json()
    assert sorted(e["name"] for e in status["experts"]) == ["a", "b", "c"]
    page = httpx.get(f"{sc.http_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")

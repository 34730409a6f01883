"""The expert deployment (`mode_ray.serve.expert_server`) on real Ray Serve, called over the gRPC proxy.

A tiny random-weight UNet expert is written to a tmp dir; every ModelInfer result is compared with the same
checkpoint evaluated in-process.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch

from mode_ray.diffusion import EDMPrecond
from mode_ray.models.card import ExpertCard
from mode_ray.models.checkpoint import WEIGHTS_FILE, load_expert, save_expert
from mode_ray.models.unet import UNET_PRESETS, UNet
from mode_ray.proto.inference import grpc_predict_v2_pb2 as pb
from mode_ray.proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from mode_ray.serve.config import ExpertDeployment
from mode_ray.serve.deploy import build_expert_app, deploy_expert
from mode_ray.serve.oip import decode_infer_response, decode_parameters, encode_infer_request

TIMEOUT_S = 30.0
SHAPE = (1, 28, 28)
COND_DIM = 10


def _random_denoiser(seed: int) -> EDMPrecond:
    """The "xs" preset with every parameter perturbed (the preset zero-inits its output convs)."""
    torch.manual_seed(seed)
    model = EDMPrecond(UNet(UNET_PRESETS["xs"]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.empty_like(p).normal_(0.0, 0.2))
    return model.eval()


def _make_expert(path: Path, name: str, seed: int = 0) -> Path:
    card = ExpertCard(
        name=name,
        backbone="unet",
        backbone_config=UNET_PRESETS["xs"].to_dict(),
        latent_shape=SHAPE,
        prototype=[0.1] * COND_DIM,
    )
    return save_expert(path, card, _random_denoiser(seed))


def _inputs(rows: int, seed: int, cond: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {
        "x": rng.standard_normal((rows, *SHAPE)).astype(np.float32),
        "sigma": np.exp(rng.uniform(-3, 3, rows)).astype(np.float32),
    }
    if cond:
        out["cond"] = np.eye(COND_DIM, dtype=np.float32)[rng.integers(0, COND_DIM, rows)]
    return out


# --------------------------------------------------------------------------------------------------------
# no Ray


def test_zero_cond_rows_are_exactly_cond_none():
    """The batching relies on it: an all-zero cond row adds nothing (the cond embedding has no bias)."""
    model = _random_denoiser(1)
    assert model.net.cond_emb.bias is None
    inp = _inputs(4, 0, cond=False)
    x, sigma = torch.from_numpy(inp["x"]), torch.from_numpy(inp["sigma"])
    with torch.inference_mode():
        none = model(x, sigma, None)
        zeros = model(x, sigma, torch.zeros(4, COND_DIM))
        onehot = model(x, sigma, torch.eye(COND_DIM)[:4])
    assert torch.equal(none, zeros)
    assert not torch.allclose(none, onehot)  # the condition does matter


def test_build_expert_app_validates_args(tmp_path):
    expert_dir = _make_expert(tmp_path / "tiny", "tiny")
    with pytest.raises(ValueError, match=r"args\.expert_dir: Field required"):
        build_expert_app({})
    with pytest.raises(
        ValueError, match=r"args\.expert\.max_batch_size: .*greater than or equal to 1.*got 0"
    ):
        build_expert_app({"expert_dir": str(expert_dir), "expert": {"max_batch_size": 0}})
    with pytest.raises(ValueError, match=r"args\.expert\.replicas: Extra inputs are not permitted"):
        build_expert_app({"expert_dir": str(expert_dir), "expert": {"replicas": 2}})
    with pytest.raises(ValueError, match=r"args\.model_dir: Extra inputs"):
        build_expert_app({"expert_dir": str(expert_dir), "model_dir": "x"})
    with pytest.raises(ValueError, match="is not an expert directory"):
        build_expert_app({"expert_dir": str(tmp_path / "missing")})

    app = build_expert_app({"expert_dir": str(expert_dir), "expert": {"num_cpus": 0.5, "max_batch_size": 8}})
    deployment = app._bound_deployment
    assert deployment.name == "Expert-tiny"
    assert deployment.ray_actor_options["num_cpus"] == 0.5
    assert app._bound_deployment.init_args == (str(expert_dir), 8, 0.0, None, None, 128, 2048, None)


# --------------------------------------------------------------------------------------------------------
# real Serve


def _md(app: str) -> tuple[tuple[str, str], ...]:
    return (("application", app),)


@pytest.fixture(scope="module")
def tiny(serve_cluster, tmp_path_factory):
    """`expert-tiny` deployed, and the same checkpoint loaded in-process as the reference."""
    from ray import serve

    expert_dir = _make_expert(tmp_path_factory.mktemp("experts") / "tiny", "tiny")
    started = time.perf_counter()
    app = deploy_expert(expert_dir, ExpertDeployment(num_cpus=0.5, max_replicas=1, max_ongoing_requests=64))
    print(f"\n[expert] deploy_expert(tiny) RUNNING after {time.perf_counter() - started:.1f}s")
    assert app == "expert-tiny"
    yield serve_cluster, load_expert(expert_dir).denoiser
    serve.delete("expert-tiny")


def _reference(denoiser, inp: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        cond = torch.from_numpy(inp["cond"]) if "cond" in inp else None
        x = torch.from_numpy(inp["x"].astype(np.float32))
        return denoiser(x, torch.from_numpy(inp["sigma"]), cond).numpy()


async def _infer(stub, inputs, model="tiny", app="expert-tiny", request_id="r") -> pb.ModelInferResponse:
    req = encode_infer_request(model, inputs, request_id=request_id)
    return await stub.ModelInfer(req, metadata=_md(app), timeout=TIMEOUT_S)


def _with_stub(target: str, fn):
    async def main():
        async with grpc.aio.insecure_channel(target) as channel:
            return await fn(pb_grpc.GRPCInferenceServiceStub(channel))

    return asyncio.run(main())


@pytest.mark.serve
def test_health_and_metadata(tiny):
    cluster, _ = tiny

    async def calls(stub):
        md = _md("expert-tiny")
        live = await stub.ServerLive(pb.ServerLiveRequest(), metadata=md, timeout=TIMEOUT_S)
        ready = await stub.ServerReady(pb.ServerReadyRequest(), metadata=md, timeout=TIMEOUT_S)
        server = await stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=md, timeout=TIMEOUT_S)
        model_ready = {
            (name, version): (
                await stub.ModelReady(pb.ModelReadyRequest(name=name, version=version), metadata=md)
            ).ready
            for name, version in (("tiny", ""), ("tiny", "1"), ("tiny", "2"), ("other", ""))
        }
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), metadata=md, timeout=TIMEOUT_S)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="other"), metadata=md, timeout=TIMEOUT_S)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND and "'other'" in exc.value.details()
        return live, ready, server, model_ready, meta

    live, ready, server, model_ready, meta = _with_stub(cluster.grpc_target, calls)
    assert live.live and ready.ready
    assert server.name == "mode_ray-expert" and server.version
    assert model_ready == {
        ("tiny", ""): True,
        ("tiny", "1"): True,
        ("tiny", "2"): False,
        ("other", ""): False,
    }
    assert meta.name == "tiny" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("x", "FP32", [-1, 1, 28, 28]),
        ("sigma", "FP32", [-1]),
        ("cond", "FP32", [-1, COND_DIM]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("x0_hat", "FP32", [-1, 1, 28, 28])
    ]


@pytest.mark.serve
def test_model_infer_matches_in_process(tiny):
    cluster, denoiser = tiny
    full = _inputs(3, 1)
    no_cond = _inputs(2, 2, cond=False)
    half = dict(_inputs(3, 3), x=_inputs(3, 3)["x"].astype(np.float16))

    async def calls(stub):
        return [await _infer(stub, inp, request_id=f"r{i}") for i, inp in enumerate((full, no_cond, half))]

    r_full, r_no_cond, r_half = _with_stub(cluster.grpc_target, calls)

    assert (r_full.model_name, r_full.model_version, r_full.id) == ("tiny", "1", "r0")
    assert [o.name for o in r_full.outputs] == ["x0_hat"] and r_full.outputs[0].datatype == "FP32"
    out = decode_infer_response(r_full)["x0_hat"]
    ref = _reference(denoiser, full)
    assert out.shape == (3, *SHAPE) and np.abs(ref).mean() > 0.1  # non-trivial weights
    assert np.abs(out - ref).max() <= 1e-5

    out = decode_infer_response(r_no_cond)["x0_hat"]
    assert np.abs(out - _reference(denoiser, no_cond)).max() <= 1e-5

    assert r_half.outputs[0].datatype == "FP16"
    out = decode_infer_response(r_half)["x0_hat"]
    assert out.dtype == np.float16
    ref = _reference(denoiser, half).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(out.astype(np.float32), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.serve
def test_concurrent_calls_are_merged_and_split_back(tiny):
    from ray import serve

    cluster, denoiser = tiny
    handle = serve.get_app_handle("expert-tiny")
    # A longer wait than the default makes the merge certain; reset afterwards for the latency test.
    handle.set_batching.remote(batch_wait_timeout_s=0.05).result()
    assert handle.batching.remote().result() == {"max_batch_size": 64, "batch_wait_timeout_s": 0.05}
    inputs = [_inputs(1 + i, 10 + i, cond=i % 3 != 0) for i in range(8)]

    async def calls(stub):
        return await asyncio.gather(*(_infer(stub, inp, request_id=f"c{i}") for i, inp in enumerate(inputs)))

    try:
        responses = _with_stub(cluster.grpc_target, calls)
    finally:
        handle.set_batching.remote(batch_wait_timeout_s=0.002).result()

    merged = []
    for i, (inp, resp) in enumerate(zip(inputs, responses, strict=True)):
        assert resp.id == f"c{i}"
        out = decode_infer_response(resp)["x0_hat"]
        assert out.shape == inp["x"].shape
        assert np.abs(out - _reference(denoiser, inp)).max() <= 1e-5, f"call {i}"
        merged.append(decode_parameters(resp.parameters)["batch_calls"])
    print(f"\n[expert] calls per forward pass seen by the 8 concurrent calls: {merged}")
    assert max(merged) > 1


@pytest.mark.serve
def test_a_large_direct_call_goes_through_in_chunks_and_a_huge_one_is_refused(tiny):
    """A direct OIP client's big call is split into chunk_rows pieces (128 by default) that queue one after
    another, so it cannot hold the expert for its whole length; above max_call_rows (2048) it is refused."""
    from ray import serve

    from mode_ray.serve.errors import ExpertCallError

    cluster, denoiser = tiny
    inp = _inputs(300, 5)

    async def call(stub):
        return await _infer(stub, inp)

    resp = _with_stub(cluster.grpc_target, call)
    out = decode_infer_response(resp)["x0_hat"]
    assert np.abs(out - _reference(denoiser, inp)).max() <= 1e-5
    assert decode_parameters(resp.parameters)["batch_rows"] == 128  # the largest forward pass it took part in
    handle = serve.get_app_handle("expert-tiny")
    with pytest.raises(ExpertCallError, match="2049 rows in one call; this expert takes at most 2048"):
        handle.infer_arrays.remote(_inputs(2049, 6, cond=False)).result()


@pytest.mark.serve
def test_bad_requests_name_the_field(tiny):
    cluster, _ = tiny
    good = _inputs(3, 4)
    cases = {
        "model": ({"model": "nope"}, good, grpc.StatusCode.NOT_FOUND, ["'nope'", "'tiny'"]),
        "x shape": (
            {},
            dict(good, x=good["x"][:, :, :27]),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'x'", "[3, 1, 27, 28]"],
        ),
        "x missing": ({}, {"sigma": good["sigma"]}, grpc.StatusCode.INVALID_ARGUMENT, ["'x'", "missing"]),
        "x nan": (
            {},
            dict(
                good,
                x=np.where(np.arange(good["x"].size).reshape(good["x"].shape) == 5, np.nan, good["x"]).astype(
                    np.float32
                ),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'x'", "[0, 0, 0, 5]", "not finite"],
        ),
        "sigma length": (
            {},
            dict(good, sigma=good["sigma"][:2]),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'sigma'", "[2]"],
        ),
        "sigma <= 0": (
            {},
            dict(good, sigma=np.array([1.0, -0.5, 2.0], np.float32)),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'sigma'", "sigma[1]", "-0.5"],
        ),
        "sigma nan": (
            {},
            dict(good, sigma=np.array([1.0, 1.0, np.nan], np.float32)),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'sigma'", "nan"],
        ),
        "extra": ({}, dict(good, foo=np.zeros(3, np.float32)), grpc.StatusCode.INVALID_ARGUMENT, ["'foo'"]),
        "cond width": (
            {},
            dict(good, cond=np.zeros((3, 9), np.float32)),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'cond'", "[3, 9]", "[3, 10]"],
        ),
        "x dtype": (
            {},
            dict(good, x=good["x"].astype(np.float64)),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'x'", "FP64"],
        ),
        "x overflows the model": (  # finite inputs, non-finite x0_hat: never an OK reply carrying NaN
            {},
            dict(good, x=np.where(np.arange(3)[:, None, None, None] == 1, np.float32(3e38), good["x"])),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["inputs: row 1", "3e+38", "non-finite x0_hat", "beyond the model's numeric range"],
        ),
    }

    async def calls(stub):
        errors = {}
        for key, (kw, inp, _, _) in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await _infer(stub, inp, **kw)
            errors[key] = exc.value
        ok = await _infer(stub, good)  # the replica is fine afterwards
        return errors, ok

    errors, ok = _with_stub(cluster.grpc_target, calls)
    for key, (_, _, code, words) in cases.items():
        err = errors[key]
        print(f"[expert] {key}: {err.code().name} {err.details()!r}")
        assert err.code() == code, key
        for word in words:
            assert word in err.details(), (key, word)
    assert decode_infer_response(ok)["x0_hat"].shape == (3, *SHAPE)
    http = httpx.get(f"{cluster.http_url}/experts/tiny", timeout=30)  # Serve's HTTP route of the expert's app
    assert http.status_code == 404 and "OIP v2 over gRPC only" in http.json()["detail"], http.text


@pytest.mark.serve
def test_second_expert_leaves_the_first_running(tiny, tmp_path):
    from ray import serve

    cluster, _ = tiny
    expert_dir = _make_expert(tmp_path / "tiny2", "tiny2", seed=2)
    try:
        assert deploy_expert(expert_dir, ExpertDeployment(num_cpus=0.5, max_replicas=1)) == "expert-tiny2"
        apps = serve.status().applications
        assert apps["expert-tiny"].status == "RUNNING" and apps["expert-tiny2"].status == "RUNNING"
        inp = _inputs(2, 6)

        async def calls(stub):
            return await _infer(stub, inp), await _infer(stub, inp, model="tiny2", app="expert-tiny2")

        one, two = _with_stub(cluster.grpc_target, calls)
        assert (one.model_name, two.model_name) == ("tiny", "tiny2")
        ref2 = _reference(load_expert(expert_dir).denoiser, inp)
        assert np.abs(decode_infer_response(two)["x0_hat"] - ref2).max() <= 1e-5
    finally:
        serve.delete("expert-tiny2")
    assert serve.status().applications["expert-tiny"].status == "RUNNING"


@pytest.mark.serve
def test_corrupt_checkpoint_fails_fast_with_a_clear_error(tiny, tmp_path):
    from ray import serve

    expert_dir = _make_expert(tmp_path / "broken", "broken")
    (expert_dir / WEIGHTS_FILE).write_bytes(b"\x00not safetensors at all")
    started = time.perf_counter()
    with pytest.raises(RuntimeError) as exc:
        deploy_expert(expert_dir, ExpertDeployment(num_cpus=0.5, max_replicas=1), wait_s=90)
    elapsed = time.perf_counter() - started
    message = str(exc.value)
    print(f"\n[expert] corrupt checkpoint failed after {elapsed:.1f}s: {message[:600]!r}")
    assert message.startswith("expert 'broken' (application 'expert-broken'")
    # The root cause comes first, then Serve's full status messages (with the replica's traceback).
    first = message.splitlines()[0]
    assert "DEPLOY_FAILED" in first and "CheckpointError: expert 'broken'" in first
    assert "not a valid safetensors file" in first
    deadline = time.monotonic() + 30
    while "expert-broken" in serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.25)
    assert "expert-broken" not in serve.status().applications
    assert serve.status().applications["expert-tiny"].status == "RUNNING"

"""A latent mixture served by the cluster (real Serve, real gRPC, loopback): the experts and the wire carry
latents, the decoder runs once per image at the end, in its own `Decoder` deployment (the default) or in the
router process; HTTP PNG / JSON and gRPC replies carry the decoded images and, in JSON and gRPC raw replies,
the raw latents, equal to the in-process mixture."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import numpy as np
import pytest
import torch
from ray import serve

from mode_ray.generation import GenerateParams, GenerationResult, generate_local, load_bundle
from mode_ray.proto.mode_ray.v1 import generation_pb2 as gen
from mode_ray.proto.mode_ray.v1 import generation_pb2_grpc as gen_grpc
from mode_ray.serve.config import APP_NAME
from tests.serve.conftest import tiny_app
from tests.tiny import build_tiny_latent_mixture

pytestmark = pytest.mark.serve

BODY = {"prompt": 6, "num_images": 3, "seed": 8}


@pytest.fixture(scope="module")
def model(tmp_path_factory):  # noqa: ANN001, ANN201
    return build_tiny_latent_mixture(tmp_path_factory.mktemp("latent-mixture"))


@pytest.fixture(scope="module")
def expected(model):  # noqa: ANN001, ANN201
    bundle = load_bundle(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replicas: CPU reductions depend on the thread count
    try:
        return generate_local(bundle.mixture, bundle.config, GenerateParams(**BODY))
    finally:
        torch.set_num_threads(threads)


def _grpc_raw(target: str) -> gen.GenerateResponse:
    async def call() -> gen.GenerateResponse:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = gen_grpc.GenerationServiceStub(channel)
            request = gen.GenerateRequest(prompt="6", num_images=3, seed=8, output="raw")
            return await stub.Generate(request, metadata=(("application", APP_NAME),))

    return asyncio.run(call())


@pytest.mark.parametrize("placement", ["deployment", "router"])
def test_served_latent_mixture_decodes_like_the_in_process_one(
    serve_cluster, model, expected, placement: str
) -> None:  # noqa: ANN001
    with tiny_app(serve_cluster, model, decoder={"placement": placement}):
        deployments = serve.status().applications[APP_NAME].deployments
        assert ("Decoder" in deployments) is (placement == "deployment")
        r = httpx.post(f"{serve_cluster.http_url}/v1/generate", json={**BODY, "output": "json"}, timeout=120)
        assert r.status_code == 200, r.text
        served = GenerationResult.from_json(r.json())
        assert served.images.shape == (3, 1, 16, 16) and served.latents.shape == (3, 4, 8, 8)
        assert (served.latents - expected.latents).abs().max() <= 1e-5
        assert (served.images - expected.images).abs().max() <= 1e-5
        png = httpx.post(f"{serve_cluster.http_url}/v1/generate", json=BODY, timeout=120)
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"

        response = _grpc_raw(serve_cluster.grpc_target)
        images = np.frombuffer(response.images, dtype="<f4").reshape(list(response.shape))
        latents = np.frombuffer(response.latents, dtype="<f4").reshape(list(response.latent_shape))
        assert images.shape == (3, 1, 16, 16) and latents.shape == (3, 4, 8, 8)
        assert np.abs(images - expected.images.numpy()).max() <= 1e-5
        assert np.abs(latents - expected.latents.numpy()).max() <= 1e-5


def test_decoder_deployment_refuses_latents_it_cannot_decode(serve_cluster, model) -> None:  # noqa: ANN001
    with tiny_app(serve_cluster, model):
        handle = serve.get_deployment_handle("Decoder", APP_NAME)
        with pytest.raises(ValueError, match="latents have 3 channels; this decoder takes 4"):
            handle.decode.remote(np.zeros((2, 3, 8, 8), np.float32)).result(timeout_s=60)
        with pytest.raises(ValueError, match=r"latents must be an array \(N, 4, h, w\)"):
            handle.decode.remote(np.zeros((4, 8, 8), np.float32)).result(timeout_s=60)
        ok = handle.decode.remote(np.zeros((2, 4, 8, 8), np.float32)).result(timeout_s=60)
        assert ok.shape == (2, 1, 16, 16) and ok.dtype == np.float32

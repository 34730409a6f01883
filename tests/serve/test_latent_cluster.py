"""A latent mixture served by the cluster (real Serve, real gRPC, loopback): the experts and the wire carry
latents, the router decodes once per image at the end; HTTP PNG / JSON and gRPC replies carry the decoded
images (JSON also the raw latents), equal to the in-process mixture."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import numpy as np
import pytest
import torch

from mode_ray.generation import GenerateParams, GenerationResult, generate_local, load_bundle
from mode_ray.proto.mode_ray.v1 import generation_pb2 as gen
from mode_ray.proto.mode_ray.v1 import generation_pb2_grpc as gen_grpc
from mode_ray.serve.config import APP_NAME
from tests.serve.conftest import tiny_app
from tests.tiny import build_tiny_latent_mixture

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def cluster(serve_cluster, tmp_path_factory):  # noqa: ANN001, ANN201
    model = build_tiny_latent_mixture(tmp_path_factory.mktemp("latent-mixture"))
    with tiny_app(serve_cluster, model):
        yield serve_cluster, model


def test_served_latent_mixture_decodes_like_the_in_process_one(cluster) -> None:  # noqa: ANN001
    sc, model = cluster
    bundle = load_bundle(model)
    body = {"prompt": 6, "num_images": 3, "seed": 8}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replicas: CPU reductions depend on the thread count
    try:
        expected = generate_local(bundle.mixture, bundle.config, GenerateParams(**body))
        r = httpx.post(f"{sc.http_url}/v1/generate", json={**body, "output": "json"}, timeout=120)
        assert r.status_code == 200, r.text
        served = GenerationResult.from_json(r.json())
        assert served.images.shape == (3, 1, 16, 16) and served.latents.shape == (3, 4, 8, 8)
        assert (served.latents - expected.latents).abs().max() <= 1e-5
        assert (served.images - expected.images).abs().max() <= 1e-5
        png = httpx.post(f"{sc.http_url}/v1/generate", json=body, timeout=120)
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"

        async def raw() -> gen.GenerateResponse:
            async with grpc.aio.insecure_channel(sc.grpc_target) as channel:
                stub = gen_grpc.GenerationServiceStub(channel)
                request = gen.GenerateRequest(prompt="6", num_images=3, seed=8, output="raw")
                return await stub.Generate(request, metadata=(("application", APP_NAME),))

        response = asyncio.run(raw())
        images = np.frombuffer(response.images, dtype="<f4").reshape(list(response.shape))
        assert images.shape == (3, 1, 16, 16)
        assert np.abs(images - expected.images.numpy()).max() <= 1e-5
    finally:
        torch.set_num_threads(threads)

"""The router's gRPC transport to an expert (GrpcExpertClient) against a real OIP server on loopback
(mode_ray.serve.standalone: the same ExpertServer the Serve deployment runs, behind grpc.aio)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from mode_ray.models import load_expert
from mode_ray.serve.errors import ExpertCallError
from mode_ray.serve.standalone import serve_expert
from mode_ray.serve.transport import GrpcExpertClient
from tests.tiny import make_expert


def test_fp32_is_exact_and_fp16_wire_sends_half_precision(tmp_path) -> None:  # noqa: ANN001
    path = make_expert(tmp_path, "t", [1, 2], seed=0, scale=0.2)
    denoiser = load_expert(path).denoiser
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 28, 28, generator=g) * 3
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 40.0])
    cond = torch.eye(10)[[1, 2, 0, 1, 2]]

    async def calls():  # noqa: ANN202
        server, port = await serve_expert(str(path), port=0)
        try:
            target = f"127.0.0.1:{port}"
            fp32 = (await GrpcExpertClient("t", target, None).infer(x, sigma, cond, 30)).x0_hat
            fp16 = (await GrpcExpertClient("t", target, None, fp16=True).infer(x, sigma, cond, 30)).x0_hat
            with pytest.raises(ExpertCallError, match="NOT_FOUND") as err:
                await GrpcExpertClient("other", target, None).infer(x, sigma, cond, 30)
            ready = await GrpcExpertClient("t", target, None).ready(5)
            return fp32, fp16, err.value, ready
        finally:
            await server.stop(0)

    fp32, fp16, err, ready = asyncio.run(calls())
    with torch.no_grad():
        exact = denoiser(x, sigma, cond)
        # fp16 on the wire: x rounded to half, computed in float32, returned as half
        halved = denoiser(x.half().float(), sigma, cond).half().float()
    torch.testing.assert_close(fp32, exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(fp16, halved, rtol=0, atol=1e-6)
    assert not torch.equal(fp16, fp32)  # it really went over the wire in half precision
    assert np.abs((fp16 - fp32).numpy()).max() < 0.05
    assert err.code.name == "NOT_FOUND" and ready


def test_the_direct_client_balances_rows_over_published_replicas_and_forgets_a_refused_one(
    tmp_path, ray_session
) -> None:  # noqa: ANN001
    """Two real OIP servers and a port where nothing listens, published in Ray's KV store as three replicas of
    one application: concurrent calls are spread over the two by rows in flight, every answer is exact, and
    the refused address is skipped and its key deleted (a killed replica's leftover)."""
    from ray.experimental import internal_kv

    from mode_ray.ports import free_ports
    from mode_ray.serve.direct import NAMESPACE, published, unpublish_app
    from mode_ray.serve.transport import DirectExpertClient

    path = make_expert(tmp_path, "t", [1, 2], seed=0, scale=0.2)
    denoiser = load_expert(path).denoiser
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 1, 28, 28, generator=g) for _ in range(6)]
    sigma, cond = torch.tensor([0.5, 4.0]), torch.eye(10)[[1, 2]]
    app = "expert-direct-test"

    async def calls():  # noqa: ANN202
        (s1, p1), (s2, p2) = await serve_expert(str(path), port=0), await serve_expert(str(path), port=0)
        (refused,) = free_ports(1)
        addresses = [f"127.0.0.1:{p}" for p in (p1, p2, refused)]
        for i, address in enumerate(addresses):
            internal_kv._internal_kv_put(f"{app}/r{i}/{address}".encode(), b"", namespace=NAMESPACE)
        try:
            client = DirectExpertClient("t", "127.0.0.1:1", app=app)
            assert await client.ready(5)  # lists the addresses: the first call already goes straight there
            replies = await asyncio.gather(*(client.infer(x, sigma, cond, 30) for x in xs))
            for _ in range(100):
                if len(published(app)) == 2:
                    break
                await asyncio.sleep(0.05)
            return client, addresses, replies
        finally:
            await s1.stop(0)
            await s2.stop(0)

    try:
        client, addresses, replies = asyncio.run(calls())
        assert published(app) == sorted(addresses[:2])  # the refused one's key is gone
    finally:
        unpublish_app(app)
    assert client.calls == {"direct": 6, "handle": 0}
    assert set(client.rows_sent) == set(addresses[:2]) and sum(client.rows_sent.values()) == 12
    assert min(client.rows_sent.values()) >= 4  # both replicas carried calls
    assert addresses[2] not in client.addresses()
    with torch.no_grad():
        for x, reply in zip(xs, replies, strict=True):
            torch.testing.assert_close(reply.x0_hat, denoiser(x, sigma, cond), rtol=0, atol=1e-6)

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

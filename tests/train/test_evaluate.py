"""The classifier-FID's Frechet distance against closed forms for Gaussians."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

from mode_ray.train.evaluate import bootstrap_fid, frechet_distance, inference_flops


def test_frechet_distance_of_sample_moments_matches_scipy_sqrtm() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g) + 1.0
    b = torch.randn(700, 6, generator=g) @ torch.randn(6, 6, generator=g) - 0.5
    mu_a, mu_b = a.double().mean(0).numpy(), b.double().mean(0).numpy()
    cov_a, cov_b = np.cov(a.double().numpy().T), np.cov(b.double().numpy().T)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
    assert abs(frechet_distance(a, b) - expected) < 1e-6 * max(1.0, expected)


def test_frechet_distance_of_two_gaussians_approaches_the_closed_form() -> None:
    """N(mu1, diag s1^2) vs N(mu2, diag s2^2): ||mu1 - mu2||^2 + sum (s1 - s2)^2."""
    g = torch.Generator().manual_seed(1)
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0, 0.5]), torch.tensor([1.0, 1.0, 0.0, 0.5])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([0.5, 2.0, 1.5, 3.0])
    n = 40_000
    a = mu1 + s1 * torch.randn(n, 4, generator=g)
    b = mu2 + s2 * torch.randn(n, 4, generator=g)
    closed = float((mu1 - mu2).square().sum() + (s1 - s2).square().sum())  # 5 + 5.25 = 10.25
    assert abs(frechet_distance(a, b) - closed) < 0.02 * closed
    assert frechet_distance(a, a) < 1e-9  # a set against itself


def test_bootstrap_fid_interval_holds_the_estimate_and_narrows_with_n() -> None:
    g = torch.Generator().manual_seed(0)

    def interval(n: int) -> tuple[float, float, float]:
        a = torch.randn(n, 8, generator=g) + 0.3
        b = torch.randn(n, 8, generator=g)
        return bootstrap_fid(a, b, rounds=100, seed=1)

    fid, lo, hi = interval(400)
    assert lo < fid < hi  # the shift puts the estimate inside (raw percentiles sit above it)
    fid_big, lo_big, hi_big = interval(6400)
    assert hi_big - lo_big < (hi - lo) / 2  # 16x the samples: about a quarter of the width


def test_inference_flops_count_every_expert_and_the_gate() -> None:
    from mode_ray.cli import DEFAULT_MODEL
    from mode_ray.generation import load_bundle

    bundle = load_bundle(DEFAULT_MODEL)
    flops = inference_flops(bundle)
    assert set(flops) == {c.name for c in bundle.mixture.cards} | {"gate"}
    # the same UNet preset for every expert: one count; a 0.44M-parameter UNet on 28x28 is ~10^8 FLOPs
    per_expert = {flops[c.name] for c in bundle.mixture.cards}
    assert len(per_expert) == 1 and 5e7 < per_expert.pop() < 5e8
    assert 0 < flops["gate"] < flops[bundle.mixture.cards[0].name]

"""The classifier-FID's Frechet distance against closed forms for Gaussians."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

from mode_ray.train.evaluate import frechet_distance


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

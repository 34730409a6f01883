"""The measures of "do unconditional samples follow the data": the chi-square test, the empirical posterior
gate (the exact p(k | x, sigma) of a noised point set), and the gate's calibration report."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from mode_ray.train.unconditional import EmpiricalPosteriorGate, chi_square


def test_chi_square_matches_scipy() -> None:
    counts = torch.tensor([30, 52, 18, 100])
    probs = torch.tensor([0.2, 0.3, 0.1, 0.4], dtype=torch.float64)
    stat, p = chi_square(counts, probs)
    ref = stats.chisquare(counts.numpy(), (probs * counts.sum()).numpy())
    assert stat == pytest.approx(ref.statistic, rel=1e-9)
    assert p == pytest.approx(ref.pvalue, rel=1e-6)


def _brute_posterior(x, sigma, points, owner, k, exclude=None):  # noqa: ANN001, ANN202
    out = torch.zeros(len(x), k, dtype=torch.float64)
    for b in range(len(x)):
        for i in range(len(points)):
            if exclude is not None and i == int(exclude[b]):
                continue
            d2 = float((x[b].double() - points[i].double()).square().sum())
            out[b, owner[i]] += math.exp(-d2 / (2 * float(sigma[b]) ** 2))
    return out / out.sum(1, keepdim=True)


def test_empirical_posterior_is_the_exact_posterior_of_the_noised_points() -> None:
    g = torch.Generator().manual_seed(0)
    points = torch.randn(40, 1, 3, 3, generator=g)
    owner = torch.randint(0, 3, (40,), generator=g)
    gate = EmpiricalPosteriorGate(points, owner, ("a", "b", "c"), chunk=16)  # chunks of the sum too
    x = torch.randn(6, 1, 3, 3, generator=g) * 1.5
    sigma = torch.tensor([0.7, 1.0, 1.5, 2.0, 3.0, 8.0])
    got = gate.log_posterior(x, sigma).exp().double()
    assert torch.allclose(got, _brute_posterior(x, sigma, points, owner, 3), atol=1e-6)
    exclude = torch.tensor([0, 5, 7, 11, 20, 39])
    got = gate.log_posterior(x, sigma, exclude=exclude).exp().double()
    assert torch.allclose(got, _brute_posterior(x, sigma, points, owner, 3, exclude), atol=1e-6)


def test_empirical_posterior_limits_nearest_point_and_prior() -> None:
    """At small sigma the posterior is the owner of the nearest point; at large sigma it is the prior (the
    share of points each expert holds), which is what an unconditional mixture must start from."""
    g = torch.Generator().manual_seed(1)
    points = torch.randn(50, 1, 4, 4, generator=g)
    owner = torch.cat([torch.zeros(10), torch.ones(15), torch.full((25,), 2)]).long()
    gate = EmpiricalPosteriorGate(points, owner, ("a", "b", "c"))
    x = points[[3, 17, 40]] + 1e-3 * torch.randn(3, 1, 4, 4, generator=g)
    near = gate.log_posterior(x, torch.full((3,), 0.01)).exp()
    assert near.argmax(1).tolist() == [0, 1, 2] and float(near.max(1).values.min()) > 0.999
    far = gate.log_posterior(torch.zeros(1, 1, 4, 4), torch.tensor([1e4])).exp()[0]
    assert torch.allclose(far, torch.tensor([0.2, 0.3, 0.5]), atol=1e-4)


def test_empirical_posterior_gate_routes_by_name() -> None:
    """As a Gate it answers in the order of the experts it is asked about, finite everywhere (an expert that
    holds no point gets a very low, finite score)."""

    class Card:  # a gate reads only the experts' names
        def __init__(self, name: str) -> None:
            self.name = name

    points = torch.tensor([[[[0.0]]], [[[1.0]]], [[[5.0]]]])
    gate = EmpiricalPosteriorGate(points, torch.tensor([0, 0, 1]), ("a", "b", "empty"))
    cards = [Card("b"), Card("a"), Card("empty")]
    logits = gate(torch.tensor([[[[4.9]]]]), torch.tensor([0.1]), None, cards)
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()
    assert float(logits[0, 0]) > float(logits[0, 1]) > float(logits[0, 2])

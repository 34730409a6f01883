import math

import pytest
import torch

from mode_ray.models.checkpoint import Expert
from mode_ray.routing import Mixture, NoiseGate, PrototypeGate, SumGate, combine, dispatch, top_k
from mode_ray.routing.gates import Gate
from mode_ray.routing.step import plan_step
from tests.routing.helpers import GaussianDenoiser, card, gaussian_experts


class FixedGate(Gate):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x, sigma, cond, experts):  # noqa: ANN001, ANN201
        return self.logits[: x.shape[0]].expand(x.shape[0], -1) if self.logits.shape[0] == 1 else self.logits


def batch(b: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 2, 2, generator=g) * 3, torch.rand(b, generator=g) * 5 + 0.1


def test_k_equal_n_equals_the_dense_softmax_mixture() -> None:
    experts = gaussian_experts(4)
    logits = torch.randn(5, 4)
    x, sigma = batch()
    mix = Mixture(experts, FixedGate(logits), top_k=4)
    w = logits.softmax(1)
    dense = sum(w[:, k].reshape(-1, 1, 1, 1) * e.denoiser(x, sigma) for k, e in enumerate(experts))
    torch.testing.assert_close(mix(x, sigma), dense)


def test_identical_experts_equal_one_expert() -> None:
    one = GaussianDenoiser(0.3, 0.5)
    experts = [Expert(card(f"same{i}"), one) for i in range(3)]
    x, sigma = batch()
    for k in (1, 2, 3):
        torch.testing.assert_close(
            Mixture(experts, FixedGate(torch.randn(5, 3)), top_k=k)(x, sigma), one(x, sigma)
        )


def test_gather_scatter_keeps_row_order() -> None:
    experts = gaussian_experts(3)
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0], [0, 5.0, 0]])
    x, sigma = batch()
    r = top_k(logits, 1)
    rows = dispatch(r)
    assert rows[0].tolist() == [0, 3] and rows[1].tolist() == [1, 4] and rows[2].tolist() == [2]
    outputs = {e: experts[e].denoiser(x[rw], sigma[rw]) for e, rw in rows.items()}
    out = combine(r, outputs, rows)
    for i, e in enumerate([0, 1, 2, 0, 1]):
        torch.testing.assert_close(out[i : i + 1], experts[e].denoiser(x[i : i + 1], sigma[i : i + 1]))


def test_prototype_gate_routes_a_prompt_to_the_expert_holding_it() -> None:
    experts = [
        Expert(card("a", [0.5, 0.5] + [0.0] * 8), GaussianDenoiser(0, 1)),
        Expert(card("b", [0, 0, 0.5, 0.5] + [0.0] * 6), GaussianDenoiser(0, 1)),
    ]
    cond = torch.eye(10)[:4]
    logits = PrototypeGate(tau=0.1)(torch.zeros(4, 1, 2, 2), torch.ones(4), cond, [e.card for e in experts])
    assert logits.argmax(1).tolist() == [0, 0, 1, 1]
    null = PrototypeGate()(
        torch.zeros(1, 1, 2, 2), torch.ones(1), torch.zeros(1, 10), [e.card for e in experts]
    )
    assert null.abs().sum() == 0  # the null condition carries no routing preference


def test_noise_gate_switches_experts_at_a_sigma_boundary() -> None:
    cards = [card("high", interval=(1.0, math.inf)), card("low", interval=(0.0, 1.0))]
    sigma = torch.tensor([0.1, 0.99, 1.0, 50.0])
    logits = SumGate([NoiseGate()])(torch.zeros(4, 1, 2, 2), sigma, None, cards)
    assert top_k(logits, 2).indices[:, 0].tolist() == [1, 1, 0, 0]
    assert torch.isinf(logits).sum() == 4


def test_guidance_shares_routing_and_equals_guidance_of_the_mixture() -> None:
    experts = gaussian_experts(3)
    logits = torch.randn(5, 3)
    x, sigma = batch()
    cond = torch.eye(10)[:5]
    mix = Mixture(experts, FixedGate(logits), top_k=2)
    plan = mix.plan(x, sigma, cond, guidance_scale=3.0)
    assert plan.x.shape[0] == 10 and torch.equal(plan.routing.indices[:5], plan.routing.indices[5:])
    guided = mix.evaluate(plan)
    d_c = mix.evaluate(plan_step(logits, x, sigma, cond, top_k=2))
    d_u = mix.evaluate(plan_step(logits, x, sigma, torch.zeros_like(cond), top_k=2))
    torch.testing.assert_close(guided, d_u + 3.0 * (d_c - d_u))


def test_pin_and_exclude() -> None:
    mix = Mixture(gaussian_experts(3), FixedGate(torch.tensor([[3.0, 2.0, 1.0]])), top_k=1)
    x, sigma = batch(1)
    plan = mix.plan(x, sigma, None, allowed=mix.allowed(exclude=["e0"]))
    assert plan.base.indices.tolist() == [[1]]
    plan = mix.plan(x, sigma, None, allowed=mix.allowed(pin=["e2"]))
    assert plan.base.indices.tolist() == [[2]]
    with pytest.raises(ValueError, match="unknown expert"):
        mix.allowed(pin=["nope"])
    with pytest.raises(ValueError, match="leaves no expert"):
        mix.allowed(pin=["e1"], exclude=["e1"])


def test_mixture_validates_its_experts() -> None:
    e = gaussian_experts(2)
    with pytest.raises(ValueError, match="unique"):
        Mixture([e[0], e[0]], PrototypeGate())
    other = Expert(card("wide").model_copy(update={"latent_shape": (1, 4, 4)}), GaussianDenoiser(0, 1))
    with pytest.raises(ValueError, match="latent_shape"):
        Mixture([e[0], other], PrototypeGate())


class PosteriorGate(Gate):
    """The true posterior of a Gaussian mixture: logit_k = log pi_k + log N(x; mu_k, (s_k^2 + sigma^2) I)."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, priors: torch.Tensor) -> None:
        super().__init__()
        self.means, self.stds, self.priors = means, stds, priors

    def forward(self, x, sigma, cond, experts):  # noqa: ANN001, ANN201
        return log_joint(x, sigma, self.means, self.stds, self.priors)


def log_joint(x, sigma, means, stds, priors):  # noqa: ANN001, ANN201
    """(B, K): log pi_k + log N(x; mu_k, (s_k^2 + sigma^2) I) for x: (B, C, H, W)."""
    d = x[0].numel()
    var = stds[None] ** 2 + sigma[:, None] ** 2  # (B, K)
    sq = ((x.flatten(1)[:, None] - means.flatten(1)[None]) ** 2).sum(-1)  # (B, K)
    return priors.log()[None] - 0.5 * sq / var - 0.5 * d * (2 * math.pi * var).log()


class VectorGaussianDenoiser(torch.nn.Module):
    """E[x0 | x] for x0 ~ N(mean, s^2 I): mean + (x - mean) s^2 / (s^2 + sigma^2)."""

    def __init__(self, mean: torch.Tensor, s: float) -> None:
        super().__init__()
        self.mean, self.s = mean, s

    def forward(self, x, sigma, cond=None):  # noqa: ANN001, ANN201
        s2 = self.s**2
        return self.mean + (x - self.mean) * s2 / (sigma.reshape(-1, 1, 1, 1) ** 2 + s2)


def test_the_mixture_of_optimal_experts_under_the_true_posterior_is_the_optimal_denoiser() -> None:
    """The design's exactness claim, checked independently: with the true posterior p(k | x, sigma) as the
    gate and k = N, sum_k w_k D_k equals Tweedie's D(x) = x + sigma^2 grad log p_sigma(x) of the whole
    Gaussian mixture, whose score is taken by autograd, not from the formula under test."""
    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(0)
        k = 3
        means = torch.randn(k, 1, 2, 2, generator=g) * 2
        stds = torch.tensor([0.3, 0.7, 1.2])
        priors = torch.tensor([0.5, 0.3, 0.2])
        experts = [Expert(card(f"g{i}"), VectorGaussianDenoiser(means[i], float(stds[i]))) for i in range(k)]
        mix = Mixture(experts, PosteriorGate(means, stds, priors), top_k=k)
        x = torch.randn(64, 1, 2, 2, generator=g) * 3
        sigma = torch.exp(torch.empty(64).uniform_(math.log(0.01), math.log(20), generator=g))
        ours = mix(x, sigma)
        xr = x.clone().requires_grad_(True)
        log_p = torch.logsumexp(log_joint(xr, sigma, means, stds, priors), dim=1).sum()
        (score,) = torch.autograd.grad(log_p, xr)
        tweedie = x + sigma.reshape(-1, 1, 1, 1) ** 2 * score
        torch.testing.assert_close(ours, tweedie, rtol=1e-9, atol=1e-9)
    finally:
        torch.set_default_dtype(torch.float32)

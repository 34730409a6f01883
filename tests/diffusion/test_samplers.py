"""Samplers against closed forms: for data N(0, s^2) the optimal denoiser is x s^2 / (sigma^2 + s^2)."""

import math

import pytest
import torch

from mode_ray.diffusion import SAMPLERS, EDMPrecond, edm_loss, karras_sigmas, make_trajectory, sample
from mode_ray.diffusion.samplers import advance_many

S = 0.7  # data standard deviation


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x * S**2 / (sigma.reshape(-1, 1, 1, 1) ** 2 + S**2)


@pytest.mark.parametrize(
    "sampler,steps,tol",
    [("euler", 400, 0.05), ("ddim", 400, 0.05), ("heun", 80, 0.01), ("dpmpp_2m", 80, 0.01)],
)
def test_samplers_reproduce_the_data_spread(sampler: str, steps: int, tol: float) -> None:
    sigmas = karras_sigmas(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 1, 1, 1, generator=g) * sigmas[0].float()
    out = sample(gaussian_denoiser, x, sigmas, sampler)
    exact = (
        S * float(sigmas[0]) / (float(sigmas[0]) ** 2 + S**2) ** 0.5
    )  # the ODE maps N(0, smax^2) to N(0, s^2)
    assert abs(out.std().item() - exact) / exact < tol
    assert abs(out.mean().item()) < 0.02


def test_ode_solution_is_the_closed_form_map() -> None:
    """The probability-flow ODE for Gaussian data is linear: x_0 = x_T * s / sqrt(sigma_max^2 + s^2)."""
    sigmas = karras_sigmas(80)
    x = torch.linspace(-3, 3, 7, dtype=torch.float64).reshape(7, 1, 1, 1) * float(sigmas[0])
    out = sample(gaussian_denoiser, x, sigmas, "heun")
    expected = x * S / (float(sigmas[0]) ** 2 + S**2) ** 0.5
    torch.testing.assert_close(out, expected, rtol=5e-3, atol=1e-6)


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_convergence_order(sampler: str, order: int) -> None:
    """Doubling the steps divides the end-point error by about 2^order."""
    x = torch.full((1, 1, 1, 1), 80.0, dtype=torch.float64)
    exact = 80 * S / (80**2 + S**2) ** 0.5
    err = [abs(sample(gaussian_denoiser, x, karras_sigmas(n), sampler).item() - exact) for n in (80, 160)]
    assert err[0] / err[1] == pytest.approx(2**order, rel=0.25)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_trajectory_counts_and_determinism(sampler: str) -> None:
    sigmas = karras_sigmas(6)
    calls: list[float] = []

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert sigma.shape == (x.shape[0],)  # one sigma per row
        calls.append(float(sigma[0]))
        return gaussian_denoiser(x, sigma)

    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1)) * 80
    a = sample(model, x, sigmas, sampler)
    assert len(calls) == make_trajectory(sampler, x, sigmas).total_evals
    assert torch.equal(a, sample(gaussian_denoiser, x, sigmas, sampler))


def test_rows_at_different_steps_share_one_call() -> None:
    """Two trajectories stepped through one batched call equal each stepped alone."""
    sigmas_a, sigmas_b = karras_sigmas(5), karras_sigmas(9)
    xa = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(2)) * 80
    xb = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(3)) * 80
    ta, tb = make_trajectory("heun", xa, sigmas_a), make_trajectory("dpmpp_2m", xb, sigmas_b)
    while not (ta.done and tb.done):
        live = [t for t in (ta, tb) if not t.done]
        queries = [t.query() for t in live]
        x = torch.cat([q[0] for q in queries])
        sigma = torch.cat([q[1] for q in queries])  # per-row sigmas differ between the two requests
        out = gaussian_denoiser(x, sigma).split([q[0].shape[0] for q in queries])
        for t, d in zip(live, out, strict=True):
            t.advance(d)
    torch.testing.assert_close(ta.x, sample(gaussian_denoiser, xa, sigmas_a, "heun"), rtol=0, atol=0)
    torch.testing.assert_close(tb.x, sample(gaussian_denoiser, xb, sigmas_b, "dpmpp_2m"), rtol=0, atol=0)


def test_advance_many_gives_every_trajectory_its_bits_alone() -> None:
    """Trajectories of every sampler, at different steps and rules (Heun predictor / corrector / last Euler
    step, DPM++ first / multistep / last), with different row counts, stepped by one advance_many each
    evaluation: every one equals the same trajectory stepped alone, bit for bit."""
    specs = [
        ("heun", 2, 5),
        ("dpmpp_2m", 3, 9),
        ("euler", 1, 4),
        ("heun", 1, 9),
        ("dpmpp_2m", 2, 3),
        ("ddim", 4, 6),
    ]

    def start(i: int, name: str, rows: int, steps: int):  # noqa: ANN202
        x = torch.randn(rows, 1, 3, 3, generator=torch.Generator().manual_seed(i)) * 80
        return make_trajectory(name, x, karras_sigmas(steps))

    together = [start(i, *spec) for i, spec in enumerate(specs)]
    alone = [start(i, *spec) for i, spec in enumerate(specs)]
    rules_seen = set()
    while not all(t.done for t in together):
        live = [i for i, t in enumerate(together) if not t.done]
        rules_seen |= {(together[i].name, together[i].rule()) for i in live}
        queries = [together[i].query() for i in live]
        x, sigma = torch.cat([q[0] for q in queries]), torch.cat([q[1] for q in queries])
        advance_many([together[i] for i in live], gaussian_denoiser(x, sigma))
        for i in live:
            alone[i].advance(gaussian_denoiser(*alone[i].query()))
    for t, a in zip(together, alone, strict=True):
        assert torch.equal(t.x, a.x)
    assert {r for n, r in rules_seen if n == "heun"} == {"predict", "correct", "euler"}
    assert {r for n, r in rules_seen if n == "dpmpp_2m"} == {"first", "multistep", "last"}


def test_batched_steps_have_the_bits_of_the_scalar_formulas() -> None:
    """The per-row coefficients are cast from the same Python floats the scalar k-diffusion formulas use, so
    a batched step equals them exactly (Euler; Heun's predictor and corrector; DPM++(2M)'s multistep)."""
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(5)) * 20
    sigmas = karras_sigmas(6)
    s = sigmas.double().tolist()

    euler = make_trajectory("euler", x, sigmas)
    euler.step = 2
    denoised = gaussian_denoiser(x, torch.full((4,), s[2]))
    advance_many([euler], denoised)
    assert torch.equal(euler.x, x + (x - denoised) / s[2] * (s[3] - s[2]))

    heun = make_trajectory("heun", x, sigmas)
    d0 = gaussian_denoiser(x, torch.full((4,), s[0]))
    advance_many([heun], d0)
    d = (x - d0) / s[0]
    x_pred = x + d * (s[1] - s[0])
    d1 = gaussian_denoiser(x_pred, torch.full((4,), s[1]))
    advance_many([heun], d1)
    assert torch.equal(heun.x, x + (d + (x_pred - d1) / s[1]) / 2 * (s[1] - s[0]))

    dpm = make_trajectory("dpmpp_2m", x, sigmas)
    first = gaussian_denoiser(x, torch.full((4,), s[0]))
    advance_many([dpm], first)
    h0 = math.log(s[0]) - math.log(s[1])
    x1 = (s[1] / s[0]) * x - math.expm1(-h0) * first
    assert torch.equal(dpm.x, x1)
    second = gaussian_denoiser(x1, torch.full((4,), s[1]))
    advance_many([dpm], second)
    h = math.log(s[1]) - math.log(s[2])
    r = (math.log(s[0]) - math.log(s[1])) / h
    mixed = (1 + 1 / (2 * r)) * second - (1 / (2 * r)) * first
    assert torch.equal(dpm.x, (s[2] / s[1]) * x1 - math.expm1(-h) * mixed)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="sampler must be one of"):
        make_trajectory("ddpm_ancestral", torch.zeros(1, 1, 1, 1), karras_sigmas(3))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        karras_sigmas(0)
    with pytest.raises(ValueError, match="end in 0"):
        make_trajectory("euler", torch.zeros(1, 1, 1, 1), torch.tensor([2.0, 1.0]))


def test_karras_schedule_endpoints() -> None:
    s = karras_sigmas(10, 0.002, 80.0)
    assert s.shape == (11,) and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    assert (s[:-1].diff() < 0).all()


class Zero(torch.nn.Module):
    def forward(self, x, c_noise, cond):  # noqa: ANN001, ANN201
        return torch.zeros_like(x)


def test_precond_with_a_zero_network_is_c_skip_x() -> None:
    d = EDMPrecond(Zero(), sigma_data=0.5)
    x, sigma = torch.ones(2, 1, 2, 2), torch.tensor([0.5, 2.0])
    c_skip = 0.25 / (sigma**2 + 0.25)
    torch.testing.assert_close(d(x, sigma), c_skip.reshape(-1, 1, 1, 1) * x)
    loss = edm_loss(d, torch.zeros(2, 1, 2, 2), sigma, None, torch.ones(2, 1, 2, 2))
    assert loss.shape == (2,) and (loss > 0).all()

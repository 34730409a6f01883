"""Deterministic ODE samplers as resumable trajectories.

A `Trajectory` owns one request's state and asks for one denoiser evaluation at a time
(`query()` -> `(x, sigma)`, then `advance(denoised)`), so the in-process `sample` loop and the
router's step engine (which batches rows of many requests into one call per expert) run the very
same arithmetic. The update rules follow k-diffusion's `sampling.py` (Karras et al. 2022, Alg. 1-2;
Lu et al. 2022, DPM-Solver++(2M)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch

SamplerName = Literal["euler", "ddim", "heun", "dpmpp_2m"]  # the one list of sampler names


class Trajectory:
    """One request's sampling state. x: (B, C, H, W); sigmas: (steps + 1,) ending in 0."""

    name = "base"

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor) -> None:
        if sigmas.ndim != 1 or len(sigmas) < 2 or float(sigmas[-1]) != 0.0:
            raise ValueError(f"sigmas must be 1-D, decreasing and end in 0, got {sigmas.tolist()}")
        self.x = x
        self.sigmas = sigmas.double()
        self.step = 0  # index i of the current sigma

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    @property
    def total_evals(self) -> int:
        return self.steps

    def query(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next evaluation point: x (B, C, H, W) and sigma (B,)."""
        return self.x, self._rows(float(self.sigmas[self.step]))

    def advance(self, denoised: torch.Tensor) -> None:
        """Consume D(query()) with shape (B, C, H, W)."""
        raise NotImplementedError

    def _rows(self, sigma: float) -> torch.Tensor:
        return torch.full((self.x.shape[0],), sigma, dtype=self.x.dtype, device=self.x.device)

    def _sigma_pair(self) -> tuple[float, float]:
        return float(self.sigmas[self.step]), float(self.sigmas[self.step + 1])


class Euler(Trajectory):
    """Euler on the probability-flow ODE (Karras Alg. 1 without the correction); equals deterministic DDIM."""

    name = "euler"

    def advance(self, denoised: torch.Tensor) -> None:
        sigma, sigma_next = self._sigma_pair()
        d = (self.x - denoised) / sigma
        self.x = self.x + d * (sigma_next - sigma)
        self.step += 1


class Heun(Trajectory):
    """Heun's 2nd-order method (Karras Alg. 1): an Euler predictor and a trapezoidal corrector."""

    name = "heun"

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor) -> None:
        super().__init__(x, sigmas)
        self._d: torch.Tensor | None = None  # slope at sigma_i while the corrector is pending
        self._x_pred: torch.Tensor | None = None

    @property
    def total_evals(self) -> int:
        return 2 * self.steps - 1  # the last step (to sigma = 0) is plain Euler

    def query(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._x_pred is not None:
            return self._x_pred, self._rows(float(self.sigmas[self.step + 1]))
        return super().query()

    def advance(self, denoised: torch.Tensor) -> None:
        sigma, sigma_next = self._sigma_pair()
        if self._x_pred is None:
            d = (self.x - denoised) / sigma
            if sigma_next == 0:
                self.x = self.x + d * (sigma_next - sigma)
                self.step += 1
            else:
                self._d, self._x_pred = d, self.x + d * (sigma_next - sigma)
            return
        assert self._d is not None
        d_next = (self._x_pred - denoised) / sigma_next
        self.x = self.x + (self._d + d_next) / 2 * (sigma_next - sigma)
        self._d = self._x_pred = None
        self.step += 1


class DPMpp2M(Trajectory):
    """DPM-Solver++(2M) (Lu et al. 2022): a multistep exponential integrator in log-sigma."""

    name = "dpmpp_2m"

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor) -> None:
        super().__init__(x, sigmas)
        self._old_denoised: torch.Tensor | None = None

    def advance(self, denoised: torch.Tensor) -> None:
        sigma, sigma_next = self._sigma_pair()
        if sigma_next == 0:
            self.x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)  # t = -log(sigma)
            d = denoised
            if self._old_denoised is not None:
                h_last = math.log(float(self.sigmas[self.step - 1])) - math.log(sigma)
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * self._old_denoised
            self.x = (sigma_next / sigma) * self.x - math.expm1(-h) * d
        self._old_denoised = denoised
        self.step += 1


SAMPLERS: dict[str, type[Trajectory]] = {"euler": Euler, "ddim": Euler, "heun": Heun, "dpmpp_2m": DPMpp2M}
assert tuple(SAMPLERS) == get_args(SamplerName)


def make_trajectory(sampler: str, x: torch.Tensor, sigmas: torch.Tensor) -> Trajectory:
    """A fresh trajectory for `sampler` (one of SAMPLERS) starting at x: (B, C, H, W) = sigmas[0] * noise."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    return SAMPLERS[sampler](x, sigmas)


def sample(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: str = "heun",
    callback: Callable[[Trajectory, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate the probability-flow ODE from x: (B, C, H, W) at sigmas[0] to sigma = 0.

    `model(x, sigma) -> denoised` closes over the condition; `callback(trajectory, denoised)` sees
    every evaluation (for routing traces and progress).
    """
    traj = make_trajectory(sampler, x, sigmas)
    while not traj.done:
        x_eval, sigma = traj.query()
        denoised = model(x_eval, sigma)
        if callback is not None:
            callback(traj, denoised)
        traj.advance(denoised)
    return traj.x

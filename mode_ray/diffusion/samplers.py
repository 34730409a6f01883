"""Deterministic ODE samplers as resumable trajectories.

A `Trajectory` owns one request's state and asks for one denoiser evaluation at a time
(`query()` -> `(x, sigma)`, then `advance(denoised)`), so the in-process `sample` loop and the
router's step engine (which batches rows of many requests into one call per expert) run the very
same arithmetic. The update rules follow k-diffusion's `sampling.py` (Karras et al. 2022, Alg. 1-2;
Lu et al. 2022, DPM-Solver++(2M)).

`advance_many` steps many trajectories at once: those of one sampler whose next step takes the same rule
(`rule`) are stacked and stepped in a few tensor ops, with per-row coefficients cast from the same Python
floats a single trajectory uses, so every row gets the bits it gets alone; `advance` is `advance_many` of one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch

SamplerName = Literal["euler", "ddim", "heun", "dpmpp_2m"]  # the one list of sampler names


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's slope dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def per_row(
    values: Sequence[float], sizes: Sequence[int], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """(sum sizes,) values[i] repeated sizes[i] times, cast from the Python floats exactly as `tensor * value`
    casts a scalar (so a batch has each row's own bits): one tensor op per batch, not one per trajectory."""
    v = torch.tensor(values, dtype=dtype, device=device)
    if any(n != 1 for n in sizes):
        v = v.repeat_interleave(torch.tensor(sizes, device=device))
    return v


def _rows(values: Sequence[float], sizes: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """`per_row` shaped (R, 1, ..., 1) to broadcast over like's (R, C, H, W), in its dtype and device."""
    return per_row(values, sizes, like.dtype, like.device).reshape(-1, *([1] * (like.ndim - 1)))


def _cat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))


def _split(value: torch.Tensor, sizes: Sequence[int]) -> Sequence[torch.Tensor]:
    return (value,) if len(sizes) == 1 else value.split(list(sizes))


class Trajectory:
    """One request's sampling state. x: (B, C, H, W); sigmas: (steps + 1,) ending in 0."""

    name = "base"

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor) -> None:
        if sigmas.ndim != 1 or len(sigmas) < 2 or float(sigmas[-1]) != 0.0:
            raise ValueError(f"sigmas must be 1-D, decreasing and end in 0, got {sigmas.tolist()}")
        self.x = x
        self.sigmas = sigmas.double()
        self._s: list[float] = self.sigmas.tolist()  # the same doubles, read without tensor indexing
        self.step = 0  # index i of the current sigma

    @property
    def steps(self) -> int:
        return len(self._s) - 1

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    @property
    def total_evals(self) -> int:
        return self.steps

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    def query_sigma(self) -> float:
        """The sigma of the next evaluation."""
        return self._s[self.step]

    def query_x(self) -> torch.Tensor:
        """The point of the next evaluation: (B, C, H, W)."""
        return self.x

    def query(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next evaluation point: x (B, C, H, W) and sigma (B,)."""
        x = self.query_x()
        return x, torch.full((x.shape[0],), self.query_sigma(), dtype=x.dtype, device=x.device)

    def rule(self) -> str:
        """Which update the next `advance` takes: trajectories of one class and rule step as one batch."""
        return "step"

    def advance(self, denoised: torch.Tensor) -> None:
        """Consume D(query()) with shape (B, C, H, W)."""
        advance_many([self], denoised)

    @classmethod
    def _advance_group(cls, rule: str, trajs: Sequence[Trajectory], denoised: torch.Tensor) -> None:
        """Step `trajs` (all of this class, all taking `rule`) by their stacked rows of denoised."""
        raise NotImplementedError

    def _sigma_pair(self) -> tuple[float, float]:
        return self._s[self.step], self._s[self.step + 1]


def _pairs(trajs: Sequence[Trajectory]) -> tuple[list[float], list[float], list[int]]:
    pairs = [t._sigma_pair() for t in trajs]
    return [p[0] for p in pairs], [p[1] for p in pairs], [t.rows for t in trajs]


class Euler(Trajectory):
    """Euler on the probability-flow ODE (Karras Alg. 1 without the correction); equals deterministic DDIM."""

    name = "euler"

    @classmethod
    def _advance_group(cls, rule: str, trajs: Sequence[Trajectory], denoised: torch.Tensor) -> None:
        _euler(trajs, denoised)


def _euler(trajs: Sequence[Trajectory], denoised: torch.Tensor) -> None:
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i for every trajectory."""
    sigma, sigma_next, sizes = _pairs(trajs)
    x = _cat([t.x for t in trajs])
    d = to_d(x, _rows(sigma, sizes, x), denoised)
    x = x + d * _rows([b - a for a, b in zip(sigma, sigma_next, strict=True)], sizes, x)
    for t, part in zip(trajs, _split(x, sizes), strict=True):
        t.x = part
        t.step += 1


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

    def query_sigma(self) -> float:
        return self._s[self.step + 1] if self._x_pred is not None else self._s[self.step]

    def query_x(self) -> torch.Tensor:
        return self._x_pred if self._x_pred is not None else self.x

    def rule(self) -> str:
        if self._x_pred is not None:
            return "correct"
        return "euler" if self._s[self.step + 1] == 0 else "predict"

    @classmethod
    def _advance_group(cls, rule: str, trajs: Sequence[Trajectory], denoised: torch.Tensor) -> None:
        if rule == "euler":
            _euler(trajs, denoised)
            return
        sigma, sigma_next, sizes = _pairs(trajs)
        x = _cat([t.x for t in trajs])
        dt = _rows([b - a for a, b in zip(sigma, sigma_next, strict=True)], sizes, x)
        if rule == "predict":
            d = to_d(x, _rows(sigma, sizes, x), denoised)
            x_pred = x + d * dt
            for t, d_t, x_t in zip(trajs, _split(d, sizes), _split(x_pred, sizes), strict=True):
                t._d, t._x_pred = d_t, x_t  # type: ignore[attr-defined]
            return
        d = _cat([t._d for t in trajs])  # type: ignore[attr-defined]
        x_pred = _cat([t._x_pred for t in trajs])  # type: ignore[attr-defined]
        d_next = to_d(x_pred, _rows(sigma_next, sizes, x), denoised)
        x = x + (d + d_next) / 2 * dt
        for t, part in zip(trajs, _split(x, sizes), strict=True):
            t.x = part
            t._d = t._x_pred = None  # type: ignore[attr-defined]
            t.step += 1


class DPMpp2M(Trajectory):
    """DPM-Solver++(2M) (Lu et al. 2022): a multistep exponential integrator in log-sigma."""

    name = "dpmpp_2m"

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor) -> None:
        super().__init__(x, sigmas)
        self._old_denoised: torch.Tensor | None = None

    def rule(self) -> str:
        if self._s[self.step + 1] == 0:
            return "last"
        return "first" if self._old_denoised is None else "multistep"

    @classmethod
    def _advance_group(cls, rule: str, trajs: Sequence[Trajectory], denoised: torch.Tensor) -> None:
        sigma, sigma_next, sizes = _pairs(trajs)
        if rule == "last":
            x = denoised
        else:
            h = [math.log(a) - math.log(b) for a, b in zip(sigma, sigma_next, strict=True)]  # t = -log(sigma)
            d = denoised
            if rule == "multistep":
                r = [
                    (math.log(t._s[t.step - 1]) - math.log(a)) / h_t
                    for t, a, h_t in zip(trajs, sigma, h, strict=True)
                ]
                old = _cat([t._old_denoised for t in trajs])  # type: ignore[attr-defined]
                d = (
                    _rows([1 + 1 / (2 * r_t) for r_t in r], sizes, d) * denoised
                    - _rows([1 / (2 * r_t) for r_t in r], sizes, d) * old
                )
            x = _cat([t.x for t in trajs])
            x = (
                _rows([b / a for a, b in zip(sigma, sigma_next, strict=True)], sizes, x) * x
                - _rows([math.expm1(-h_t) for h_t in h], sizes, x) * d
            )
        for t, x_t, d_t in zip(trajs, _split(x, sizes), _split(denoised, sizes), strict=True):
            t.x = x_t
            t._old_denoised = d_t  # type: ignore[attr-defined]
            t.step += 1


def advance_many(trajs: Sequence[Trajectory], denoised: torch.Tensor) -> None:
    """Consume D(query()) of every trajectory: denoised (sum B_i, C, H, W), trajectory i's rows in order.

    Trajectories of one class whose next step takes the same rule step together (a few tensor ops per
    rule, not per trajectory); each row gets the bits `advance` alone would give it."""
    if not trajs:
        return
    sizes = [t.rows for t in trajs]
    groups: dict[tuple[type, str], list[int]] = {}
    for i, t in enumerate(trajs):
        groups.setdefault((type(t), t.rule()), []).append(i)
    if len(groups) == 1:
        ((cls, rule),) = groups
        cls._advance_group(rule, trajs, denoised)
        return
    parts = _split(denoised, sizes)
    for (cls, rule), members in groups.items():
        cls._advance_group(rule, [trajs[i] for i in members], _cat([parts[i] for i in members]))


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

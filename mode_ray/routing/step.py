"""One denoising step of a mixture, split so the in-process `Mixture` and the cluster's router share it.

`plan_step` (gate logits -> routing, guidance rows) runs where the gate lives; the chosen experts are
evaluated wherever they live (in-process modules or gRPC deployments); `finish_step` combines them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mode_ray.routing.combine import combine, dispatch
from mode_ray.routing.guidance import apply_guidance, expand_for_guidance, needs_guidance
from mode_ray.routing.topk import Routing, route


@dataclass(frozen=True)
class StepPlan:
    """The rows to evaluate (B' = B, or 2B with guidance) and who evaluates them.

    x: (B', C, H, W); sigma: (B',); cond: (B', D) or None; routing over B' rows (guidance rows share it);
    rows[e]: (R_e,) row indices for expert e; base: the B-row routing, for traces.
    """

    x: torch.Tensor
    sigma: torch.Tensor
    cond: torch.Tensor | None
    routing: Routing
    base: Routing
    rows: dict[int, torch.Tensor]
    guidance_scale: float


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """logits: (B, N); allowed: (N,) bool or None. Disallowed experts get -inf."""
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed.to(logits.device)[None], -math.inf)


def plan_step(
    logits: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: torch.Tensor | None,
    top_k: int = 2,
    top_p: float | None = None,
    guidance_scale: float = 1.0,
    allowed: torch.Tensor | None = None,
) -> StepPlan:
    """Route B rows from the gate's logits (B, N); add the null-condition rows when guidance is on."""
    base = route(mask_logits(logits, allowed), top_k, top_p)
    if needs_guidance(cond, guidance_scale):
        assert cond is not None
        x, sigma, cond = expand_for_guidance(x, sigma, cond)
        routing = base.repeat(2)
    else:
        routing = base
    return StepPlan(x, sigma, cond, routing, base, dispatch(routing), guidance_scale)


def finish_step(
    plan: StepPlan, outputs: Mapping[int, torch.Tensor], routing: Routing | None = None
) -> torch.Tensor:
    """Combine outputs[e]: (R_e, C, H, W) for plan.rows[e] into denoised: (B, C, H, W).

    `routing` overrides plan.routing (the router passes a renormalised one when an expert failed).
    """
    routing = plan.routing if routing is None else routing
    rows = {e: plan.rows[e] for e in outputs}
    denoised = combine(routing, outputs, rows)
    if plan.routing.indices.shape[0] != plan.base.indices.shape[0]:
        return apply_guidance(denoised, plan.guidance_scale)
    return denoised


@dataclass(frozen=True)
class StepTrace:
    """Routing of one evaluation: per row, the chosen experts' names and weights, and the dropped mass."""

    step: int
    sigma: float
    experts: list[list[str]]
    weights: list[list[float]]
    dropped: list[float]

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "sigma": self.sigma,
            "experts": self.experts,
            "weights": self.weights,
            "dropped": self.dropped,
        }


def trace_step(
    step: int, sigma: float, routing: Routing, names: Sequence[str], dropped: torch.Tensor | None = None
) -> StepTrace:
    experts, weights = [], []
    for idx_row, w_row in zip(routing.indices.tolist(), routing.weights.tolist(), strict=True):
        kept = [(names[i], round(w, 6)) for i, w in zip(idx_row, w_row, strict=True) if i >= 0 and w > 0]
        experts.append([n for n, _ in kept])
        weights.append([w for _, w in kept])
    b = routing.indices.shape[0]
    drop = [0.0] * b if dropped is None else [round(float(d), 6) for d in dropped[:b]]
    return StepTrace(step, round(sigma, 6), experts, weights, drop)

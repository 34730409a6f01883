"""One denoising step of a mixture, split so the in-process `Mixture` and the cluster's router share it.

`plan_step` (gate logits -> routing, guidance rows) runs where the gate lives; the chosen experts are
evaluated wherever they live (in-process modules or gRPC deployments); `finish_step` combines them:
`D_mix = sum_k w_k D_k`, exact for a convex mixture whose experts share one formulation.

Classifier-free guidance is exact on the mixture when both branches share one routing: with the same
weights w, `sum_k w_k [D_u,k + s (D_c,k - D_u,k)]` equals `D_u,mix + s (D_c,mix - D_u,mix)`. So the gate is
evaluated once, on the conditional rows, and every chosen expert sees the conditional and the null rows in
one call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mode_ray.routing.topk import PAD, Routing, route


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

    @property
    def guided(self) -> bool:
        return self.routing.indices.shape[0] != self.base.indices.shape[0]


def allowed_mask(
    names: Sequence[str], pin: Sequence[str] = (), exclude: Sequence[str] = ()
) -> torch.Tensor | None:
    """(N,) bool: True for experts a request may use. None when nothing is pinned or excluded."""
    for field, given in (("experts", pin), ("exclude_experts", exclude)):
        unknown = [n for n in given if n not in names]
        if unknown:
            shown = sorted({n[:80] for n in unknown})[:5]
            raise ValueError(f"{field}: unknown expert(s) {shown}; registered: {list(names)}")
    if not pin and not exclude:
        return None
    mask = torch.tensor([(not pin or n in pin) and n not in exclude for n in names])
    if not mask.any():
        if not pin:
            raise ValueError(f"exclude_experts: excluding {list(exclude)} leaves no expert")
        raise ValueError(
            f"experts, exclude_experts: pinning {list(pin)} and excluding {list(exclude)} leaves no expert"
        )
    return mask


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """logits: (B, N); allowed: (N,) bool or None. Disallowed experts get -inf."""
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed.to(logits.device)[None], -math.inf)


def needs_guidance(cond: torch.Tensor | None, guidance_scale: float) -> bool:
    return cond is not None and guidance_scale != 1.0


def dispatch(routing: Routing) -> dict[int, torch.Tensor]:
    """expert index -> (R,) row indices it must evaluate, in increasing row order."""
    return {e: routing.rows_of(e) for e in routing.experts()}


def plan_step(
    logits: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: torch.Tensor | None,
    *,
    top_k: int = 2,
    top_p: float | None = None,
    min_weight: float | None = None,
    guidance_scale: float = 1.0,
    allowed: torch.Tensor | None = None,
) -> StepPlan:
    """Route B rows from the gate's logits (B, N); stack the null-condition rows under the conditional ones
    (B -> 2B, sharing one routing) when guidance is on. min_weight: the weight floor (see weight_floor)."""
    base = route(mask_logits(logits, allowed), top_k, top_p, min_weight)
    routing = base
    if needs_guidance(cond, guidance_scale):
        assert cond is not None
        x, sigma, cond = (
            torch.cat([x, x]),
            torch.cat([sigma, sigma]),
            torch.cat([cond, torch.zeros_like(cond)]),
        )
        routing = base.repeat(2)
    return StepPlan(x, sigma, cond, routing, base, dispatch(routing), guidance_scale)


def combine(
    routing: Routing, outputs: Mapping[int, torch.Tensor], rows: Mapping[int, torch.Tensor]
) -> torch.Tensor:
    """Weighted sum of expert outputs.

    outputs[e]: (R_e, C, H, W) for the rows rows[e] of expert e. Returns (B, C, H, W). The sum runs over
    the k slots in a fixed order, so every caller (in-process or distributed) gets the same bits.
    """
    batch, k = routing.indices.shape
    first = next(iter(outputs.values()))
    stacked = first.new_zeros((batch, k, *first.shape[1:]))  # (B, k, C, H, W)
    for e, out in outputs.items():
        r = rows[e]
        slot = (routing.indices[r] == e).float().argmax(dim=1)  # (R_e,) the slot of e in each of its rows
        stacked[r, slot] = out
    w = torch.where(routing.indices == PAD, torch.zeros_like(routing.weights), routing.weights)
    return (w.to(first.dtype)[..., None, None, None] * stacked).sum(dim=1)


def finish_step(
    plan: StepPlan, outputs: Mapping[int, torch.Tensor], routing: Routing | None = None
) -> torch.Tensor:
    """Combine outputs[e]: (R_e, C, H, W) for plan.rows[e] into denoised: (B, C, H, W).

    `routing` overrides plan.routing (renormalised over the experts that answered, when one failed).
    With guidance, denoised = D_u + s (D_c - D_u) from the stacked [D_c; D_u].
    """
    routing = plan.routing if routing is None else routing
    denoised = combine(routing, outputs, {e: plan.rows[e] for e in outputs})
    if plan.guided:
        d_cond, d_uncond = denoised.chunk(2)
        return d_uncond + plan.guidance_scale * (d_cond - d_uncond)
    return denoised

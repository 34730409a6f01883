"""Combine the chosen experts' predictions: `D_mix = sum_k w_k D_k` (exact for a convex mixture)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mode_ray.routing.topk import PAD, Routing


def dispatch(routing: Routing) -> dict[int, torch.Tensor]:
    """expert index -> (R,) row indices it must evaluate, in increasing row order."""
    return {e: routing.rows_of(e) for e in routing.experts()}


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

"""Sparse routing: keep the top-k (or top-p) experts per row and renormalise over the kept ones.

Like an MoE layer (mistral-inference's `moe.py`): top-k on the logits, softmax over the kept k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD = -1  # index of an unused slot (adaptive top-p keeps fewer than k experts on some rows)


class NoExpertLeft(RuntimeError):
    """Every expert chosen for some row failed: the step cannot be combined."""


@dataclass(frozen=True)
class Routing:
    """indices: (B, k) expert indices (PAD for unused slots); weights: (B, k), each row sums to 1."""

    indices: torch.Tensor
    weights: torch.Tensor

    def experts(self) -> list[int]:
        """Sorted distinct expert indices that receive at least one row."""
        return sorted(int(i) for i in self.indices.unique() if i != PAD)

    def rows_of(self, expert: int) -> torch.Tensor:
        """(R,) row indices routed to `expert`, in increasing order (gather keeps row order)."""
        return (self.indices == expert).any(dim=1).nonzero().flatten()

    def repeat(self, times: int) -> Routing:
        """The same routing for `times` stacked copies of the batch (the branches of guidance)."""
        return Routing(self.indices.repeat(times, 1), self.weights.repeat(times, 1))


def _check_logits(logits: torch.Tensor) -> None:
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be (B, N) with N >= 1 experts, got shape {list(logits.shape)}")
    dead = ~torch.isfinite(logits).any(dim=1) | torch.isnan(logits).any(dim=1)
    if dead.any():
        raise ValueError(
            f"no expert can take row(s) {dead.nonzero().flatten().tolist()}: every logit is -inf or NaN "
            "(check the experts' sigma intervals and the pinned/excluded experts)"
        )


def top_k(logits: torch.Tensor, k: int) -> Routing:
    """Keep the k largest logits per row; weights = softmax over the kept logits. logits: (B, N)."""
    _check_logits(logits)
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    k = min(k, logits.shape[1])
    values, indices = logits.topk(k, dim=1)  # (B, k), sorted descending
    weights = values.softmax(dim=1)  # a -inf kept logit gets weight 0
    indices = torch.where(weights > 0, indices, torch.full_like(indices, PAD))
    return Routing(indices, weights)


def top_p(logits: torch.Tensor, p: float, k_max: int | None = None) -> Routing:
    """Adaptive k: per row, the smallest set of experts whose softmax mass reaches p (at most k_max),
    renormalised. logits: (B, N)."""
    _check_logits(logits)
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    n = logits.shape[1] if k_max is None else min(k_max, logits.shape[1])
    probs, indices = logits.softmax(dim=1).sort(dim=1, descending=True)  # (B, N)
    probs, indices = probs[:, :n], indices[:, :n]
    mass_before = probs.cumsum(dim=1) - probs  # mass of the experts ranked above each one
    keep = mass_before < p - 1e-7
    keep[:, 0] = True
    weights = torch.where(keep, probs, torch.zeros_like(probs))
    weights = weights / weights.sum(dim=1, keepdim=True)
    return Routing(torch.where(keep, indices, torch.full_like(indices, PAD)), weights)


def weight_floor(routing: Routing, min_weight: float) -> Routing:
    """Drop the experts whose renormalised weight is below `min_weight` (never a row's best one) and
    renormalise the rest, exactly as a dropped expert is: they are not evaluated. weights: (B, k)."""
    if not 0 <= min_weight < 1:
        raise ValueError(f"min_weight must be in [0, 1), got {min_weight}")
    best = routing.weights.argmax(dim=1, keepdim=True)  # (B, 1)
    keep = routing.weights >= min_weight
    keep.scatter_(1, best, True)
    weights = torch.where(keep, routing.weights, torch.zeros_like(routing.weights))
    indices = torch.where(keep, routing.indices, torch.full_like(routing.indices, PAD))
    return Routing(indices, weights / weights.sum(dim=1, keepdim=True))


def route(
    logits: torch.Tensor, k: int = 2, p: float | None = None, min_weight: float | None = None
) -> Routing:
    """top_k, or top_p capped at k when p is given; then the weight floor when min_weight is given."""
    routing = top_k(logits, k) if p is None else top_p(logits, p, k_max=k)
    return routing if not min_weight else weight_floor(routing, min_weight)


def drop_slots(routing: Routing, hit: torch.Tensor) -> tuple[Routing, torch.Tensor]:
    """Remove the slots marked in `hit` (B, k) and renormalise each row over the rest.

    Returns the new routing and the dropped mass per row: (B,). A row that loses every slot is left with
    zero weights (its caller decides what that means)."""
    dropped = torch.where(hit, routing.weights, torch.zeros_like(routing.weights)).sum(dim=1)  # (B,)
    weights = torch.where(hit, torch.zeros_like(routing.weights), routing.weights)
    total = weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
    indices = torch.where(hit, torch.full_like(routing.indices, PAD), routing.indices)
    return Routing(indices, weights / total), dropped


def drop_experts(routing: Routing, failed: set[int]) -> tuple[Routing, torch.Tensor]:
    """Remove `failed` experts from every row and renormalise the remaining weights.

    Returns the new routing and the dropped mass per row: (B,). NoExpertLeft when a row loses every expert.
    """
    hit = torch.isin(routing.indices, torch.tensor(sorted(failed), dtype=routing.indices.dtype))
    dropped_routing, dropped = drop_slots(routing, hit)
    empty = dropped_routing.weights.sum(dim=1) <= 0
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise NoExpertLeft(f"every chosen expert failed for row(s) {rows} (failed experts: {sorted(failed)})")
    return dropped_routing, dropped

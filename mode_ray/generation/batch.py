"""One denoising step for many requests at once: the rows of every request are planned, combined and
guided as one batch, so the router's per-tick work is a few tensor ops whatever the number of requests.

    q = stack_queries(states)                          # every request's next evaluation point, stacked
    plan = plan_batch(states, q, gate(q.x, q.sigma, q.cond, cards))
    outputs = {e: expert_e(plan.x[rows], ...) for e, rows in plan.rows.items()}
    lost = advance_batch(states, plan, outputs)        # drop failed experts, combine, guide, sampler steps

The in-process `generate_local` runs it with a batch of one, the router's step engine with every request of
a tick: one path. Each row's arithmetic does not depend on the others (top-k, softmax and the weighted sum
are row-wise; a padded slot adds an exact zero), so a request gives the same bits alone or batched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mode_ray.generation.request import RequestState, trace_step
from mode_ray.routing.step import combine, dispatch, needs_guidance
from mode_ray.routing.topk import PAD, Routing, drop_slots, route


def stack_cond(conds: Sequence[torch.Tensor | None], rows: Sequence[int]) -> torch.Tensor | None:
    """Stack per-request conditions (each (R_i, D) or packed (R_i, 1 + L, D), or None) into (sum R_i, ...),
    or None when all are None.

    The null condition is the all-zeros row (what experts see under condition dropout, and what the gates
    treat as no condition), so a request without one stacks as zeros and its rows compute exactly as alone.
    """
    present = [c for c in conds if c is not None]
    if not present:
        return None
    shape, device = present[0].shape[1:], present[0].device
    zeros = [torch.zeros(r, *shape, device=device) for r in rows]
    return torch.cat([c if c is not None else z for c, z in zip(conds, zeros, strict=True)])


@dataclass(frozen=True)
class Queries:
    """The next evaluation point of every request, stacked: x (R, C, H, W), sigma (R,), cond (R, D) or None
    (a request without a condition stacks as null rows); spans[i]: request i's rows [start, end)."""

    x: torch.Tensor
    sigma: torch.Tensor
    cond: torch.Tensor | None
    spans: list[tuple[int, int]]


def stack_queries(states: Sequence[RequestState]) -> Queries:
    queries = [s.query() for s in states]
    sizes = [q[0].shape[0] for q in queries]
    starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    return Queries(
        torch.cat([q[0] for q in queries]),
        torch.cat([q[1] for q in queries]),
        stack_cond([s.cond for s in states], sizes),
        list(zip(starts[:-1], starts[1:], strict=True)),
    )


@dataclass(frozen=True)
class BatchPlan:
    """The evaluation rows of a batch of requests and who evaluates them.

    x: (R', C, H, W), sigma: (R',), cond: (R', D) or None: first the R query rows of every request in order,
    then a null-condition copy of each guided row (guided[j] is the query row of copy R + j). routing: (R', k)
    (a copy shares its row's routing). rows[e]: (R_e,) rows expert e evaluates. spans[i]: request i's query
    rows [start, end); scale: (G,) the guidance scale of each guided row.
    """

    x: torch.Tensor
    sigma: torch.Tensor
    cond: torch.Tensor | None
    routing: Routing
    rows: dict[int, torch.Tensor]
    spans: list[tuple[int, int]]
    guided: torch.Tensor
    scale: torch.Tensor
    failed: dict[int, str]  # request index -> why it cannot be routed (it gets no rows)
    owner: torch.Tensor  # (R',) the request index of every evaluation row

    @property
    def queries(self) -> int:
        return self.spans[-1][1] if self.spans else 0


def _pad(routing: Routing, k: int) -> Routing:
    extra = k - routing.indices.shape[1]
    if extra == 0:
        return routing
    b = routing.indices.shape[0]
    pad_i = torch.full((b, extra), PAD, dtype=routing.indices.dtype, device=routing.indices.device)
    pad_w = torch.zeros((b, extra), dtype=routing.weights.dtype, device=routing.weights.device)
    return Routing(torch.cat([routing.indices, pad_i], 1), torch.cat([routing.weights, pad_w], 1))


def plan_batch(states: Sequence[RequestState], queries: Queries, logits: torch.Tensor) -> BatchPlan:
    """Route the stacked queries of `states` from the gate's logits (R, N) in one go per routing setting.

    A request whose rows no expert can take (every logit -inf or NaN after its pins and exclusions) is named
    in `failed` with the reason and gets no rows; the others are planned as if alone.
    """
    x, sigma, cond, spans = queries.x, queries.sigma, queries.cond, queries.spans
    logits = logits.masked_fill(
        torch.isnan(logits), -math.inf
    )  # a NaN score excludes that expert, not the row
    failed: dict[int, str] = {}
    for i, (s, (a, b)) in enumerate(zip(states, spans, strict=True)):
        if s.allowed is not None:
            logits[a:b] = logits[a:b].masked_fill(~s.allowed.to(logits.device)[None], -math.inf)
        block = logits[a:b]
        dead = ~torch.isfinite(block).any(dim=1)
        if dead.any():
            failed[i] = (
                f"no expert can take row(s) {dead.nonzero().flatten().tolist()}: every logit is -inf or NaN "
                "(check the experts' sigma intervals and the pinned/excluded experts)"
            )
    # one top-k (or top-p / floor) per distinct routing setting, over all the rows that share it
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(states):
        if i not in failed:
            groups.setdefault((s.req.top_k, s.req.top_p, s.req.min_weight), []).append(i)
    k_max = max([min(k, logits.shape[1]) for k, _, _ in groups] or [1])
    indices = torch.full((len(x), k_max), PAD, dtype=torch.long, device=logits.device)
    weights = torch.zeros((len(x), k_max), dtype=logits.dtype, device=logits.device)
    for (k, p, floor), members in groups.items():
        rows = torch.cat([torch.arange(*spans[i], device=logits.device) for i in members])
        r = _pad(route(logits[rows], k, p, floor), k_max)
        indices[rows], weights[rows] = r.indices, r.weights
    base = Routing(indices, weights)
    # guidance: a null-condition copy of every guided row, sharing its routing (exact guidance of the mixture)
    guided_rows, scales = [], []
    for i, (s, (a, b)) in enumerate(zip(states, spans, strict=True)):
        if i not in failed and needs_guidance(s.cond, s.req.guidance_scale):
            guided_rows.append(torch.arange(a, b, device=x.device))
            scales.append(torch.full((b - a,), float(s.req.guidance_scale), device=x.device))
    guided = torch.cat(guided_rows) if guided_rows else torch.zeros(0, dtype=torch.long, device=x.device)
    scale = torch.cat(scales) if scales else torch.zeros(0, device=x.device)
    if len(guided):
        assert cond is not None
        x = torch.cat([x, x[guided]])
        sigma = torch.cat([sigma, sigma[guided]])
        cond = torch.cat([cond, torch.zeros_like(cond[guided])])
        routing = Routing(
            torch.cat([base.indices, base.indices[guided]]), torch.cat([base.weights, base.weights[guided]])
        )
    else:
        routing = base
    owner = torch.empty(len(queries.x), dtype=torch.long, device=x.device)
    for i, (a, b) in enumerate(spans):
        owner[a:b] = i
    owner = torch.cat(
        [owner, owner[guided]]
    )  # (R',): the null-condition copies belong to their rows' request
    return BatchPlan(x, sigma, cond, routing, dispatch(routing), spans, guided, scale, failed, owner)


def advance_batch(
    states: Sequence[RequestState],
    plan: BatchPlan,
    outputs: Mapping[int, torch.Tensor],
    failed: Mapping[int, set[int]] | None = None,
    rows: Mapping[int, torch.Tensor] | None = None,
) -> dict[int, str]:
    """Combine the experts' outputs[e]: (R_e, C, H, W) for rows[e] (default plan.rows[e]) and take every
    request's sampler step.

    failed: request index -> experts whose call failed for it; they are dropped from all of that request's
    rows (both guidance branches) and its remaining weights renormalised, the dropped mass going into its
    trace. Returns request index -> why it could not advance (a row lost every chosen expert); those
    requests, and those in plan.failed, are left as they were.
    """
    failed = failed or {}
    rows = plan.rows if rows is None else rows
    n_q = plan.queries
    device = plan.routing.indices.device
    copy_of = torch.cat([torch.arange(n_q, device=device), plan.guided])  # (R',) each row's query row
    hit = torch.zeros_like(plan.routing.indices, dtype=torch.bool)  # (R', k) slots of failed experts
    for i, experts in failed.items():
        mine = plan.owner == i  # (R',)
        for e in experts:
            hit |= mine[:, None] & (plan.routing.indices == e)
    routing, dropped = drop_slots(plan.routing, hit)  # dropped: (R',) mass each row lost
    lost: dict[int, str] = {}
    if failed:
        for row in (routing.weights.sum(dim=1) <= 0).nonzero().flatten().tolist():
            i = int(plan.owner[row])
            if i not in lost:
                names = sorted(states[i].names[e] for e in failed.get(i, ()))
                first = int(copy_of[row]) - plan.spans[i][0]  # the request's own row index
                lost[i] = f"every chosen expert failed for row(s) {[first]} (failed: {names})"
    kept_rows, kept_out = {}, {}
    # rows where e was dropped (a failed call of the same request) are left out of the combine
    for e, out in outputs.items():
        keep = (routing.indices[rows[e]] == e).any(dim=1)
        if keep.any():
            kept_rows[e], kept_out[e] = rows[e][keep], out[keep]
    if not kept_out:  # every row lost every expert
        return {i: lost.get(i, "no expert answered") for i in range(len(states)) if i not in plan.failed}
    denoised = combine(routing, kept_out, kept_rows)
    if len(plan.guided):  # D = D_u + s (D_c - D_u) on the guided rows
        d_cond, d_uncond = denoised[plan.guided], denoised[n_q:]
        s = plan.scale.to(denoised.dtype).reshape(-1, *([1] * (denoised.ndim - 1)))
        denoised = denoised[:n_q].clone()
        denoised[plan.guided] = d_uncond + s * (d_cond - d_uncond)
    # one host transfer for every request's trace
    idx_rows, w_rows = routing.indices[:n_q].tolist(), routing.weights[:n_q].tolist()
    drop_rows = dropped[:n_q].tolist()
    sigmas = plan.sigma[:n_q].tolist()
    with torch.no_grad():
        for i, (state, (a, b)) in enumerate(zip(states, plan.spans, strict=True)):
            if i in plan.failed or i in lost:
                continue
            if i in failed:
                state.dropped += float(sum(drop_rows[a:b]))
            state.trace.append(
                trace_step(state.evals, sigmas[a], idx_rows[a:b], w_rows[a:b], state.names, drop_rows[a:b])
            )
            state.traj.advance(denoised[a:b])
    return lost

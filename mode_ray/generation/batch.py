"""One denoising step for many requests at once: the rows of every request are planned, combined, guided
and stepped (`advance_many`) as one batch, so the router's per-tick work is a few tensor ops whatever the
number of requests; what is left per request is its routing trace.

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
from itertools import accumulate

import torch

from mode_ray.diffusion.samplers import advance_many, per_row
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
    if len(present) == len(conds):
        return torch.cat(present)
    shape, device = present[0].shape[1:], present[0].device
    return torch.cat(
        [
            c if c is not None else torch.zeros(r, *shape, device=device)
            for c, r in zip(conds, rows, strict=True)
        ]
    )


@dataclass(frozen=True)
class Queries:
    """The next evaluation point of every request, stacked: x (R, C, H, W), sigma (R,), cond (R, D) or None
    (a request without a condition stacks as null rows); spans[i]: request i's rows [start, end)."""

    x: torch.Tensor
    sigma: torch.Tensor
    cond: torch.Tensor | None
    spans: list[tuple[int, int]]


def stack_queries(states: Sequence[RequestState]) -> Queries:
    trajs = [s.traj for s in states]
    x = torch.cat([t.query_x() for t in trajs])
    sizes = [t.rows for t in trajs]
    sigma = per_row([t.query_sigma() for t in trajs], sizes, x.dtype, x.device)  # (R,) as query() has it
    starts = list(accumulate(sizes, initial=0))
    return Queries(
        x,
        sigma,
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
    n, device = len(states), logits.device
    owner_q = per_row(range(n), [b - a for a, b in spans], torch.long, device)  # (R,) each row's request
    logits = logits.masked_fill(
        torch.isnan(logits), -math.inf
    )  # a NaN score excludes that expert, not the row
    masked = [i for i, s in enumerate(states) if s.allowed is not None]
    if masked:  # pinned / excluded experts: one mask row per request, gathered per row
        allowed = torch.ones((n, logits.shape[1]), dtype=torch.bool, device=device)
        for i in masked:
            allowed[i] = states[i].allowed.to(device)  # type: ignore[union-attr]
        logits = logits.masked_fill(~allowed[owner_q], -math.inf)
    dead = ~torch.isfinite(logits).any(dim=1)  # (R,)
    failed: dict[int, str] = {}
    if dead.any():
        for i in sorted(set(owner_q[dead].tolist())):
            a, b = spans[i]
            failed[i] = (
                f"no expert can take row(s) {dead[a:b].nonzero().flatten().tolist()}: every logit is -inf or "
                "NaN (check the experts' sigma intervals and the pinned/excluded experts)"
            )
    # one top-k (or top-p / floor) per distinct routing setting, over all the rows that share it
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(states):
        if i not in failed:
            groups.setdefault((s.req.top_k, s.req.top_p, s.req.min_weight), []).append(i)
    k_max = max([min(k, logits.shape[1]) for k, _, _ in groups] or [1])
    indices = torch.full((len(x), k_max), PAD, dtype=torch.long, device=device)
    weights = torch.zeros((len(x), k_max), dtype=logits.dtype, device=device)
    for (k, p, floor), members in groups.items():
        if len(members) == n:  # every row (the usual case): no gather
            r = _pad(route(logits, k, p, floor), k_max)
            indices, weights = r.indices, r.weights
            continue
        member = torch.zeros(n, dtype=torch.bool, device=device)
        member[members] = True
        rows = member[owner_q].nonzero().flatten()
        r = _pad(route(logits[rows], k, p, floor), k_max)
        indices[rows], weights[rows] = r.indices, r.weights
    base = Routing(indices, weights)
    # guidance: a null-condition copy of every guided row, sharing its routing (exact guidance of the mixture)
    flags = [i not in failed and needs_guidance(s.cond, s.req.guidance_scale) for i, s in enumerate(states)]
    if any(flags):
        assert cond is not None
        guided = torch.tensor(flags, device=device)[owner_q].nonzero().flatten()  # (G,) query rows
        scale = torch.tensor([float(s.req.guidance_scale) for s in states], device=device)[owner_q[guided]]
        x = torch.cat([x, x[guided]])
        sigma = torch.cat([sigma, sigma[guided]])
        cond = torch.cat([cond, torch.zeros_like(cond[guided])])
        routing = Routing(
            torch.cat([base.indices, base.indices[guided]]), torch.cat([base.weights, base.weights[guided]])
        )
    else:
        guided = torch.zeros(0, dtype=torch.long, device=device)
        scale = torch.zeros(0, device=device)
        routing = base
    owner = torch.cat([owner_q, owner_q[guided]])  # (R',): a null-condition copy belongs to its row's request
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
    kept_rows, kept_out = dict(rows), dict(outputs)
    if failed:  # rows where e was dropped (a failed call of the same request) are left out of the combine
        kept_rows, kept_out = {}, {}
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
    moving = [i for i in range(len(states)) if i not in plan.failed and i not in lost]
    for i in moving:
        state, (a, b) = states[i], plan.spans[i]
        if i in failed:
            state.dropped += float(sum(drop_rows[a:b]))
        state.trace.append(
            trace_step(state.evals, sigmas[a], idx_rows[a:b], w_rows[a:b], state.names, drop_rows[a:b])
        )
    if len(moving) < len(states):  # only the rows of the requests that advance
        keep = torch.zeros(len(states), dtype=torch.bool, device=device)
        keep[moving] = True
        denoised = denoised[keep[plan.owner[:n_q]]]
    with torch.no_grad():
        advance_many([states[i].traj for i in moving], denoised)  # every sampler step in a few tensor ops
    return lost

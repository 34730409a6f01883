"""The router's step engine: continuous batching of denoising steps across requests, per expert.

Every tick, for every active request: gate -> top-k (`RequestState.plan`) -> group the rows of all requests
by expert -> one batched call per expert, all in flight at once -> `RequestState.advance` (the same
combine and sampler step as the in-process `generate_local`). Finished requests leave; queued ones join the
next tick. A failed or late expert call is retried once; then the expert is dropped for that step and the
other weights renormalised (the dropped mass goes into the trace); a request fails only when a row loses
every chosen expert, or when its deadline passes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mode_ray.generation import (
    GenerationResult,
    MixtureConfig,
    Progress,
    RequestState,
    ResolvedRequest,
    prepare,
)
from mode_ray.routing.step import StepPlan
from mode_ray.routing.topk import NoExpertLeft
from mode_ray.serve.config import RouterOptions
from mode_ray.serve.errors import DeadlineExceeded, ExpertCallError, GenerationFailed, Overloaded
from mode_ray.serve.metrics import RouterMetrics
from mode_ray.serve.registry import Snapshot
from mode_ray.serve.transport import ExpertClient, ExpertReply

PHASES = ("gate", "plan", "encode", "wire", "queue", "expert", "decode", "combine", "idle", "overhead")


@dataclass(frozen=True)
class TickTiming:
    """Where one tick's wall time went, in seconds. gate / plan / combine (+ sampler step) run in the router;
    encode and decode are summed over the tick's expert calls; wire is the longest send-to-reply of a call,
    queue the longest wait an expert reported before its forward pass (@serve.batch, earlier passes) and
    expert the longest forward pass an expert reported (its compute); idle is the part of the calls' wall
    time in which the router only waited; overhead = wall - expert: what distribution costs."""

    wall: float
    gate: float
    plan: float
    encode: float
    wire: float
    queue: float
    expert: float
    decode: float
    combine: float
    idle: float
    requests: int
    rows: int
    calls: int

    @property
    def overhead(self) -> float:
        return max(0.0, self.wall - self.expert)

    def to_dict(self) -> dict[str, float | int]:
        """Milliseconds per phase, plus the tick's requests, rows and expert calls."""
        ms = {f"{p}_ms": round(getattr(self, p) * 1e3, 3) for p in ("wall", *PHASES)}
        return {**ms, "requests": self.requests, "rows": self.rows, "calls": self.calls}


@dataclass
class _Active:
    id: str
    state: RequestState
    snapshot: Snapshot
    deadline: float
    future: asyncio.Future
    started: float
    on_progress: Callable[[Progress], None] | None = None
    timing: list[dict] | None = None  # per evaluation: the tick's TickTiming.to_dict(), when asked for
    cohort: int = 0  # which of the engine's out-of-phase tick loops steps it


@dataclass
class _Call:
    """One expert call: rows of several requests stacked. parts: (request, expert index in its snapshot)."""

    expert: str
    client: ExpertClient
    x: list[torch.Tensor] = field(default_factory=list)
    sigma: list[torch.Tensor] = field(default_factory=list)
    cond: list[torch.Tensor | None] = field(default_factory=list)
    parts: list[tuple[_Active, int]] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(x.shape[0] for x in self.x)


def stack_cond(conds: list[torch.Tensor | None], rows: list[int]) -> torch.Tensor | None:
    """Stack per-request conditions (each (R_i, D) or None) into (sum R_i, D), or None when all are None.

    The null condition is the all-zeros row (what experts see under condition dropout, and what the gates
    treat as no condition), so a request without one stacks as zeros and its rows are computed exactly as
    alone.
    """
    present = [c for c in conds if c is not None]
    if not present:
        return None
    dim = present[0].shape[1]
    return torch.cat([c if c is not None else torch.zeros(r, dim) for c, r in zip(conds, rows, strict=True)])


class StepEngine:
    def __init__(
        self, config: MixtureConfig, options: RouterOptions, client_for: Callable[[str], ExpertClient]
    ) -> None:
        self.config, self.options = config, options
        self.client_for = client_for
        self.metrics = RouterMetrics()
        self.ticks = 0  # counters since start (benchmarks read them through Router.engine_stats)
        self.rows_sent = 0
        self.expert_busy_s: dict[str, float] = {}  # forward time the experts reported, per expert
        self._queue: asyncio.Queue[_Active] = asyncio.Queue()
        self._active: list[_Active] = []
        self._wake = [asyncio.Event() for _ in range(options.cohorts)]
        self._loop_tasks: list[asyncio.Task | None] = [None] * options.cohorts

    # ---- admission -------------------------------------------------------------------------------
    def uses(self, name: str) -> int:
        """How many admitted requests may still route to `name` (for draining)."""
        return sum(name in a.snapshot.names for a in [*self._active, *self._queue._queue])  # type: ignore[attr-defined]

    @property
    def load(self) -> tuple[int, int]:
        return len(self._active), self._queue.qsize()

    async def generate(
        self,
        req: ResolvedRequest,
        snapshot: Snapshot,
        deadline_s: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        timing: bool = False,
    ) -> GenerationResult:
        """Run `req` over the experts of `snapshot` (its registry version, gate and expert set); with `timing`
        the result carries the time breakdown of every tick it took part in."""
        if not snapshot.entries:
            raise GenerationFailed("no expert is registered and ready")
        active, queued = self.load
        if active + queued >= self.options.max_active_requests + self.options.max_queued_requests:
            self.metrics.requests.inc(tags={"outcome": "overloaded"})
            raise Overloaded(f"the router is at capacity ({active} active, {queued} queued); retry later")
        now = time.monotonic()
        item = _Active(
            id=uuid.uuid4().hex[:16],
            state=prepare(req, self.config, snapshot.cards),
            snapshot=snapshot,
            deadline=now + (deadline_s or self.options.default_deadline_s),
            future=asyncio.get_running_loop().create_future(),
            started=now,
            on_progress=on_progress,
            timing=[] if timing else None,
        )
        self.metrics.registry_version.set(snapshot.version)
        self._ensure_loops()
        self._queue.put_nowait(item)
        self._admit()
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), timeout=item.deadline - now + 5)
        except TimeoutError:
            raise DeadlineExceeded(f"request {item.id} missed its deadline") from None

    def _ensure_loops(self) -> None:
        loop = asyncio.get_running_loop()
        for k, task in enumerate(self._loop_tasks):
            if task is None or task.done():
                self._loop_tasks[k] = loop.create_task(self._run(k))

    def _admit(self) -> None:
        """Move queued requests into the engine (up to max_active_requests), each into the smallest cohort."""
        while len(self._active) < self.options.max_active_requests and not self._queue.empty():
            item = self._queue.get_nowait()
            sizes = [0] * len(self._wake)
            for a in self._active:
                sizes[a.cohort] += 1
            item.cohort = sizes.index(min(sizes))
            self._active.append(item)
            self._wake[item.cohort].set()
        self.metrics.active.set(len(self._active))
        self.metrics.queued.set(self._queue.qsize())

    async def _run(self, cohort: int) -> None:
        """The tick loop of one cohort. With several cohorts their loops tick out of phase: while one awaits
        its experts the router gates, plans and combines for another, so experts with work never wait on the
        router. A request's arithmetic is the same in any cohort (its rows are computed alone or stacked)."""
        while True:
            self._admit()
            mine = [a for a in self._active if a.cohort == cohort and not a.future.done()]
            if not mine:
                self._wake[cohort].clear()
                await self._wake[cohort].wait()
                continue
            t0 = time.perf_counter()
            try:
                await self.tick(mine)
            except Exception as e:  # noqa: BLE001 - a bug in one tick must fail its requests, not hang them
                for a in mine:
                    self._fail(a, GenerationFailed(f"internal error in the step engine: {e!r}"))
            self.metrics.tick_seconds.observe(time.perf_counter() - t0)
            self._active = [a for a in self._active if not a.future.done()]

    # ---- one tick ----------------------------------------------------------------------------------
    async def tick(self, items: list[_Active]) -> TickTiming:
        """One evaluation for every request in `items`."""
        t0 = time.perf_counter()
        now = time.monotonic()
        live: list[_Active] = []
        for a in items:
            if a.future.done():
                continue
            if now > a.deadline:
                self._fail(
                    a,
                    DeadlineExceeded(f"request {a.id} passed its deadline after {a.state.evals} evaluations"),
                )
                continue
            live.append(a)
        gated = self._gate_all(live)
        t_gate = time.perf_counter()
        plans: list[tuple[_Active, StepPlan]] = []
        for a, (x, sigma), logits in gated:
            try:
                plan = a.state.plan(logits, x, sigma)
            except ValueError as e:
                self._fail(a, GenerationFailed(str(e)))
                continue
            plans.append((a, plan))
        calls = self._group(plans)
        t_plan = time.perf_counter()
        results = await asyncio.gather(*(self._call_with_retry(c, self._timeout(c)) for c in calls))
        t_calls = time.perf_counter()
        outputs: dict[str, dict[int, torch.Tensor]] = {a.id: {} for a, _ in plans}
        failed: dict[str, set[int]] = {a.id: set() for a, _ in plans}
        replies = [r for r in results if isinstance(r, ExpertReply)]
        for call, result in zip(calls, results, strict=True):
            if isinstance(result, ExpertReply):
                self.expert_busy_s[call.expert] = self.expert_busy_s.get(call.expert, 0.0) + result.forward_s
            if isinstance(result, Exception):
                for a, e in call.parts:
                    failed[a.id].add(e)
                continue
            parts = result.x0_hat.split([x.shape[0] for x in call.x])
            for (a, e), out in zip(call.parts, parts, strict=True):
                outputs[a.id][e] = out
        for a, plan in plans:
            self._advance(a, plan, outputs[a.id], failed[a.id])
        end = time.perf_counter()
        encode, decode = sum(r.encode_s for r in replies), sum(r.decode_s for r in replies)
        timing = TickTiming(
            wall=end - t0,
            gate=t_gate - t0,
            plan=t_plan - t_gate,
            encode=encode,
            wire=max((r.wire_s for r in replies), default=0.0),
            queue=max((r.queue_s for r in replies), default=0.0),
            expert=max((r.forward_s for r in replies), default=0.0),
            decode=decode,
            combine=end - t_calls,
            idle=max(0.0, (t_calls - t_plan) - encode - decode),
            requests=len(plans),
            rows=sum(c.rows for c in calls),
            calls=len(calls),
        )
        for phase in PHASES:
            self.metrics.tick_phase_seconds.observe(getattr(timing, phase), tags={"phase": phase})
        self.ticks += 1
        self.rows_sent += timing.rows
        if any(a.timing is not None for a, _ in plans):
            row = {"tick": self.ticks, **timing.to_dict()}
            for a, _ in plans:
                if a.timing is not None:
                    a.timing.append(row)
        return timing

    def _gate_all(
        self, live: list[_Active]
    ) -> list[tuple[_Active, tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """One gate call per registry version (its gate and experts) for the rows of all its requests: the gate
        is row-wise and the null condition is the all-zeros row, so stacking is exact.
        Returns (request, query, logits (B, N))."""
        by_version: dict[int, list[_Active]] = {}
        for a in live:
            by_version.setdefault(a.snapshot.version, []).append(a)
        out = []
        for items in by_version.values():
            queries = [a.state.query() for a in items]
            x = torch.cat([q[0] for q in queries])
            sigma = torch.cat([q[1] for q in queries])
            cond = stack_cond([a.state.cond for a in items], [q[0].shape[0] for q in queries])
            snapshot = items[0].snapshot
            with torch.no_grad():
                logits = snapshot.gate(x, sigma, cond, snapshot.cards)  # (sum B, N)
            for a, q, lg in zip(items, queries, logits.split([q[0].shape[0] for q in queries]), strict=True):
                out.append((a, q, lg))
        return out

    def _group(self, plans: list[tuple[_Active, StepPlan]]) -> list[_Call]:
        """Stack rows by expert (continuous batching) or by (request, expert); split at max_rows_per_call."""
        calls: dict[tuple, _Call] = {}
        for a, plan in plans:
            for e, rows in plan.rows.items():
                name = a.snapshot.entries[e].name
                key = (name,) if self.options.continuous_batching else (name, a.id)
                call = calls.get(key)
                if call is None or call.rows + len(rows) > self.options.max_rows_per_call:
                    if call is not None:
                        calls[(*key, len(calls))] = call  # keep the full call under a unique key
                    call = calls[key] = _Call(name, self.client_for(name))
                call.x.append(plan.x[rows])
                call.sigma.append(plan.sigma[rows])
                call.cond.append(None if plan.cond is None else plan.cond[rows])
                call.parts.append((a, e))
        return list(calls.values())

    def _timeout(self, call: _Call) -> float:
        remaining = min(a.deadline for a, _ in call.parts) - time.monotonic()
        return max(0.05, min(self.options.call_timeout_s, remaining))

    async def _call_with_retry(self, call: _Call, timeout: float) -> ExpertReply | Exception:
        x = torch.cat(call.x)
        sigma = torch.cat(call.sigma)
        cond = stack_cond(call.cond, [xi.shape[0] for xi in call.x])
        error: Exception = ExpertCallError("not called")
        for attempt in range(2):
            try:
                out = await call.client.infer(x, sigma, cond, timeout)
                self.metrics.expert_calls.inc(tags={"expert": call.expert, "outcome": "ok"})
                return out
            except (TimeoutError, ExpertCallError, OSError) as e:
                error = e
                self.metrics.expert_calls.inc(
                    tags={"expert": call.expert, "outcome": "retry" if attempt == 0 else "failed"}
                )
        return error

    def _advance(
        self, a: _Active, plan: StepPlan, outputs: dict[int, torch.Tensor], failed: set[int]
    ) -> None:
        before = a.state.dropped
        try:
            a.state.advance(plan, outputs, failed)
        except NoExpertLeft as e:
            names = sorted(a.snapshot.entries[i].name for i in failed)
            self._fail(a, GenerationFailed(f"request {a.id}: no chosen expert answered ({names}): {e}"))
            return
        for i in failed:
            lost = (a.state.dropped - before) / len(failed)
            self.metrics.dropped_mass.inc(lost, tags={"expert": a.snapshot.entries[i].name})
        traj = a.state.traj
        if a.on_progress is not None:
            a.on_progress(Progress(traj.step, traj.steps, a.state.trace[-1].sigma))
        if a.state.done:
            seconds = time.monotonic() - a.started
            self.metrics.requests.inc(tags={"outcome": "ok"})
            a.future.set_result(a.state.result(a.id, a.snapshot.version, seconds, a.timing))

    def _fail(self, a: _Active, error: Exception) -> None:
        if not a.future.done():
            self.metrics.requests.inc(tags={"outcome": type(error).__name__})
            a.future.set_exception(error)

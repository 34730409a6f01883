"""The router's step engine: continuous batching of denoising steps across requests, per expert.

Every tick, for the lanes the scheduler picks (`mode_ray.generation.batch`, the same step the in-process
`generate_local` takes with a batch of one): one gate call -> one batch plan (top-k, guidance rows) -> one
call per chosen expert, all in flight at once -> one combine and every lane's sampler step. Finished requests
leave; queued ones join the next tick. A failed or late expert call is retried once; then the expert is
dropped for that step and the other weights renormalised (the dropped mass goes into the trace; an
INVALID_ARGUMENT answer, which faults the rows and not the expert, is dropped at once, unretried); a request
fails only when a row loses every chosen expert, or when its deadline passes. An expert whose call failed
twice is not called again until it answers ModelReady (probed in the background every PROBE_S): its rows
are dropped at once meanwhile, so that a lost expert (a dead node, all replicas gone) does not cost every
later tick a call timeout.

Fair, cost-aware scheduling: a request's images are independent trajectories, so it is split into lanes of
at most `lane_images` images (see `StepEngine.pick`): small requests step every tick, large ones advance a
few lanes per tick beside them (`tick_rows`) and at full batch (`max_tick_rows`) when no small one waits. Admission checks a request's cost (images x evaluations x guidance branches) against
`max_request_rows`, and refuses at once (503) a request that the measured throughput cannot finish within its
deadline under fair sharing.
"""

from __future__ import annotations

import asyncio
import contextvars
import statistics
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import torch

from mode_ray.generation import (
    GenerationResult,
    MixtureConfig,
    Progress,
    RequestState,
    ResolvedRequest,
    prepare,
)
from mode_ray.generation.batch import BatchPlan, advance_batch, plan_batch, stack_queries
from mode_ray.generation.result import merge_results
from mode_ray.serve.config import RouterOptions
from mode_ray.serve.errors import DeadlineExceeded, ExpertCallError, GenerationFailed, Overloaded
from mode_ray.serve.metrics import RouterMetrics
from mode_ray.serve.registry import ExpertEntry, Snapshot
from mode_ray.serve.transport import ExpertClient, ExpertReply

PROBE_S = 0.5  # how often an expert whose calls failed is asked ModelReady
PROBE_FOR_S = 600.0  # after this long, stop probing and call it again (it may have been replaced)
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
    """One admitted request: its lanes (slices of its images, `RequestState.split`) step independently."""

    id: str
    lanes: list[RequestState]
    snapshot: Snapshot
    deadline: float
    future: asyncio.Future
    started: float
    on_progress: Callable[[Progress], None] | None = None
    timing: list[dict] | None = None  # per tick it took part in: the tick's TickTiming.to_dict(), when asked
    cohort: int = 0  # which of the engine's out-of-phase tick loops steps it
    reported: int = 0  # evaluations of its slowest lane already reported to on_progress
    cold_starts: dict[str, float] = field(
        default_factory=dict
    )  # expert -> longest call that waited for a replica

    @property
    def evals(self) -> int:
        return min(lane.evals for lane in self.lanes)

    @property
    def rows_left(self) -> int:
        return sum(lane.rows_left for lane in self.lanes)

    @property
    def cost(self) -> int:
        """Model rows one evaluation of the whole request takes (all its lanes, before top-k)."""
        return sum(lane.cost for lane in self.lanes)


Lane = tuple[_Active, RequestState]  # a request and one of its lanes


@dataclass
class _Call:
    """One expert call: `rows` of one batch plan (one registry version), for the requests in `parts`."""

    expert: str
    index: int  # the expert's index in the plan's snapshot
    client: ExpertClient
    group: int  # which version group's plan
    rows: torch.Tensor
    parts: set[int] = field(default_factory=set)  # indices, within the group, of the lanes it serves


class StepEngine:
    def __init__(
        self,
        config: MixtureConfig,
        options: RouterOptions,
        client_for: Callable[[ExpertEntry], ExpertClient],
    ) -> None:
        self.config, self.options = config, options
        self.client_for = client_for
        self.metrics = RouterMetrics()
        self.ticks = 0  # counters since start (benchmarks read them through Router.engine_stats)
        self.rows_sent = 0
        self.expert_busy_s: dict[str, float] = {}  # forward time the experts reported, per expert
        self.expert_rows: dict[str, int] = {}  # rows sent, per expert
        self.expert_weight: dict[str, float] = {}  # routing weight it carried (sum over rows and evaluations)
        self.expert_call_s: dict[str, deque[float]] = {}  # the last calls' send-to-reply times, per expert
        self.rows_per_s: float | None = None  # throughput of full ticks (EWMA): admission's cost estimate
        self._queue: asyncio.Queue[_Active] = asyncio.Queue()
        self._active: list[_Active] = []
        self._wake = [asyncio.Event() for _ in range(options.cohorts)]
        self._loop_tasks: list[asyncio.Task | None] = [None] * options.cohorts
        self._unavailable: dict[ExpertClient, asyncio.Task] = {}  # failed experts, each probed until ready

    # ---- admission -------------------------------------------------------------------------------
    def uses(self) -> dict[str, int]:
        """Admitted requests (active or queued) that may still call each Serve application: a drain of an
        expert version waits for its application to reach 0 on every router replica."""
        counts: dict[str, int] = {}
        for a in [*self._active, *self._queue._queue]:  # type: ignore[attr-defined]
            if not a.future.done():
                for entry in a.snapshot.entries:
                    counts[entry.application] = counts.get(entry.application, 0) + 1
        return counts

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
        state = prepare(req, self.config, snapshot.cards)
        budget = deadline_s or self.options.default_deadline_s
        self._admit_cost(state, budget)
        now = time.monotonic()
        item = _Active(
            id=uuid.uuid4().hex[:16],
            lanes=state.split(self.options.lane_images),
            snapshot=snapshot,
            deadline=now + budget,
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
        except (
            asyncio.CancelledError
        ):  # the client went away (HTTP disconnect, gRPC cancel): stop computing it
            if not item.future.done():
                self.metrics.requests.inc(tags={"outcome": "cancelled"})
                item.future.cancel()  # every tick skips done futures: it leaves at the next one
            raise

    def _admit_cost(self, state: RequestState, deadline_s: float) -> None:
        """Refuse a request larger than max_request_rows (ValueError: HTTP 400), or one that the measured
        throughput cannot finish within its deadline (Overloaded: 503 at once, not a 504 later). Under fair
        sharing a request of cost c finishes after about (c + sum_j min(c_j, c)) / throughput, where c_j is
        the work left of each admitted request."""
        cost, limit = state.rows_left, self.options.max_request_rows
        if cost > limit:
            raise ValueError(
                f"num_images x evaluations x guidance branches = {state.rows} x {state.total_evals} x "
                f"{state.branches} = {cost} model rows, above this router's max_request_rows ({limit}); ask "
                "for fewer images or steps"
            )
        rate = self.rows_per_s
        if rate is None:
            return  # nothing measured yet: admit
        ahead = [a for a in [*self._active, *self._queue._queue] if not a.future.done()]  # type: ignore[attr-defined]
        estimate = (cost + sum(min(a.rows_left, cost) for a in ahead)) / rate
        if estimate > deadline_s:
            self.metrics.requests.inc(tags={"outcome": "overloaded"})
            raise Overloaded(
                f"this request cannot finish within its deadline of {deadline_s:g} s: about {estimate:.3g} s "
                f"of work beside {len(ahead)} admitted request(s) at the measured {rate:.0f} model rows/s; "
                "retry later or allow a longer deadline_s"
            )

    def _ensure_loops(self) -> None:
        """Start the tick loops (again, if one ended). In an empty context: a task inherits the context of the
        request that starts it, and Serve cancels every call made in a request's context when that request is
        cancelled (its client hung up), which would cancel the expert calls of every later tick."""
        loop = asyncio.get_running_loop()
        for k, task in enumerate(self._loop_tasks):
            if task is None or task.done():
                self._loop_tasks[k] = loop.create_task(self._run(k), context=contextvars.Context())

    def _admit(self) -> None:
        """Move queued requests into the engine (up to max_active_requests), each into the smallest cohort."""
        while len(self._active) < self.options.max_active_requests and not self._queue.empty():
            item = self._queue.get_nowait()
            if item.future.done():  # cancelled while queued
                continue
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
            lanes = self.pick(mine)
            try:
                await self.tick(lanes)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # the loop itself is stopped
                    raise
                for a in mine:  # a call of the tick was cancelled from outside: fail its requests, tick on
                    self._fail(a, GenerationFailed("an expert call of this step was cancelled"))
            except Exception as e:  # noqa: BLE001 - a bug in one tick must fail its requests, not hang them
                for a in mine:
                    self._fail(a, GenerationFailed(f"internal error in the step engine: {e!r}"))
            self.metrics.tick_seconds.observe(time.perf_counter() - t0)
            self._active = [a for a in self._active if not a.future.done()]

    # ---- scheduling -------------------------------------------------------------------------------
    def pick(self, items: list[_Active]) -> list[Lane]:
        """The lanes the next tick evaluates. Small requests (at most tick_rows model rows per evaluation, e.g.
        a default 4-image request) all step every tick (continuous batching). Large ones share the rest
        round-robin, lane by lane, each one's least advanced lanes first: what the small ones leave of
        tick_rows while one is active, so that its ticks stay short (a tick costs a fixed part plus a part
        per row), max_tick_rows otherwise, so that large requests alone run at full batch. The starting
        request rotates every tick and the large ones get at least one lane a tick, so none starves."""
        if items:
            r = self.ticks % len(items)
            items = items[r:] + items[:r]
        o = self.options
        small = [a for a in items if a.cost <= o.tick_rows]
        large = [a for a in items if a.cost > o.tick_rows]
        picked = [(a, lane) for a in small for lane in a.lanes if not lane.done]
        used = sum(lane.cost for _, lane in picked)
        return picked + _round_robin(large, o.tick_rows - used if small else o.max_tick_rows)

    # ---- one tick ----------------------------------------------------------------------------------
    async def tick(self, lanes: list[Lane]) -> TickTiming:
        """One evaluation for every lane in `lanes`: per registry version, one gate call and one batch plan for
        all its lanes, one call per chosen expert, one combine."""
        t0 = time.perf_counter()
        now = time.monotonic()
        by_version: dict[tuple[int, int], list[Lane]] = {}  # (version, gate): one plan per snapshot kind
        for a, lane in lanes:
            if a.future.done():
                continue
            if now > a.deadline:
                why = f"request {a.id} passed its deadline after {a.evals} evaluations"
                self._fail(a, DeadlineExceeded(why))
                continue
            by_version.setdefault((a.snapshot.version, id(a.snapshot.gate)), []).append((a, lane))
        groups = list(by_version.values())
        plans, gate_s = await self._offload(_gate_and_plan, groups)
        for group, plan in zip(groups, plans, strict=True):
            for i, why in plan.failed.items():
                self._fail(group[i][0], GenerationFailed(why))
        calls = self._group(groups, plans)
        t_plan = time.perf_counter()
        results = await asyncio.gather(
            *(self._call_with_retry(c, plans[c.group], self._timeout(c, groups)) for c in calls)
        )
        t_calls = time.perf_counter()
        replies = [r for r in results if isinstance(r, ExpertReply)]
        outputs: list[dict[int, list]] = [{} for _ in groups]  # per group: expert -> [(rows, x0_hat), ...]
        failed: list[dict[int, set[int]]] = [{} for _ in groups]
        for call, result in zip(calls, results, strict=True):
            self.expert_rows[call.expert] = self.expert_rows.get(call.expert, 0) + len(call.rows)
            self.metrics.routed_rows.inc(len(call.rows), tags={"expert": call.expert})
            if isinstance(result, ExpertReply):
                self.expert_busy_s[call.expert] = self.expert_busy_s.get(call.expert, 0.0) + result.forward_s
                self.expert_call_s.setdefault(call.expert, deque(maxlen=256)).append(result.wire_s)
                outputs[call.group].setdefault(call.index, []).append((call.rows, result.x0_hat))
                if result.cold_start:  # the reply says so: this call waited for the expert's replica to start
                    for i in call.parts:
                        a = groups[call.group][i][0]
                        a.cold_starts[call.expert] = round(
                            max(a.cold_starts.get(call.expert, 0.0), result.wire_s), 3
                        )
            else:
                for i in call.parts:
                    failed[call.group].setdefault(i, set()).add(call.index)
        settled = await self._offload(_combine, groups, plans, outputs, failed)
        for g, (group, plan) in enumerate(zip(groups, plans, strict=True)):
            self._settle(group, plan, failed[g], *settled[g])
        end = time.perf_counter()
        encode, decode = sum(r.encode_s for r in replies), sum(r.decode_s for r in replies)
        timing = TickTiming(
            wall=end - t0,
            gate=gate_s,
            plan=t_plan - t0 - gate_s,
            encode=encode,
            wire=max((r.wire_s for r in replies), default=0.0),
            queue=max((r.queue_s for r in replies), default=0.0),
            expert=max((r.forward_s for r in replies), default=0.0),
            decode=decode,
            combine=end - t_calls,
            idle=max(0.0, (t_calls - t_plan) - encode - decode),
            requests=len({id(a) for g in groups for a, _ in g}),
            rows=sum(len(c.rows) for c in calls),
            calls=len(calls),
        )
        for phase in PHASES:
            self.metrics.tick_phase_seconds.observe(getattr(timing, phase), tags={"phase": phase})
        self.ticks += 1
        self.rows_sent += timing.rows
        queried = sum(s.cost for g in groups for _, s in g)
        if queried >= self.options.max_tick_rows / 2 and timing.wall > 0:  # a full tick measures throughput
            rate = queried / timing.wall
            self.rows_per_s = rate if self.rows_per_s is None else 0.8 * self.rows_per_s + 0.2 * rate
        touched = {id(a): a for g in groups for a, _ in g}.values()
        if any(a.timing is not None for a in touched):
            row = {"tick": self.ticks, **timing.to_dict()}
            for a in touched:
                if a.timing is not None:
                    a.timing.append(row)
        for a in touched:
            self._report(a)
        return timing

    def _group(self, groups: list[list[Lane]], plans: list[BatchPlan]) -> list[_Call]:
        """One call per chosen expert and version group (continuous batching), or per expert and request;
        split at max_rows_per_call."""
        calls = []
        limit = self.options.max_rows_per_call
        for g, (group, plan) in enumerate(zip(groups, plans, strict=True)):
            if not plan.rows:
                continue
            owner = plan.owner  # (R',) the lane of every evaluation row
            first: dict[int, int] = {}  # request -> its first lane in the group
            request_of = torch.tensor([first.setdefault(id(a), i) for i, (a, _) in enumerate(group)])
            for e, rows in plan.rows.items():
                entry = group[0][0].snapshot.entries[e]
                name = entry.name
                who = request_of[owner[rows]]
                chunks = (
                    [rows] if self.options.continuous_batching else [rows[who == i] for i in who.unique()]
                )
                for chunk in chunks:
                    for piece in chunk.split(limit):
                        parts = set(owner[piece].unique().tolist())
                        calls.append(_Call(name, e, self.client_for(entry), g, piece, parts))
        return calls

    def _timeout(self, call: _Call, groups: list[list[Lane]]) -> float:
        """The call's budget: the latest deadline among its requests (one near its own deadline must not cut
        the call short for the others; it fails alone at the next tick), at most call_timeout_s."""
        remaining = max(groups[call.group][i][0].deadline for i in call.parts) - time.monotonic()
        return max(0.05, min(self.options.call_timeout_s, remaining))

    def unavailable(self) -> list[str]:
        """Experts skipped now: their last call failed twice and they have not answered ModelReady since."""
        return sorted({c.name for c, probe in self._unavailable.items() if not probe.done()})

    async def _call_with_retry(self, call: _Call, plan: BatchPlan, timeout: float) -> ExpertReply | Exception:
        probe = self._unavailable.get(call.client)
        if probe is not None:
            if not probe.done():
                self.metrics.expert_calls.inc(tags={"expert": call.expert, "outcome": "skipped"})
                return ExpertCallError(
                    f"expert {call.expert!r} is unavailable: its last call failed twice and it has not "
                    "answered ModelReady since"
                )
            del self._unavailable[call.client]
        x, sigma = plan.x[call.rows], plan.sigma[call.rows]
        cond = None if plan.cond is None else plan.cond[call.rows]
        error: Exception = ExpertCallError("not called")
        for attempt in range(2):
            try:
                out = await call.client.infer(x, sigma, cond, timeout)
                if not torch.isfinite(out.x0_hat).all():  # never combined: dropped like a failed call
                    self.metrics.expert_calls.inc(tags={"expert": call.expert, "outcome": "nonfinite"})
                    return ExpertCallError(f"expert {call.expert!r} returned a non-finite x0_hat")
                self.metrics.expert_calls.inc(tags={"expert": call.expert, "outcome": "ok"})
                return out
            except ExpertCallError as e:
                # INVALID_ARGUMENT: these rows are at fault, not the expert: no retry, no probe
                if e.code == grpc.StatusCode.INVALID_ARGUMENT:
                    self.metrics.expert_calls.inc(tags={"expert": call.expert, "outcome": "invalid"})
                    return e
                error = e
                self.metrics.expert_calls.inc(
                    tags={"expert": call.expert, "outcome": "retry" if attempt == 0 else "failed"}
                )
            except (TimeoutError, OSError) as e:
                error = e
                self.metrics.expert_calls.inc(
                    tags={"expert": call.expert, "outcome": "retry" if attempt == 0 else "failed"}
                )
        if call.client not in self._unavailable:
            loop = asyncio.get_running_loop()
            self._unavailable[call.client] = loop.create_task(
                _until_ready(call.client), context=contextvars.Context()
            )
        return error

    async def _offload(self, fn: Callable, groups: list[list[Lane]], *args: object) -> Any:
        """Run the router's tensor work (gate + plan, combine + sampler steps) in a worker thread when
        `offload` is on and the tick holds more than one lane, so the event loop keeps admitting requests and
        moving other calls meanwhile; a lone lane computes inline (the thread hand-off cost it 3%)."""
        if self.options.offload and sum(len(g) for g in groups) > 1:
            return await asyncio.to_thread(fn, groups, *args)
        return fn(groups, *args)

    def _settle(
        self,
        group: list[Lane],
        plan: BatchPlan,
        failed: dict[int, set[int]],
        lost: dict[int, str],
        before: list[float],
    ) -> None:
        """After the combine: fail the requests whose lanes lost every expert, count the dropped mass."""
        for i, (a, lane) in enumerate(group):
            if i in plan.failed or a.future.done():
                continue
            if i in lost:
                if time.monotonic() >= a.deadline:  # its calls ran out of its own time budget
                    self._fail(
                        a, DeadlineExceeded(f"request {a.id} passed its deadline after {a.evals} evaluations")
                    )
                    continue
                names = sorted(a.snapshot.entries[e].name for e in failed.get(i, ()))
                self._fail(
                    a, GenerationFailed(f"request {a.id}: no chosen expert answered ({names}): {lost[i]}")
                )
                continue
            for e in failed.get(i, ()):
                share = (lane.dropped - before[i]) / len(failed[i])
                self.metrics.dropped_mass.inc(share, tags={"expert": a.snapshot.entries[e].name})
            if lane.trace:
                carried: dict[str, float] = {}
                for names, weights in zip(lane.trace[-1].experts, lane.trace[-1].weights, strict=True):
                    for name, w in zip(names, weights, strict=True):
                        carried[name] = carried.get(name, 0.0) + w
                for name, w in carried.items():
                    self.expert_weight[name] = self.expert_weight.get(name, 0.0) + w
                    if w > 0:
                        self.metrics.routing_weight.inc(w, tags={"expert": name})

    def stats(self) -> dict[str, Any]:
        """Counters since start (rates come from two readings) and each expert's recent call p50 (ms)."""
        active, queued = self.load
        return {
            "at": time.monotonic(),
            "ticks": self.ticks,
            "rows": self.rows_sent,
            "active": active,
            "queued": queued,
            "expert_rows": dict(self.expert_rows),
            "expert_weight": dict(self.expert_weight),
            "expert_call_p50_ms": {
                name: round(statistics.median(calls) * 1e3, 3)
                for name, calls in self.expert_call_s.items()
                if calls
            },
        }

    def _report(self, a: _Active) -> None:
        """Progress when the request's slowest lane moved on; the result once every lane is done."""
        if a.future.done():
            return
        slowest = min(a.lanes, key=lambda s: s.evals)
        if a.on_progress is not None and slowest.evals > a.reported:
            a.reported = slowest.evals
            a.on_progress(Progress(slowest.traj.step, slowest.traj.steps, slowest.trace[-1].sigma))
        if all(s.done for s in a.lanes):
            seconds = time.monotonic() - a.started
            self.metrics.requests.inc(tags={"outcome": "ok"})
            self.metrics.request_seconds.observe(seconds)
            version = a.snapshot.version
            latent = self.config.decoder is not None  # decoded by the router, off the tick loop
            result = merge_results([s.result(a.id, version, seconds, a.timing, latent) for s in a.lanes])
            a.future.set_result(replace(result, cold_starts=dict(a.cold_starts)))

    def _fail(self, a: _Active, error: Exception) -> None:
        if not a.future.done():
            self.metrics.requests.inc(tags={"outcome": type(error).__name__})
            a.future.set_exception(error)


def _round_robin(requests: list[_Active], budget: int) -> list[Lane]:
    """Up to `budget` model rows of lanes, one lane per request per round (each request's least advanced
    lanes first), at least one lane when there is any."""
    queues = [(a, sorted((s for s in a.lanes if not s.done), key=lambda s: s.evals)) for a in requests]
    picked: list[Lane] = []
    used = 0
    for depth in range(max((len(q) for _, q in queues), default=0)):
        took = False
        for a, lanes in queues:
            if depth < len(lanes) and (used + lanes[depth].cost <= budget or not picked):
                picked.append((a, lanes[depth]))
                used += lanes[depth].cost
                took = True
        if not took:
            break
    return picked


def _gate_and_plan(groups: list[list[Lane]]) -> tuple[list[BatchPlan], float]:
    """Per snapshot group: one gate call over every lane's rows, one batch plan. Pure tensor work (no engine
    state, no futures), so it may run in a worker thread. Returns the plans and the gate's seconds."""
    t0 = time.perf_counter()
    gated = []
    for group in groups:  # one gate call per snapshot: the gate is row-wise, stacking is exact
        q = stack_queries([s for _, s in group])
        snapshot = group[0][0].snapshot
        with torch.no_grad():
            gated.append((q, snapshot.gate(q.x, q.sigma, q.cond, snapshot.cards)))  # (R, N)
    gate_s = time.perf_counter() - t0
    plans = [plan_batch([s for _, s in g], q, logits) for g, (q, logits) in zip(groups, gated, strict=True)]
    return plans, gate_s


def _combine(
    groups: list[list[Lane]],
    plans: list[BatchPlan],
    outputs: list[dict[int, list[tuple[torch.Tensor, torch.Tensor]]]],
    failed: list[dict[int, set[int]]],
) -> list[tuple[dict[int, str], list[float]]]:
    """Per group: combine the experts' outputs and take every lane's sampler step (`advance_batch`). Pure
    tensor work on the group's lanes, which only this tick touches. Returns, per group, the lanes that lost
    every expert (index -> why) and each lane's dropped mass before the step."""
    settled = []
    for group, plan, out, fail in zip(groups, plans, outputs, failed, strict=True):
        rows = {e: torch.cat([r for r, _ in parts]) for e, parts in out.items()}
        x0 = {e: torch.cat([o for _, o in parts]) for e, parts in out.items()}
        states = [s for _, s in group]
        before = [s.dropped for s in states]
        with torch.no_grad():
            lost = advance_batch(states, plan, x0, fail, rows)
        settled.append((lost, before))
    return settled


async def _until_ready(client: ExpertClient) -> None:
    """Returns once `client` answers ModelReady (or after PROBE_FOR_S): the engine calls it again then."""
    deadline = time.monotonic() + PROBE_FOR_S
    while time.monotonic() < deadline:
        try:
            if await client.ready(timeout=5.0):
                return
        except Exception:  # noqa: BLE001 - any failure to answer is "not ready"
            pass
        await asyncio.sleep(PROBE_S)

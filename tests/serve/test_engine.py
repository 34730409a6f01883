"""The step engine in one process, with in-process expert clients: continuous batching is exact, faults
renormalise or fail clearly, deadlines and the queue bound hold. (The gRPC path is tested in test_cluster.)"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from mode_ray.generation import GenerateParams, MixtureConfig, generate_local, resolve
from mode_ray.models.checkpoint import Expert
from mode_ray.routing import Mixture, PrototypeGate
from mode_ray.serve.config import RouterOptions
from mode_ray.serve.engine import StepEngine
from mode_ray.serve.errors import DeadlineExceeded, ExpertCallError, GenerationFailed, Overloaded
from mode_ray.serve.registry import ExpertEntry, Snapshot
from mode_ray.serve.transport import ExpertReply
from tests.routing.helpers import GaussianDenoiser, card


class LocalClient:
    """Runs an expert in this process; can be told to fail its next calls or to be slow."""

    def __init__(self, expert: Expert) -> None:
        self.name, self.expert = expert.name, expert
        self.fail_next, self.nan_next, self.delay, self.calls, self.rows = 0, 0, 0.0, 0, []
        self.invalid_next = 0  # answer INVALID_ARGUMENT (the rows, not the expert, are at fault)

    async def infer(self, x, sigma, cond, timeout):  # noqa: ANN001, ANN201
        self.calls += 1
        self.rows.append(x.shape[0])
        if self.delay:
            await asyncio.wait_for(asyncio.sleep(self.delay), timeout)  # a late reply is a TimeoutError
        if self.fail_next:
            self.fail_next -= 1
            raise ExpertCallError(f"expert {self.name!r}: UNAVAILABLE: injected")
        if self.invalid_next:
            self.invalid_next -= 1
            raise ExpertCallError(
                "inputs 'x': row 0 gives a non-finite x0_hat", grpc.StatusCode.INVALID_ARGUMENT
            )
        out = self.expert.denoiser(x, sigma, cond)
        if self.nan_next:
            self.nan_next -= 1
            out = out * float("nan")
        return ExpertReply(out)

    async def ready(self, timeout: float) -> bool:
        return True


def experts() -> list[Expert]:
    protos = [
        [1.0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 1.0, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1.0, 1, 1, 1, 1, 1],
    ]
    return [
        Expert(card(f"e{i}", p), GaussianDenoiser(mean=0.2 * i - 0.2, s=0.4 + 0.1 * i))
        for i, p in enumerate(protos)
    ]


CONFIG = MixtureConfig(name="t", experts=["e0", "e1", "e2"], steps=6, sampler="heun", guidance_scale=2.0)


def setup(options: RouterOptions | None = None):  # noqa: ANN201
    ex = experts()
    clients = {e.name: LocalClient(e) for e in ex}
    gate = PrototypeGate(tau=0.5)
    engine = StepEngine(CONFIG, options or RouterOptions(), lambda entry: clients[entry.name])
    snapshot = Snapshot(
        1, tuple(ExpertEntry(name=e.name, version="1", card=e.card, state="ready") for e in ex), gate
    )
    mixture = Mixture(ex, gate, top_k=2)
    return engine, snapshot, clients, mixture


def reference(mixture: Mixture, params: GenerateParams) -> torch.Tensor:
    return generate_local(mixture, CONFIG, params).images


PARAMS = [
    GenerateParams(prompt=1, num_images=2, seed=1, sampler="heun", steps=5),
    GenerateParams(prompt="three", num_images=3, seed=2, sampler="dpmpp_2m", steps=7, top_k=1),
    GenerateParams(num_images=1, seed=3, sampler="euler", steps=4),  # unconditional, joins with the others
    GenerateParams(prompt=8, num_images=2, seed=4, guidance_scale=1.0, top_p=0.9, top_k=3),
]


def expected_calls(params: list[GenerateParams], traces: list[list], continuous: bool) -> tuple[int, int]:
    """(calls, rows) the engine must make, from the requests' traces: per evaluation a request sends each of
    its chosen experts its rows routed there (twice under guidance: both branches in one call); with
    continuous batching all requests stepping in the same tick share one call per expert."""
    rows = 0
    per_tick: dict[int, list[set[str]]] = {}
    for p, trace in zip(params, traces, strict=True):
        guided = p.prompt is not None and (p.guidance_scale if p.guidance_scale is not None else 2.0) != 1.0
        for t, step in enumerate(trace):
            chosen = {name for row in step.experts for name in row}
            rows += sum(len(row) for row in step.experts) * (2 if guided else 1)
            per_tick.setdefault(t, []).append(chosen)
    if continuous:
        return sum(len(set().union(*sets)) for sets in per_tick.values()), rows
    return sum(len(c) for sets in per_tick.values() for c in sets), rows


@pytest.mark.parametrize("continuous", [True, False])
def test_concurrent_requests_equal_the_in_process_mixture(continuous: bool) -> None:
    engine, snapshot, clients, mixture = setup(RouterOptions(continuous_batching=continuous))

    async def run():  # noqa: ANN202
        reqs = [resolve(p, CONFIG) for p in PARAMS]  # all four are admitted before the first tick
        return await asyncio.gather(*(engine.generate(r, snapshot) for r in reqs))

    results = asyncio.run(run())
    for p, r in zip(PARAMS, results, strict=True):
        torch.testing.assert_close(r.images, reference(mixture, p), rtol=0, atol=1e-6)
        assert r.dropped_mass == 0 and len(r.trace) == make_evals(p)
    calls, rows = expected_calls(PARAMS, [r.trace for r in results], continuous)
    assert sum(c.calls for c in clients.values()) == calls
    assert sum(sum(c.rows) for c in clients.values()) == rows


def make_evals(p: GenerateParams) -> int:
    """Evaluations of a request: heun takes 2 per step but 1 for the last."""
    steps = p.steps or CONFIG.steps
    return 2 * steps - 1 if (p.sampler or CONFIG.sampler) == "heun" else steps


def test_a_failing_expert_is_retried_then_dropped_and_renormalised() -> None:
    engine, snapshot, clients, _ = setup()
    clients["e0"].fail_next = 1  # one failure: the retry succeeds, nothing is dropped
    req = resolve(GenerateParams(prompt=0, num_images=2, seed=5, steps=3), CONFIG)
    r = asyncio.run(engine.generate(req, snapshot))
    assert r.dropped_mass == 0 and clients["e0"].fail_next == 0
    assert clients["e0"].calls == make_evals(GenerateParams(steps=3)) + 1  # every step once, one retry
    clients["e0"].fail_next = 2  # call and retry fail: e0 is dropped for that (first) step
    r = asyncio.run(engine.generate(req, snapshot))
    first = r.trace[0]
    assert "e0" not in first.experts[0] and first.dropped[0] > 0
    assert sum(first.weights[0]) == pytest.approx(1.0, abs=1e-5)
    assert r.dropped_mass == pytest.approx(sum(d for t in r.trace for d in t.dropped), abs=1e-5)
    assert "e0" in r.trace[-1].experts[0]  # back once it answered ModelReady


def test_an_invalid_argument_drops_the_rows_for_that_step_without_a_retry_or_a_probe() -> None:
    """INVALID_ARGUMENT says the rows are at fault (e.g. inputs the model overflows on), not the expert: the
    call is not retried, the expert is not marked unavailable, and the step renormalises over the rest."""
    engine, snapshot, clients, _ = setup()
    e0 = clients["e0"]
    probes = {"n": 0}

    async def ready(timeout: float) -> bool:
        probes["n"] += 1
        return True

    e0.ready = ready  # type: ignore[method-assign]
    e0.invalid_next = 1
    req = resolve(GenerateParams(prompt=0, num_images=1, seed=5, steps=3), CONFIG)
    r = asyncio.run(engine.generate(req, snapshot))
    assert e0.calls == make_evals(GenerateParams(steps=3))  # one call per evaluation: no retry
    assert "e0" not in r.trace[0].experts[0] and r.trace[0].dropped[0] > 0  # dropped for the first step only
    assert all("e0" in t.experts[0] for t in r.trace[1:]) and probes["n"] == 0
    assert engine.unavailable() == []


def test_a_failed_expert_is_not_called_again_until_it_answers_model_ready(monkeypatch) -> None:  # noqa: ANN001
    """After a call and its retry fail, the expert's rows are dropped at once (no call, no timeout) while it
    is not ready; once ModelReady says yes it is called again."""
    import mode_ray.serve.engine as engine_module

    monkeypatch.setattr(engine_module, "PROBE_S", 0.005)
    engine, snapshot, clients, _ = setup()
    for c in clients.values():
        c.delay = 0.005  # 79 evaluations take ~0.4 s: much longer than three probes
    e0 = clients["e0"]
    probes = {"n": 0}

    async def ready(timeout: float) -> bool:
        probes["n"] += 1
        return probes["n"] > 3  # unavailable for the first three probes (PROBE_S apart)

    e0.ready = ready  # type: ignore[method-assign]
    e0.fail_next = 2
    req = resolve(GenerateParams(prompt=0, num_images=1, seed=5, steps=40), CONFIG)
    r = asyncio.run(engine.generate(req, snapshot))
    without = [i for i, t in enumerate(r.trace) if "e0" not in t.experts[0]]
    assert without[0] == 0 and without == list(range(len(without)))  # one stretch from the failure on
    assert 1 < len(without) < len(r.trace)  # skipped while not ready, then back
    assert e0.calls == 2 + len(r.trace) - len(without)  # the failed call and its retry, then one per step
    assert probes["n"] == 4 and r.dropped_mass > 0


def test_a_request_fails_clearly_when_no_chosen_expert_answers() -> None:
    engine, snapshot, clients, _ = setup()
    for c in clients.values():
        c.fail_next = 10**6
    req = resolve(GenerateParams(prompt=0, num_images=1, seed=5, steps=3), CONFIG)
    with pytest.raises(GenerationFailed, match="no chosen expert answered"):
        asyncio.run(engine.generate(req, snapshot))


def test_deadline_and_queue_bound() -> None:
    engine, snapshot, clients, _ = setup(
        RouterOptions(max_active_requests=1, max_queued_requests=1, call_timeout_s=5)
    )
    for c in clients.values():
        c.delay = 0.2
    req = resolve(GenerateParams(prompt=0, num_images=1, seed=5, steps=20), CONFIG)

    async def run():  # noqa: ANN202
        first = asyncio.ensure_future(engine.generate(req, snapshot, deadline_s=0.5))
        second = asyncio.ensure_future(engine.generate(req, snapshot, deadline_s=0.5))
        while engine.load != (1, 1):  # one stepping, one queued: the engine is at capacity
            await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="at capacity"):
            await engine.generate(req, snapshot)
        for f in (first, second):
            with pytest.raises(DeadlineExceeded):
                await f

    asyncio.run(asyncio.wait_for(run(), timeout=30))


def test_requests_keep_the_gate_of_their_snapshot() -> None:
    """A gate published mid-flight routes only requests admitted after it (the snapshot holds the gate)."""
    engine, snapshot, clients, mixture = setup()
    other = Snapshot(2, snapshot.entries, PrototypeGate(tau=5.0))
    p = GenerateParams(prompt=1, num_images=2, seed=1, steps=5)

    async def run():  # noqa: ANN202
        return await asyncio.gather(
            engine.generate(resolve(p, CONFIG), snapshot), engine.generate(resolve(p, CONFIG), other)
        )

    old, new = asyncio.run(run())
    torch.testing.assert_close(old.images, reference(mixture, p), rtol=0, atol=1e-6)
    soft = Mixture(mixture.experts, PrototypeGate(tau=5.0), top_k=2)
    torch.testing.assert_close(new.images, generate_local(soft, CONFIG, p).images, rtol=0, atol=1e-6)
    assert (old.registry_version, new.registry_version) == (1, 2)
    assert old.trace[0].weights != new.trace[0].weights


def test_two_cohorts_tick_apart_and_give_the_same_images() -> None:
    """Requests are admitted into the smaller cohort in turn (0, 1, 0, 1); each cohort batches only its own
    rows, and a request's images do not depend on its cohort."""
    engine, snapshot, clients, mixture = setup(RouterOptions(cohorts=2))

    async def run():  # noqa: ANN202
        return await asyncio.gather(*(engine.generate(resolve(p, CONFIG), snapshot) for p in PARAMS))

    results = asyncio.run(run())
    for p, r in zip(PARAMS, results, strict=True):
        torch.testing.assert_close(r.images, reference(mixture, p), rtol=0, atol=1e-6)
    traces = [r.trace for r in results]
    calls = sum(expected_calls(PARAMS[k::2], traces[k::2], continuous=True)[0] for k in (0, 1))
    assert sum(c.calls for c in clients.values()) == calls


def test_a_non_finite_expert_output_is_dropped_never_combined() -> None:
    engine, snapshot, clients, _ = setup()
    clients["e0"].nan_next = 2  # the call and its retry answer NaN
    req = resolve(GenerateParams(prompt=0, num_images=2, seed=5, steps=3), CONFIG)
    r = asyncio.run(engine.generate(req, snapshot))
    assert torch.isfinite(r.images).all()
    assert "e0" not in r.trace[0].experts[0] and r.trace[0].dropped[0] > 0 and r.dropped_mass > 0


def test_a_request_near_its_deadline_does_not_cut_a_shared_call_short() -> None:
    """Before, a merged call's timeout was the tightest deadline in it: when the short request neared its
    deadline the call timed out and the long request lost the expert too."""
    engine, snapshot, clients, _ = setup(RouterOptions(call_timeout_s=5))
    for c in clients.values():
        c.delay = 0.15
    short = resolve(GenerateParams(prompt=0, num_images=1, seed=1, steps=6), CONFIG)
    long = resolve(GenerateParams(prompt=0, num_images=1, seed=2, steps=6), CONFIG)

    async def run():  # noqa: ANN202
        a = asyncio.ensure_future(engine.generate(short, snapshot, deadline_s=0.4))
        b = asyncio.ensure_future(engine.generate(long, snapshot, deadline_s=60))
        with pytest.raises(DeadlineExceeded):
            await a
        return await b

    done = asyncio.run(asyncio.wait_for(run(), timeout=60))
    assert done.dropped_mass == 0 and all(d == 0 for t in done.trace for d in t.dropped)


def test_a_nan_score_excludes_that_expert_not_the_row() -> None:
    engine, snapshot, clients, mixture = setup()

    class NanForLast(PrototypeGate):
        def forward(self, x, sigma, cond, experts):  # noqa: ANN001, ANN201
            logits = super().forward(x, sigma, cond, experts)
            logits[:, -1] = float("nan")
            return logits

    gate = NanForLast(tau=0.5)
    nan_snapshot = Snapshot(2, snapshot.entries, gate)
    params = GenerateParams(prompt=8, num_images=2, seed=4, steps=4)  # e2 would hold 8
    r = asyncio.run(engine.generate(resolve(params, CONFIG), nan_snapshot))
    assert all("e2" not in row for t in r.trace for row in t.experts) and torch.isfinite(r.images).all()
    assert clients["e2"].calls == 0


def test_a_cancelled_request_leaves_the_engine_at_the_next_tick() -> None:
    """A client that goes away (HTTP disconnect, gRPC cancel) cancels the awaiting coroutine: the request
    must stop computing, not run on until its deadline."""
    engine, snapshot, clients, _ = setup()
    for c in clients.values():
        c.delay = 0.02
    req = resolve(GenerateParams(prompt=0, num_images=1, seed=5, steps=200), CONFIG)

    async def run() -> int:
        task = asyncio.ensure_future(engine.generate(req, snapshot))
        while sum(c.calls for c in clients.values()) < 3:  # it is stepping
            await asyncio.sleep(0.005)
        task.cancel()
        at_cancel = sum(c.calls for c in clients.values())
        with pytest.raises(asyncio.CancelledError):
            await task
        while engine.load != (0, 0):  # removed from the engine (its last tick has finished)
            await asyncio.sleep(0.005)
        return sum(c.calls for c in clients.values()) - at_cancel

    after = asyncio.run(asyncio.wait_for(run(), timeout=30))
    assert after <= 2  # at most the tick in flight (one call per chosen expert)


def test_a_request_split_into_lanes_equals_the_in_process_mixture() -> None:
    """20 images in lanes of 8 (8 + 8 + 4), at most two lanes a tick: the same images and trace as in one
    process, every evaluation's trace holding all 20 rows in order."""
    engine, snapshot, clients, mixture = setup(RouterOptions(lane_images=8, tick_rows=8, max_tick_rows=32))
    p = GenerateParams(prompt=3, num_images=20, seed=7, steps=4)
    r = asyncio.run(engine.generate(resolve(p, CONFIG), snapshot, timing=True))
    ref = generate_local(mixture, CONFIG, p)
    torch.testing.assert_close(r.images, ref.images, rtol=0, atol=1e-6)
    assert [t.experts for t in r.trace] == [t.experts for t in ref.trace]
    assert all(len(t.weights) == 20 for t in r.trace) and r.labels == [3] * 20
    # 3 lanes x 7 evaluations, at most 2 lanes (16 rows each with guidance) a tick
    assert engine.ticks >= 11 and max(t["rows"] for t in r.timing) <= 2 * 16 * 2


def test_a_small_request_keeps_its_pace_beside_a_large_one() -> None:
    """A 1-image request takes part in every tick of its life while a 64-image request is in flight, and
    finishes first; the large one advances one lane a tick beside it and four alone (max_tick_rows 64); both
    give their in-process images."""
    engine, snapshot, clients, mixture = setup(RouterOptions(lane_images=8, tick_rows=8, max_tick_rows=64))
    big = GenerateParams(prompt=1, num_images=64, seed=1, steps=6)
    small = GenerateParams(prompt=2, num_images=1, seed=2, steps=6)

    async def run():  # noqa: ANN202
        b = asyncio.ensure_future(engine.generate(resolve(big, CONFIG), snapshot, timing=True))
        while engine.ticks < 3:  # the large request is stepping
            await asyncio.sleep(0)
        s = await engine.generate(resolve(small, CONFIG), snapshot, timing=True)
        assert not b.done()
        return s, await b

    s, b = asyncio.run(asyncio.wait_for(run(), timeout=60))
    assert len(s.timing) == len(s.trace) == make_evals(small)  # never skipped a tick
    beside = [t for t in b.timing if t["requests"] == 2]
    assert len(beside) == len(s.timing)  # the small one's ticks: one lane (16 rows) of the large one
    alone = [t for t in b.timing if t["requests"] == 1]
    assert max(t["rows"] for t in beside) <= (16 + 2) * 2 < min(t["rows"] for t in alone[:3])
    torch.testing.assert_close(s.images, reference(mixture, small), rtol=0, atol=1e-6)
    torch.testing.assert_close(b.images, reference(mixture, big), rtol=0, atol=1e-6)


def test_admission_by_cost() -> None:
    """A request above max_request_rows is refused naming its size; once throughput is measured, a request
    that cannot finish within its deadline is refused at once (503), not failed at the deadline."""
    engine, snapshot, clients, _ = setup(RouterOptions(max_request_rows=1000))
    too_big = resolve(GenerateParams(prompt=0, num_images=50, seed=1, steps=6), CONFIG)  # 50 x 11 x 2
    with pytest.raises(
        ValueError, match=r"50 x 11 x 2 = 1100 model rows, above .* max_request_rows \(1000\)"
    ):
        asyncio.run(engine.generate(too_big, snapshot))
    assert engine.rows_per_s is None
    req = resolve(GenerateParams(prompt=0, num_images=16, seed=1, steps=6), CONFIG)  # 32 rows a tick
    asyncio.run(engine.generate(req, snapshot))
    assert engine.rows_per_s is not None and engine.rows_per_s > 0
    calls = sum(c.calls for c in clients.values())
    with pytest.raises(Overloaded, match="cannot finish within its deadline of 0.0001 s"):
        asyncio.run(engine.generate(req, snapshot, deadline_s=1e-4))
    assert sum(c.calls for c in clients.values()) == calls  # refused before any expert call


@pytest.mark.parametrize("cohorts", [1, 2])
def test_offloading_the_tensor_work_to_a_thread_changes_no_bit(cohorts: int) -> None:
    """The gate, plan and combine run in a worker thread by default (the event loop keeps serving other
    cohorts' calls meanwhile); on the loop or off it, the same requests give the same bits."""
    images = {}
    for offload in (False, True):
        engine, snapshot, _, _ = setup(RouterOptions(offload=offload, cohorts=cohorts))

        async def run(engine=engine, snapshot=snapshot):  # noqa: ANN001, ANN202
            return await asyncio.gather(*(engine.generate(resolve(p, CONFIG), snapshot) for p in PARAMS))

        images[offload] = [r.images for r in asyncio.run(run())]
    for off, on in zip(images[False], images[True], strict=True):
        torch.testing.assert_close(on, off, rtol=0, atol=0)

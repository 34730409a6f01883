"""Load-aware autoscaling (mode_ray.serve.autoscaling) on real Serve: an expert kept busy by 16 concurrent
requests scales up, and back down under a trickle, and one idle expert scales to zero and wakes for the next
requests; none of the requests in flight fails or loses routing weight, and a call that waited for a replica
to start says so in the reply. The experts are emulated GPU experts (fixed latency per call) so that how busy
they are depends on the load, not on how the 2 shared cores are scheduled."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from mode_ray.serve.autoscaling import LOAD, LoadPolicy
from tests.serve.conftest import tiny_app, wait_for
from tests.serve.test_cluster import post, replica_actors
from tests.tiny import build_tiny_mixture

EMULATE = {"base_ms": 20.0, "per_row_ms": 0.5}
SCALING = {
    "emulate": EMULATE,
    "max_replicas": 2,
    "target_load": 0.5,
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 2.0,
    "look_back_period_s": 1.5,
    "metrics_interval_s": 0.25,
}


def context(replicas: int, load: list[float], requests: float = 1.0) -> AutoscalingContext:
    config = AutoscalingConfig(min_replicas=0, max_replicas=8, target_ongoing_requests=2)
    return AutoscalingContext(
        deployment_id=DeploymentID(name="Expert-a", app_name="expert-a"),
        deployment_name="Expert-a",
        app_name="expert-a",
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        running_replicas=[],
        total_num_requests=requests,
        total_queued_requests=0.0,
        aggregated_metrics={LOAD: {f"r{i}": v for i, v in enumerate(load)}},
        raw_metrics=None,
        capacity_adjusted_min_replicas=0,
        capacity_adjusted_max_replicas=8,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=config,
    )


def test_the_policy_asks_for_the_calls_replicas_hold_not_for_one_merged_call() -> None:
    policy = LoadPolicy(target_load=1.0)
    # one replica computing all the time while a second cohort's call waits behind it (load 2): Serve's
    # queue-length policy would ask for 1 replica (2 calls / target 2); two replicas serve both at once
    assert policy(context(1, [2.0], requests=2.0))[0] == pytest.approx(2.0)
    assert policy(context(2, [1.0, 1.0], requests=2.0))[0] == pytest.approx(2.0)  # stays: nothing waits
    assert policy(context(2, [0.2, 0.1], requests=1.0))[0] == pytest.approx(0.5)  # Serve rounds up: 1
    assert policy(context(1, [0.1], requests=8.0))[0] == pytest.approx(4.0)  # many direct calls queue
    assert LoadPolicy(target_load=0.5)(context(1, [1.0]))[0] == pytest.approx(2.0)  # headroom
    assert policy(context(0, [], requests=3.0))[0] == 0  # at zero Serve's cold-start path takes over
    with pytest.raises(ValueError, match="target_load"):
        LoadPolicy(target_load=0.0)


@pytest.fixture(scope="module")
def scaling(serve_cluster, tmp_path_factory):  # noqa: ANN001, ANN201
    model = build_tiny_mixture(tmp_path_factory.mktemp("scaling"))
    to_zero = {**SCALING, "max_replicas": 1, "min_replicas": 0, "downscale_to_zero_delay_s": 1.0}
    with tiny_app(serve_cluster, model, expert=SCALING, expert_overrides={"b": to_zero}):
        yield serve_cluster


def replicas(app: str) -> int:
    return len(replica_actors(app))


def run_load(url: str, body: dict, workers: int, until: threading.Event, think_s: float = 0.0) -> list:
    """`workers` clients each sending `body` again and again (pausing `think_s`) until `until` is set;
    every response."""
    responses: list = []
    lock = threading.Lock()

    def client() -> None:
        while not until.is_set():
            r = post(url, body)
            with lock:
                responses.append(r)
            until.wait(think_s)

    with ThreadPoolExecutor(workers) as pool:
        for _ in range(workers):
            pool.submit(client)
    return responses


def no_failures(responses: list) -> None:
    assert responses, "no request completed"
    bad = [r.text[:200] for r in responses if r.status_code != 200 or r.json()["dropped_mass"] != 0]
    assert bad == [], bad


@pytest.mark.serve
def test_a_busy_expert_scales_up_and_back_down_without_failing_a_request(scaling) -> None:  # noqa: ANN001
    sc = scaling
    assert replicas("expert-a") == 1
    heavy = {"prompt": 1, "num_images": 1, "seed": 0, "steps": 20, "experts": ["a"], "output": "json"}
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(run_load, sc.http_url, heavy, 16, stop)
        try:
            up = wait_for(lambda: replicas("expert-a") == 2, "expert a scaled to 2 replicas", 120)
            assert not load.done(), "the load ended early"
            stop.wait(3.0)  # the load goes on while the new replica takes calls
        finally:
            stop.set()
        heavy_responses = load.result()
    print(f"\n[autoscaling] 1 -> 2 replicas {up:.1f} s into 16 concurrent requests")
    no_failures(heavy_responses)

    light = {**heavy, "steps": 4}
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(run_load, sc.http_url, light, 1, stop, 0.3)
        try:
            down = wait_for(lambda: replicas("expert-a") == 1, "expert a back to 1 replica", 120)
            stop.wait(1.0)
        finally:
            stop.set()
        light_responses = load.result()
    print(f"[autoscaling] 2 -> 1 replica {down:.1f} s into a trickle of requests")
    no_failures(light_responses)


@pytest.mark.serve
def test_an_idle_expert_scales_to_zero_and_wakes_for_16_requests_that_say_so(scaling) -> None:  # noqa: ANN001
    sc = scaling
    wait_for(lambda: replicas("expert-b") == 0, "expert b scaled to zero", 120)
    listing = httpx.get(f"{sc.http_url}/v1/experts", timeout=30).json()
    assert next(e for e in listing["experts"] if e["name"] == "b")["state"] == "ready"  # still routable
    body = {"num_images": 1, "steps": 4, "experts": ["b"], "output": "json"}
    with ThreadPoolExecutor(16) as pool:
        responses = list(
            pool.map(lambda i: post(sc.http_url, {**body, "prompt": 4 + i % 3, "seed": i}), range(16))
        )
    no_failures(responses)
    waited = [r.json()["cold_starts"].get("b", 0.0) for r in responses]
    print(f"\n[autoscaling] scale from zero: calls waited up to {max(waited):.2f} s for b's replica")
    assert max(waited) > 0  # the first calls waited for the replica, and their replies say so
    assert replicas("expert-b") == 1
    warm = post(sc.http_url, {**body, "prompt": 5, "seed": 99})
    assert warm.status_code == 200 and warm.json()["cold_starts"] == {}

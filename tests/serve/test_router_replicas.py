"""Two router replicas with one shared registry (real Serve, loopback): a hot-add through either reaches both
within a second, concurrent admin calls cannot register or deploy an expert twice, a removal drains the
requests of both, and a replica killed under 16 requests fails none of them."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
import torch

from mode_ray.generation import GenerateParams, generate_local, load_bundle
from mode_ray.serve.config import APP_NAME
from mode_ray.serve.shared_registry import NAMESPACE, actor_name
from tests.conftest import ADMIN_TOKEN
from tests.serve.conftest import tiny_app, wait_for
from tests.serve.test_cluster import images_of, post, replica_actors
from tests.tiny import build_tiny_mixture, make_expert

pytestmark = pytest.mark.serve
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def replicas(serve_cluster, tmp_path_factory):  # noqa: ANN001, ANN201
    model = build_tiny_mixture(tmp_path_factory.mktemp("replicas"))
    with tiny_app(serve_cluster, model, num_replicas=2):
        yield serve_cluster, model


def registry_actor(model):  # noqa: ANN001, ANN201
    return ray.get_actor(actor_name(model / "state"), namespace=NAMESPACE)


def idle(actor) -> None:  # noqa: ANN001
    """Wait until both replicas report an empty engine (their heartbeats lag by up to 0.5 s)."""
    wait_for(
        lambda: [r["active"] for r in ray.get(actor.replicas.remote()).values()] == [0, 0],
        "both replicas idle",
    )


def test_two_replicas_share_one_registry(replicas) -> None:  # noqa: ANN001
    sc, model = replicas
    actor = registry_actor(model)
    assert len(replica_actors(APP_NAME, "Router")) == 2
    wait_for(lambda: len(ray.get(actor.replicas.remote())) == 2, "both replicas to report")
    listing = httpx.get(f"{sc.http_url}/v1/experts").json()
    assert sorted(e["name"] for e in listing["experts"]) == ["a", "b", "c"]
    wait_for(
        lambda: (
            {r["version"] for r in ray.get(actor.replicas.remote()).values()} == {listing["registry_version"]}
        ),
        "both replicas at the listed version",
    )


def test_a_hot_add_reaches_every_replica_within_a_second_and_deploys_once(replicas) -> None:  # noqa: ANN001
    """Two adds of the same new expert at once (Serve may send them to different replicas): exactly one
    registers and deploys it, the other is a 409; then every replica has seen the new version within 1 s
    and routes to it."""
    from ray import serve

    sc, model = replicas
    make_expert(model / "experts", "d", [9], seed=3)
    url = f"{sc.http_url}/v1/experts"
    with ThreadPoolExecutor(2) as pool:
        adds = list(
            pool.map(lambda _: httpx.post(url, json={"path": "d"}, headers=AUTH, timeout=300), range(2))
        )
    codes = sorted(r.status_code for r in adds)
    assert codes == [200, 409], [r.text for r in adds]
    version = next(r.json()["registry_version"] for r in adds if r.status_code == 200)
    actor = registry_actor(model)
    seen = wait_for(
        lambda: all(r["version"] >= version for r in ray.get(actor.replicas.remote()).values()),
        "both replicas to see it",
    )
    print(f"\n[replicas] every replica saw the hot-add {seen * 1e3:.0f} ms after the add returned")
    assert seen <= 1.0
    assert [e["name"] for e in httpx.get(url).json()["experts"]].count("d") == 1
    assert "expert-d" in serve.status().applications
    body = {"prompt": 9, "num_images": 1, "seed": 0, "steps": 3, "experts": ["d"], "output": "json"}
    with ThreadPoolExecutor(8) as pool:  # spread over both replicas by Serve
        routed = list(pool.map(lambda _: post(sc.http_url, body), range(8)))
    assert all(r.status_code == 200 and r.json()["trace"][0]["experts"] == [["d"]] for r in routed)


def test_a_removal_waits_for_the_requests_of_every_replica(replicas) -> None:  # noqa: ANN001
    """16 requests pinned to d run on both replicas; DELETE through the API drains them all (every replica
    reports none left) before d's app is deleted: none fails."""
    from ray import serve

    sc, model = replicas
    actor = registry_actor(model)
    body = {"prompt": 9, "num_images": 1, "seed": 1, "steps": 80, "experts": ["d", "c"], "output": "json"}
    idle(actor)
    with ThreadPoolExecutor(16) as pool:
        running = [pool.submit(post, sc.http_url, body) for _ in range(16)]
        wait_for(
            lambda: sum(r["active"] for r in ray.get(actor.replicas.remote()).values()) == 16,
            "all 16 requests admitted",
        )
        removed = httpx.delete(f"{sc.http_url}/v1/experts/d", headers=AUTH, timeout=300)
        results = [f.result() for f in running]
    assert removed.status_code == 200, removed.text
    assert all(r.status_code == 200 and r.json()["dropped_mass"] == 0 for r in results), [
        r.text[:200] for r in results
    ]
    assert "expert-d" not in serve.status().applications
    after = post(sc.http_url, {**body, "steps": 3})
    assert after.status_code == 400 and "d" in after.json()["detail"]


def test_a_router_replica_killed_under_16_requests_fails_none(replicas) -> None:  # noqa: ANN001
    """Kill one of the two replicas while 16 requests step: those on it run again on the other (the ingress
    retries with the same seed), every one succeeds with the images it would have had."""
    sc, model = replicas
    bundle = load_bundle(model)
    actor = registry_actor(model)
    bodies = [
        {"prompt": i % 10, "num_images": 1, "seed": 200 + i, "steps": 80, "output": "json"} for i in range(16)
    ]
    idle(actor)
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(post, sc.http_url, b) for b in bodies]
        wait_for(  # both replicas hold some: whichever is killed, some requests run again
            lambda: all(r["active"] > 0 for r in ray.get(actor.replicas.remote()).values()),
            "requests stepping on both replicas",
        )
        victim = replica_actors(APP_NAME, "Router")[0]
        ray.kill(victim, no_restart=False)
        responses = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in responses), [r.text[:200] for r in responses]
    attempts = [r.json()["attempts"] for r in responses]
    print(f"\n[replicas] attempts per request after the kill: {attempts}")
    assert max(attempts) == 2  # some ran on the killed replica and ran again
    for body, r in zip(bodies, responses, strict=True):
        params = GenerateParams(**{k: v for k, v in body.items() if k != "output"})
        expected = generate_local(bundle.mixture, bundle.config, params).images
        assert (images_of(r) - expected).abs().max() <= 1e-5
    state = json.loads((model / "state" / "registry.json").read_text())
    assert sorted(e["name"] for e in state["experts"]) == ["a", "b", "c"]


def test_replacing_an_expert_fails_no_request(replicas) -> None:  # noqa: ANN001
    """PUT /v1/experts/c with a new version while 16 requests that route to c run on both replicas: the new
    version is deployed beside the old (its own application), published, the old drained and deleted; all 16
    succeed with nothing dropped, and later requests get the new weights."""
    from ray import serve

    from mode_ray.models import load_expert
    from mode_ray.routing import Mixture

    sc, model = replicas
    actor = registry_actor(model)
    path = make_expert(model / "experts", "c-v2", [7, 8, 9], seed=33)
    card = json.loads((path / "expert.json").read_text())
    (path / "expert.json").write_text(json.dumps({**card, "name": "c", "version": "2"}))
    bodies = [
        {"prompt": 7 + i % 3, "num_images": 1, "seed": 300 + i, "steps": 60, "output": "json"}
        for i in range(16)
    ]
    url = f"{sc.http_url}/v1/experts"
    idle(actor)
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(post, sc.http_url, b) for b in bodies]
        wait_for(
            lambda: all(r["active"] > 0 for r in ray.get(actor.replicas.remote()).values()),
            "requests stepping on both replicas",
        )
        replaced = httpx.put(f"{url}/c", json={"path": "c-v2"}, headers=AUTH, timeout=300)
        responses = [f.result() for f in futures]
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["version"] == "2" and replaced.json()["replaced"] == "1"
    assert all(r.status_code == 200 and r.json()["dropped_mass"] == 0 for r in responses), [
        r.text[:200] for r in responses
    ]
    listing = {e["name"]: e["version"] for e in httpx.get(url).json()["experts"]}
    assert listing == {"a": "1", "b": "1", "c": "2"}
    apps = serve.status().applications
    assert "expert-c" not in apps and "expert-c--v2" in apps
    bundle = load_bundle(model)
    experts = [e for e in bundle.mixture.experts if e.name != "c"] + [load_expert(path)]
    new = Mixture(experts, bundle.mixture.gate, top_k=2)
    body = {"prompt": 8, "num_images": 1, "seed": 5, "steps": 4, "experts": ["c"]}
    after = post(sc.http_url, {**body, "output": "json"})
    assert after.status_code == 200, after.text
    expected = generate_local(new, bundle.config, GenerateParams(**body)).images
    assert (images_of(after) - expected).abs().max() <= 1e-5
    again = httpx.put(f"{url}/c", json={"path": "c-v2"}, headers=AUTH, timeout=60)
    assert again.status_code == 409 and "version '2' already" in again.json()["detail"]
    wrong = httpx.put(f"{url}/b", json={"path": "c-v2"}, headers=AUTH, timeout=60)
    assert wrong.status_code == 400 and "names expert 'c', not 'b'" in wrong.json()["detail"]


@pytest.fixture(autouse=True)
def one_thread():  # noqa: ANN201
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

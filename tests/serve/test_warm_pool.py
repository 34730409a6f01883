"""The warm pool (real Serve, loopback): a hot-add loads into an idle replica that was started before it, the
pool refills, a restarted replica of that application loads the same expert from the registry, a failed load
gives the warm application back (deleted, refilled), and an add with its own deployment starts its own."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
import torch

from mode_ray.generation import GenerateParams, generate_local, load_bundle
from mode_ray.serve.config import APP_NAME
from mode_ray.serve.registry import ExpertEntry
from mode_ray.serve.shared_registry import RegistryActor
from tests.conftest import ADMIN_TOKEN
from tests.serve.conftest import tiny_app, wait_for
from tests.serve.test_cluster import images_of, post, replica_actors
from tests.tiny import build_tiny_mixture, make_expert

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# ---- the registry actor's bookkeeping (a plain object here: its methods are what Ray calls) -------------
def _entry(name: str) -> ExpertEntry:
    from tests.serve.test_registry import entry

    return entry(name, "deploying")


def test_replicas_share_the_refill_and_a_dead_replicas_share_is_planned_again(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    actor = RegistryActor(str(tmp_path))
    actor.heartbeat("r1", 0, {})
    actor.heartbeat("r2", 0, {})
    assert actor.plan_pool("r1", 2, ["p1", "p2"]) == ["p1", "p2"]
    assert actor.plan_pool("r2", 2, ["q1", "q2"]) == []  # r1 is deploying both
    actor.slot_ready("p1")
    actor.slot_failed("p2")
    assert actor.read()[0].pool == ["p1"]
    assert actor.plan_pool("r2", 2, ["q1", "q2"]) == ["q1"]
    # r2 dies before q1 is ready: r1 plans it again (a new name)
    import mode_ray.serve.shared_registry as shared

    monkeypatch.setattr(shared, "STALE_S", 0.0)
    assert actor.plan_pool("r1", 2, ["p3", "p4"]) == ["p3"]


def test_an_add_takes_a_free_warm_application_in_the_same_write(tmp_path) -> None:  # noqa: ANN001
    actor = RegistryActor(str(tmp_path))
    actor.heartbeat("r1", 0, {})
    actor.plan_pool("r1", 1, ["p1"])
    version = actor.slot_ready("p1").version
    data = actor.add_warm(_entry("d"))
    assert data.version == version + 1 and data.pool == []
    assert [(e.name, e.app) for e in data.experts] == [("d", "p1")]
    cold = actor.add_warm(_entry("e"))  # the pool is empty: registered without a warm application
    assert next(e for e in cold.experts if e.name == "e").app is None
    with pytest.raises(FileExistsError):
        actor.add_warm(_entry("d"))
    on_disk = json.loads((tmp_path / "registry.json").read_text())
    assert on_disk["pool"] == [] and {e["name"]: e["app"] for e in on_disk["experts"]} == {
        "d": "p1",
        "e": None,
    }


def test_prune_forgets_stopped_slots_and_returns_extras_and_orphans(tmp_path) -> None:  # noqa: ANN001
    actor = RegistryActor(str(tmp_path))
    actor.heartbeat("r1", 0, {})
    actor.plan_pool("r1", 3, ["p1", "p2", "p3"])
    for app in ("p1", "p2", "p3"):
        actor.slot_ready(app)
    actor.add_warm(_entry("d"))  # takes p1
    # p2 stopped (a cluster restart), p3 and p4 run, p4 unknown (an orphan), d's p1 runs
    data, doomed = actor.prune_pool(["p1", "p3", "p4"], target=1)
    assert data.pool == ["p3"] and doomed == ["p4"]
    data, doomed = actor.prune_pool(["p1", "p3"], target=0)
    assert data.pool == [] and doomed == ["p3"]


# ---- on a running cluster -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def warm(serve_cluster, tmp_path_factory):  # noqa: ANN001, ANN201
    model = build_tiny_mixture(tmp_path_factory.mktemp("warm"))
    with tiny_app(serve_cluster, model, warm_pool=1):
        yield serve_cluster, model


def listing(sc) -> dict:  # noqa: ANN001
    return httpx.get(f"{sc.http_url}/v1/experts", timeout=30).json()


def free_slot(sc) -> str:  # noqa: ANN001
    """The one free warm application, once the pool holds one."""
    wait_for(lambda: len(listing(sc)["warm_pool"]["free"]) == 1, "a free warm application", 180)
    return listing(sc)["warm_pool"]["free"][0]


def pinned_images_match(sc, model, name: str, seed: int) -> None:  # noqa: ANN001
    """A request pinned to `name` gives the images the in-process mixture with that expert gives."""
    bundle = load_bundle(model, experts=[model / "experts" / name])
    body = {"prompt": 9, "num_images": 2, "seed": seed, "steps": 3, "experts": [name]}
    r = post(sc.http_url, {**body, "output": "json"})
    assert r.status_code == 200, r.text
    assert r.json()["trace"][0]["experts"] == [[name], [name]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replica (its CPU share): the same reduction order in every conv
    try:
        expected = generate_local(bundle.mixture, bundle.config, GenerateParams(**body)).images
    finally:
        torch.set_num_threads(threads)
    assert (images_of(r) - expected).abs().max() <= 1e-5


@pytest.mark.serve
def test_a_hot_add_loads_into_the_replica_started_before_it_and_the_pool_refills(warm) -> None:  # noqa: ANN001
    from ray import serve

    sc, model = warm
    slot = free_slot(sc)
    before = [a._actor_id.hex() for a in replica_actors(slot)]
    assert len(before) == 1
    added = httpx.post(f"{sc.http_url}/v1/experts", json={"path": "d"}, headers=AUTH, timeout=300)
    assert added.status_code == 200, added.text
    d = next(e for e in listing(sc)["experts"] if e["name"] == "d")
    assert d["state"] == "ready" and d["application"] == slot
    # the same replica process serves it: nothing was started for the add
    assert [a._actor_id.hex() for a in replica_actors(slot)] == before
    assert "expert-d" not in serve.status().applications
    state = json.loads((model / "state" / "registry.json").read_text())
    assert {e["name"]: e["app"] for e in state["experts"]}["d"] == slot
    pinned_images_match(sc, model, "d", seed=11)
    wait_for(
        lambda: (free := listing(sc)["warm_pool"]["free"]) != [] and free != [slot], "the pool to refill", 180
    )


@pytest.mark.serve
def test_a_hot_add_under_16_requests_fails_none(warm) -> None:  # noqa: ANN001
    """16 requests step while an expert is hot-added into the warm replica: every one succeeds with nothing
    dropped (they keep the expert set they were admitted with), and the new expert is routed after."""
    from tests.serve.test_router_replicas import registry_actor

    sc, model = warm
    free_slot(sc)
    make_expert(model / "experts", "f", [3], seed=9)
    bodies = [
        {"prompt": i % 10, "num_images": 1, "seed": 400 + i, "steps": 40, "output": "json"} for i in range(16)
    ]
    actor = registry_actor(model)
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(post, sc.http_url, b) for b in bodies]
        wait_for(
            lambda: sum(r["active"] for r in ray.get(actor.replicas.remote()).values()) == 16,
            "all 16 requests admitted",
        )
        added = httpx.post(f"{sc.http_url}/v1/experts", json={"path": "f"}, headers=AUTH, timeout=300)
        responses = [f.result() for f in futures]
    assert added.status_code == 200, added.text
    bad = [r.text[:200] for r in responses if r.status_code != 200 or r.json()["dropped_mass"] != 0]
    assert bad == [], bad
    pinned_images_match(sc, model, "f", seed=14)


@pytest.mark.serve
def test_a_restarted_replica_of_a_warm_application_loads_its_expert_from_the_registry(warm) -> None:  # noqa: ANN001
    sc, model = warm
    d = next(e for e in listing(sc)["experts"] if e["name"] == "d")
    (victim,) = replica_actors(d["application"])
    old = victim._actor_id.hex()
    ray.kill(victim, no_restart=True)  # Serve starts a new replica, which starts empty

    def replaced() -> bool:
        ids = [a._actor_id.hex() for a in replica_actors(d["application"])]
        return ids != [] and old not in ids

    wait_for(replaced, "Serve to start a new replica", 120)
    from ray import serve

    wait_for(
        lambda: serve.status().applications[d["application"]].status.value == "RUNNING",
        "the application RUNNING again",
        120,
    )
    pinned_images_match(sc, model, "d", seed=12)


@pytest.mark.serve
def test_a_failed_load_gives_the_warm_application_back_and_the_pool_refills(warm) -> None:  # noqa: ANN001
    """An expert whose weights are all NaN passes the file checks, loads, and fails its canary pass: a 400
    naming it, nothing registered, the warm application it took deleted, another one started."""
    from ray import serve

    sc, model = warm
    slot = free_slot(sc)
    make_expert(model / "experts", "nan", [5], seed=7, scale=float("nan"))
    added = httpx.post(f"{sc.http_url}/v1/experts", json={"path": "nan"}, headers=AUTH, timeout=300)
    assert added.status_code == 400, added.text
    detail = added.json()["detail"]  # the replica says so itself (INTERNAL: ordinary inputs, broken model)
    assert "'nan' failed its canary call" in detail and "non-finite x0_hat for ordinary inputs" in detail
    assert "nan" not in [e["name"] for e in listing(sc)["experts"]]
    wait_for(lambda: slot not in serve.status().applications, "the tainted warm application deleted")
    wait_for(
        lambda: (free := listing(sc)["warm_pool"]["free"]) != [] and free != [slot], "the pool to refill", 180
    )


@pytest.mark.serve
def test_an_add_with_its_own_deployment_starts_its_own_application(warm) -> None:  # noqa: ANN001
    sc, model = warm
    slot = free_slot(sc)
    make_expert(model / "experts", "e", [2], seed=8)
    body = {"path": "e", "deployment": {"num_cpus": 0.1, "max_replicas": 1, "max_batch_size": 8}}
    added = httpx.post(f"{sc.http_url}/v1/experts", json=body, headers=AUTH, timeout=300)
    assert added.status_code == 200, added.text
    e = next(x for x in listing(sc)["experts"] if x["name"] == "e")
    assert e["application"] == "expert-e"
    assert listing(sc)["warm_pool"]["free"] == [slot]  # untouched


@pytest.mark.serve
def test_a_router_restart_deploys_a_lost_warm_application_again_and_it_loads_its_expert(warm) -> None:  # noqa: ANN001
    """The application holding d is gone (a node lost, an operator's mistake) when the router restarts: the
    restore deploys it again as a warm application, which loads d from the registry; d routes as before."""
    from ray import serve

    sc, model = warm
    d = next(e for e in listing(sc)["experts"] if e["name"] == "d")
    serve.delete(d["application"])
    (router,) = replica_actors(APP_NAME, "Router")
    ray.kill(router, no_restart=False)
    wait_for(
        lambda: (
            (app := serve.status().applications.get(d["application"])) is not None
            and app.status.value == "RUNNING"
        ),
        "d's warm application deployed again",
        180,
    )
    wait_for(
        lambda: httpx.get(f"{sc.http_url}/v1/experts", timeout=30).status_code == 200, "the router back", 180
    )
    pinned_images_match(sc, model, "d", seed=13)

"""The expert registry: versions, snapshots, atomic persistence, and a clear error for a corrupt file."""

from __future__ import annotations

import json

import pytest

from mode_ray.serve.registry import REGISTRY_FILE, ExpertEntry, Registry
from tests.routing.helpers import card


def entry(name: str, state: str = "ready") -> ExpertEntry:
    return ExpertEntry(name=name, version="1", card=card(name), path=f"/experts/{name}", state=state)


def test_every_change_bumps_the_version_and_survives_a_restart(tmp_path) -> None:  # noqa: ANN001
    reg = Registry(tmp_path)
    assert reg.version == 0 and reg.entries() == [] and reg.gate is None
    assert reg.upsert(entry("a")) == 1
    assert reg.upsert(entry("b", "deploying")) == 2
    assert reg.set_gate(str(tmp_path / "gates" / "1")) == 3
    snap = reg.snapshot("the-gate")
    assert snap.version == 3 and snap.names == ["a"] and snap.gate == "the-gate"  # b is not ready yet
    assert reg.set_state("b", "ready") == 4
    assert reg.remove("a") == 5

    again = Registry(tmp_path)  # a router restart reads the same file
    assert again.version == 5 and [e.name for e in again.entries()] == ["b"]
    assert again.get("b") == reg.get("b") and again.get("b").state == "ready"
    assert again.gate == str(tmp_path / "gates" / "1")
    assert not list(tmp_path.glob(".registry-*"))  # no temp file left behind by the atomic writes


def test_snapshots_are_immune_to_later_changes(tmp_path) -> None:  # noqa: ANN001
    reg = Registry(tmp_path)
    reg.upsert(entry("a"))
    snap = reg.snapshot()
    reg.upsert(entry("b"))
    reg.remove("a")
    assert snap.names == ["a"] and reg.snapshot().names == ["b"]


@pytest.mark.parametrize(
    "content",
    ["{not json", json.dumps({"version": "x"}), json.dumps({"version": 1, "experts": [{"name": 1}]})],
)
def test_a_corrupt_registry_file_is_a_clear_error_and_is_left_alone(tmp_path, content: str) -> None:  # noqa: ANN001
    (tmp_path / REGISTRY_FILE).write_text(content)
    with pytest.raises(
        RuntimeError, match=r"is corrupt .* start with --fresh \(restore: false\) to set it aside"
    ):
        Registry(tmp_path)
    assert (tmp_path / REGISTRY_FILE).read_text() == content
    fresh = Registry(tmp_path, set_aside_corrupt=True)  # --fresh: kept for inspection, start empty
    assert fresh.entries() == [] and fresh.version == 0
    assert fresh.set_aside is not None and fresh.set_aside.read_text() == content
    assert not (tmp_path / REGISTRY_FILE).exists()


def test_no_two_experts_share_a_serve_application(tmp_path) -> None:  # noqa: ANN001
    """Deleting one expert deletes its Serve application: were another expert on it, the registry would go on
    routing to replicas that are gone. The shared registry refuses any add or upsert that would do that."""
    from mode_ray.serve.shared_registry import RegistryActor

    actor = RegistryActor(str(tmp_path))
    actor.add(entry("a"))  # on expert-a
    with pytest.raises(FileExistsError, match="Serve application 'expert-a', which serves expert 'a'"):
        actor.add(entry("b").model_copy(update={"app": "expert-a"}))
    actor.add(entry("b"))
    with pytest.raises(FileExistsError, match="which serves expert 'a'"):  # a replacement version of b
        actor.upsert(entry("b").model_copy(update={"version": "2", "app": "expert-a"}))
    actor.registry.set_pool(["expert-pool-1"])
    with pytest.raises(FileExistsError, match="'expert-pool-1' is a warm-pool slot"):
        actor.add(entry("c").model_copy(update={"app": "expert-pool-1"}))
    actor.add_warm(entry("c"))  # takes the free slot, as a hot-add does
    assert actor.registry.get("c").app == "expert-pool-1" and actor.registry.pool == []
    external = entry("e").model_copy(update={"endpoint": "10.0.0.1:8001", "app": "expert-a"})
    actor.add(external)  # served elsewhere: no Serve application of its own
    assert [e.name for e in actor.registry.entries()] == ["a", "b", "c", "e"]

"""One registry for every router replica: a detached Ray actor owns the `Registry` (persisted atomically to the
state directory, so it also survives the actor), and each router replica keeps a local copy that it refreshes
by long-polling the actor (a change reaches every replica within `POLL_S`).

    actor = RegistryActor (one per state directory, named, detached, 0 CPUs)
      read / wait_newer(version)          -> RegistryFile
      add (atomic: refuses a name that exists), upsert, set_state, remove, set_gate -> RegistryFile
      heartbeat(replica, seen_version, uses)    every replica, every poll
      drained(name, version)              every live replica has seen `version` and uses `name` no more
      claim_startup / finish_startup      one replica at a time restores or seeds the registry
      plan_pool / slot_ready / slot_failed / prune_pool
                                          the warm pool: which replica deploys which warm application

Writes go through the actor one at a time, so two admin calls on two replicas cannot corrupt the registry or
register (and deploy) one expert twice. A request keeps the snapshot (registry version, experts, gate) it was
admitted with on its replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from mode_ray.serve.registry import ExpertEntry, Registry, RegistryFile, Snapshot, State

POLL_S = 0.5  # the longest a replica waits for news in one poll (a change wakes it at once)
STALE_S = 5.0  # a replica silent for this long is taken for dead (its uses no longer hold a drain)
NAMESPACE = "mode_ray"


class RegistryActor:
    """The Ray actor body (threaded: long polls wait on a condition while writes go on)."""

    def __init__(self, state_dir: str, set_aside_corrupt: bool = False) -> None:
        self._cond = threading.Condition()
        self.error: str | None = None
        self.set_aside: str | None = None
        try:
            self.registry = Registry(Path(state_dir), set_aside_corrupt=set_aside_corrupt)
            self.set_aside = None if self.registry.set_aside is None else str(self.registry.set_aside)
        except RuntimeError as e:  # a corrupt file: reported to every router replica that asks
            self.error = str(e)
        self._replicas: dict[
            str, tuple[float, int, dict[str, int], int]
        ] = {}  # id -> (at, version, uses, active)
        self._stats: dict[str, dict] = {}  # id -> its engine's recent rates (`mode-ray status`)
        self._startup: tuple[str, bool] | None = None  # (replica, finished)
        self._fresh_done = False
        self._changing: dict[str, str] = {}  # expert name -> the replica replacing it
        self._starting: dict[str, str] = {}  # warm application being deployed -> the replica deploying it

    def _data(self) -> RegistryFile:
        if self.error is not None:
            raise RuntimeError(self.error)
        return self.registry._data

    def read(self) -> tuple[RegistryFile, str | None]:
        """The registry, and the path a corrupt file was set aside to (None if it was not)."""
        return self._data(), self.set_aside

    def wait_newer(self, version: int, timeout: float) -> RegistryFile:
        """The registry once its version is above `version`, or as it is after `timeout` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: self._data().version > version, timeout=timeout)
            return self._data()

    def _write(self, fn: Any, *args: Any) -> RegistryFile:
        with self._cond:
            self._data()
            fn(*args)
            self._cond.notify_all()
            return self._data()

    def add(self, entry: ExpertEntry) -> RegistryFile:
        """Register a new expert; FileExistsError if the name is taken (checked and written atomically)."""
        with self._cond:
            if self.registry.get(entry.name) is not None:
                raise FileExistsError(f"an expert named {entry.name!r} is already registered")
            self._check_application(entry)
            return self._write(self.registry.upsert, entry)

    def add_warm(self, entry: ExpertEntry) -> RegistryFile:
        """`add`, into a free warm application when the pool has one (the entry's `app` names it)."""
        with self._cond:
            if self.registry.get(entry.name) is not None:
                raise FileExistsError(f"an expert named {entry.name!r} is already registered")
            if not self._data().pool:
                self._check_application(entry)
            if self.registry.assign(entry) is None:
                self.registry.upsert(entry)
            self._cond.notify_all()
            return self._data()

    def upsert(self, entry: ExpertEntry) -> RegistryFile:
        with self._cond:
            self._check_application(entry)
            return self._write(self.registry.upsert, entry)

    def _check_application(self, entry: ExpertEntry) -> None:
        """FileExistsError when the Serve application `entry` would be served by already serves another
        expert, or is a warm-pool slot: two registry entries on one application would mean that deleting one
        deletes the other's replicas while the registry still routes to it."""
        if entry.endpoint != "serve":
            return
        app = entry.application
        for other in self.registry.entries():
            if other.name != entry.name and other.endpoint == "serve" and other.application == app:
                raise FileExistsError(
                    f"expert {entry.name!r} would be served by Serve application {app!r}, which serves "
                    f"expert {other.name!r}; give the new expert another name"
                )
        if app in self._data().pool or app in self._starting:
            raise FileExistsError(
                f"Serve application {app!r} is a warm-pool slot; give the expert another name"
            )

    def set_state(self, name: str, state: State) -> RegistryFile:
        return self._write(self.registry.set_state, name, state)

    def remove(self, name: str) -> RegistryFile:
        return self._write(self.registry.remove, name)

    def set_gate(self, path: str | None) -> RegistryFile:
        return self._write(self.registry.set_gate, path)

    # ---- replicas ----------------------------------------------------------------------------------
    def _live(self) -> dict[str, tuple[float, int, dict[str, int], int]]:
        now = time.monotonic()
        return {r: v for r, v in self._replicas.items() if now - v[0] < STALE_S}

    def heartbeat(
        self, replica: str, version: int, uses: dict[str, int], active: int = 0, stats: dict | None = None
    ) -> None:
        """`replica` has seen registry `version`; `uses`: its admitted requests that may route to each
        draining expert; `active`: its requests in the engine (active + queued); `stats`: its recent rates."""
        with self._cond:
            self._replicas[replica] = (time.monotonic(), version, dict(uses), active)
            if stats is not None:
                self._stats[replica] = stats

    def stats(self) -> dict[str, dict]:
        """The recent rates of every live replica's engine."""
        with self._cond:
            live = self._live()
            return {r: st for r, st in self._stats.items() if r in live}

    def replicas(self) -> dict[str, dict[str, int]]:
        """Live replicas: the registry version each has seen and its requests in the engine."""
        with self._cond:
            return {r: {"version": v, "active": n} for r, (_, v, _, n) in self._live().items()}

    def drained(self, name: str, version: int) -> bool:
        """True once every live replica has seen `version` (where `name` is draining) and reports no
        admitted request that may use `name`."""
        with self._cond:
            live = self._live().values()
            return all(v >= version and uses.get(name, 0) == 0 for _, v, uses, _ in live)

    def begin_change(self, name: str, replica: str) -> None:
        """Reserve `name` for a replace by `replica`; FileExistsError while a live replica is changing it."""
        with self._cond:
            holder = self._changing.get(name)
            if holder is not None and holder != replica and holder in self._live():
                raise FileExistsError(f"expert {name!r} is being replaced already; retry when that is done")
            self._changing[name] = replica

    def end_change(self, name: str, replica: str) -> None:
        with self._cond:
            if self._changing.get(name) == replica:
                del self._changing[name]

    def claim_startup(self, replica: str) -> bool:
        """True when `replica` may restore the registry now: no other live replica is restoring it. Every
        replica restores once at start (re-deploying what is missing; RUNNING apps are left alone), one at a
        time, so replicas starting together never deploy one app twice."""
        with self._cond:
            busy = self._startup is not None and not self._startup[1] and self._startup[0] != replica
            if busy and self._startup[0] in self._live():
                return False
            self._startup = (replica, False)
            self._replicas[replica] = (time.monotonic(), self._data().version, {}, 0)
            return True

    def finish_startup(self, replica: str) -> None:
        with self._cond:
            if self._startup is not None and self._startup[0] == replica:
                self._startup = (replica, True)

    # ---- the warm pool -----------------------------------------------------------------------------
    def plan_pool(self, replica: str, target: int, new_names: list[str]) -> list[str]:
        """The warm applications `replica` should deploy now: enough of `new_names` to bring free plus starting
        ones up to `target`. A dead replica's unfinished ones are forgotten (and deployed again)."""
        with self._cond:
            live = self._live()
            self._starting = {a: r for a, r in self._starting.items() if r in live or r == replica}
            missing = target - len(self._data().pool) - len(self._starting)
            apps = new_names[: max(0, missing)]
            self._starting.update(dict.fromkeys(apps, replica))
            return apps

    def slot_ready(self, app: str) -> RegistryFile:
        """A warm application is RUNNING: it joins the pool."""
        with self._cond:
            self._starting.pop(app, None)
            return self._write(self.registry.set_pool, [*self._data().pool, app])

    def slot_failed(self, app: str) -> None:
        with self._cond:
            self._starting.pop(app, None)

    def prune_pool(self, running: list[str], target: int) -> tuple[RegistryFile, list[str]]:
        """Given the warm applications RUNNING on Serve: drop free ones that are not (a cluster restart) and
        free ones beyond `target`; returns the registry and the applications to delete: those beyond `target`
        and the orphans, RUNNING ones nobody knows of (a replica died between deploying and `slot_ready`)."""
        with self._cond:
            data = self._data()
            known = set(self._starting) | {e.app for e in data.experts if e.app}
            alive = [a for a in data.pool if a in running]
            keep = alive[: max(0, target)]
            if keep != data.pool:
                self._write(self.registry.set_pool, keep)
            doomed = [a for a in running if a not in known and a not in keep]
            return self._data(), doomed

    def fresh_once(self) -> bool:
        """True the first time only: a fresh start (restore: false) forgets hot-added experts once, not again
        each time a router replica restarts or is added."""
        with self._cond:
            first, self._fresh_done = not self._fresh_done, True
            return first


def actor_name(state_dir: Path) -> str:
    """One registry actor per state directory (tests and several apps on one Ray cluster stay apart)."""
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:16]
    return f"mode-ray-registry-{digest}"


class RegistryClient:
    """A router replica's view of the shared registry: reads are served from a local copy (no remote call on
    the request path), writes go to the actor and update the copy with the result."""

    def __init__(self, actor: Any, data: RegistryFile, set_aside: str | None) -> None:
        self.actor = actor
        self.replica = uuid.uuid4().hex[:12]
        self._data = data
        self.set_aside = set_aside

    @classmethod
    async def connect(cls, state_dir: Path, set_aside_corrupt: bool) -> RegistryClient:
        """Get or create the registry actor of `state_dir` (detached, on this node when it can be); a
        RuntimeError naming the problem when the registry file is corrupt."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        actor = (
            ray.remote(RegistryActor)
            .options(
                name=actor_name(state_dir),
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=-1,  # restarted (reloading registry.json) if its process or node dies
                num_cpus=0,
                max_concurrency=64,
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
            )
            .remote(str(state_dir), set_aside_corrupt)
        )
        try:
            data, set_aside = await actor.read.remote()
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            raise RuntimeError(str(cause) if cause else str(e)) from None
        return cls(actor, data, set_aside)

    # ---- reads (local) -------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._data.version

    @property
    def gate(self) -> str | None:
        return self._data.gate

    @property
    def pool(self) -> list[str]:
        return list(self._data.pool)

    def entries(self) -> list[ExpertEntry]:
        return [e.model_copy() for e in self._data.experts]

    def get(self, name: str) -> ExpertEntry | None:
        return next((e.model_copy() for e in self._data.experts if e.name == name), None)

    def snapshot(self, gate: Any = None) -> Snapshot:
        return Snapshot(self._data.version, tuple(e for e in self._data.experts if e.state == "ready"), gate)

    def accept(self, data: RegistryFile) -> bool:
        """Take a newer registry (from a write or a poll); True if it was newer."""
        if data.version <= self._data.version:
            return False
        self._data = data
        return True

    # ---- writes (through the actor) ------------------------------------------------------------------
    async def _write(self, method: str, *args: Any) -> int:
        self.accept(await getattr(self.actor, method).remote(*args))
        return self._data.version

    async def add(self, entry: ExpertEntry, warm: bool = False) -> ExpertEntry:
        """Register a new expert (into a free warm application when `warm` and the pool has one); the entry
        as registered."""
        await self._write("add_warm" if warm else "add", entry)
        registered = self.get(entry.name)
        assert registered is not None
        return registered

    async def upsert(self, entry: ExpertEntry) -> int:
        return await self._write("upsert", entry)

    async def set_state(self, name: str, state: State) -> int:
        return await self._write("set_state", name, state)

    async def remove(self, name: str) -> int:
        return await self._write("remove", name)

    async def set_gate(self, path: str | None) -> int:
        return await self._write("set_gate", path)

    # ---- replicas ----------------------------------------------------------------------------------
    async def poll(self, uses: dict[str, int], active: int, stats: dict | None = None) -> RegistryFile:
        """Report this replica's state, then wait (up to POLL_S) for a newer registry than the local one."""
        await self.actor.heartbeat.remote(self.replica, self._data.version, uses, active, stats)
        return await self.actor.wait_newer.remote(self._data.version, POLL_S)

    async def wait_drained(self, name: str, version: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not await self.actor.drained.remote(name, version):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

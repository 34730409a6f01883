"""The router deployment: holds the registry and the gate, runs the step engine, deploys and drains experts,
publishes (extended) learned gates. File I/O (registry writes, expert and gate files) runs in worker threads,
never on the event loop that ticks the engine.

Experts are always deployed by the router (at start from the registry or the model directory, and on
hot-add), so start-up, hot-add and restore after a restart are one mechanism.
"""

from __future__ import annotations

import asyncio
import logging
import re
import statistics
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mode_ray.generation import GenerateParams, GenerationResult, Progress, resolve
from mode_ray.generation.bundle import GATE_CARD, build_gate, check_condition, check_gate, load_config
from mode_ray.generation.params import ResolvedRequest
from mode_ray.generation.result import TraceMode
from mode_ray.models.card import ExpertCard
from mode_ray.models.checkpoint import (
    CARD_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    check_expert,
    check_files,
    load_card,
)
from mode_ray.models.decoder import load_decoder
from mode_ray.models.strict import NoBooleanNumbers
from mode_ray.models.text import shared_encoder
from mode_ray.routing.gates import Gate
from mode_ray.serve.config import (
    AppArgs,
    ExpertDeployment,
    check_servable_name,
    expert_app_name,
    expert_deployment_of,
    is_warm_app,
)
from mode_ray.serve.direct import NODE, unpublish_app
from mode_ray.serve.engine import StepEngine
from mode_ray.serve.errors import AddCancelled, ExpertCallError
from mode_ray.serve.registry import ExpertEntry, Snapshot
from mode_ray.serve.shared_registry import RegistryClient, actor_name
from mode_ray.serve.transport import ExpertClient, client_for

log = logging.getLogger("ray.serve")


# host:port: a DNS name or IPv4 address (dot-separated labels of letters, digits, '-', '_') or [an IPv6 address]
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
ENDPOINT = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]{{2,45}}\]):[0-9]{{1,5}}")


class AddExpert(NoBooleanNumbers):
    """Body of `POST /v1/experts`: an expert directory under the expert root, optionally served elsewhere."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="expert directory (expert.json + model.safetensors) under the expert root")
    endpoint: str = Field(
        "serve", description="'serve' to deploy it on this cluster, or host:port of an OIP server"
    )
    deployment: ExpertDeployment | None = Field(
        None, description="resources/autoscaling (default: the app's)"
    )

    @field_validator("endpoint")
    @classmethod
    def _host_port(cls, v: str) -> str:
        if v == "serve" or ENDPOINT.fullmatch(v) and 1 <= int(v.rsplit(":", 1)[1]) <= 65535:
            return v
        raise ValueError(
            "endpoint must be 'serve' or host:port of an OIP gRPC server (a hostname, an IPv4 address or "
            "[an IPv6 address], and a port in 1-65535)"
        )


class PublishGate(BaseModel):
    """Body of `PUT /v1/gate`: a learned gate directory (gate.json + model.safetensors), e.g. one written by
    `mode-ray train gate --extend`, under the model directory or the expert root."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="learned gate directory; relative paths are under the model directory")


class Router:
    """Serve deployment class (options come from the builder, never from a decorator)."""

    async def __init__(self, args: dict, decoder: Any = None) -> None:
        """`decoder`: the handle of the app's Decoder deployment, when a latent mixture's decoder runs there."""
        self.args = AppArgs.model_validate(args)
        self.config = load_config(self.args.model_dir)
        self.registry = await RegistryClient.connect(
            self.args.state_dir, set_aside_corrupt=not self.args.restore
        )
        if self.registry.set_aside is not None:
            log.warning("corrupt registry set aside as %s; starting from the model", self.registry.set_aside)
        self._gate_path = self.registry.gate
        self.gate: Gate = await asyncio.to_thread(self._build_gate, self._gate_path)
        self._decoder_handle = decoder  # a latent mixture's decoder in its own deployment, or None
        self.decoder = (  # ... or run here, in a worker thread, once per image at the end
            await asyncio.to_thread(load_decoder, self.args.model_dir / self.config.decoder)
            if self.config.decoder is not None and decoder is None
            else None
        )
        if self.config.condition == "text":  # load the text encoder now: a missing extra fails the deploy
            await asyncio.to_thread(shared_encoder, self.config.text_tokens, self.config.text_precision)
        self._clients: dict[str, ExpertClient] = {}
        self._adding: dict[str, tuple[asyncio.Task, threading.Event]] = {}  # hot-adds in progress
        self._history: deque[dict] = deque()  # engine readings of the last ~5 s (`_rates`)
        self.engine = StepEngine(self.config, self.args.router, self._client)
        self._lock = asyncio.Lock()
        self._pool_wake = asyncio.Event()  # a hot-add took a warm application: refill now
        loop = asyncio.get_running_loop()
        self._sync_task = loop.create_task(self._sync())  # heartbeats (startup claims need them) and news
        self._started = loop.create_task(self._start())
        await asyncio.shield(self._started)  # the app is RUNNING only once every expert answers ModelReady
        self._pool_task = loop.create_task(self._keep_pool())
        self._replicas_task = loop.create_task(self._count_replicas())

    def _build_gate(self, published: str | None) -> Gate:
        return build_gate(self.config.gate, self.args.model_dir, Path(published) if published else None)

    async def _sync(self) -> None:
        """Follow the shared registry: report this replica's version and the expert applications its admitted
        requests may still call (drains wait on them), and take any newer registry (a hot-add, remove or gate
        published through another replica)."""
        while True:
            try:
                data = await self.registry.poll(self.engine.uses(), sum(self.engine.load), self._rates())
                if data.version > self.registry.version:
                    async with self._lock:
                        await self._take(data)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the registry actor restarting: try again shortly
                log.warning("registry sync failed (%r); retrying", e)
                await asyncio.sleep(0.5)

    async def _take(self, data: Any) -> None:
        """Take a newer registry, building its gate first when it changed, so that a snapshot never pairs a
        version with another version's gate; forget the clients no request can call any more."""
        if data.gate != self._gate_path:
            gate = await asyncio.to_thread(self._build_gate, data.gate)
            if self.registry.accept(data):
                self.gate, self._gate_path = gate, data.gate
        else:
            self.registry.accept(data)
        keep = {_client_key(e) for e in self.registry.entries()} | set(self.engine.uses())
        for key in list(self._clients):  # forget the clients of versions no request can call any more
            if key not in keep:
                self._clients.pop(key, None)

    def _rates(self) -> dict:
        """This replica's engine over the last ~5 s (from readings at each poll): what `status` sums."""
        now = self.engine.stats()
        self._history.append(now)
        while len(self._history) > 2 and now["at"] - self._history[0]["at"] > 5.0:
            self._history.popleft()
        old = self._history[0]
        dt = max(now["at"] - old["at"], 1e-6)

        def per_s(key: str) -> dict[str, float]:
            return {k: round((v - old[key].get(k, 0)) / dt, 3) for k, v in now[key].items()}

        return {
            "active": now["active"],
            "queued": now["queued"],
            "ticks_per_s": round((now["ticks"] - old["ticks"]) / dt, 2),
            "rows_per_s": round((now["rows"] - old["rows"]) / dt, 2),
            "expert_rows_per_s": per_s("expert_rows"),
            "expert_weight_per_s": per_s("expert_weight"),
            "expert_call_p50_ms": now["expert_call_p50_ms"],
        }

    async def status(self) -> dict:
        """The cluster at a glance (`GET /v1/status`, `mode-ray status`): every expert with its replicas,
        rows/s and share of the routing weight over the last ~5 s, summed over the router replicas, and the
        median send-to-reply time of its recent calls; the router replicas' load."""
        from mode_ray.serve.deploy import serve_status

        per_replica = list((await self.registry.actor.stats.remote()).values())
        apps = (await asyncio.to_thread(serve_status)).applications

        def total(key: str, name: str) -> float:
            return sum(r.get(key, {}).get(name, 0.0) for r in per_replica)

        weight = sum(sum(r.get("expert_weight_per_s", {}).values()) for r in per_replica)
        experts = []
        for e in self.registry.entries():
            p50s = [
                r["expert_call_p50_ms"][e.name]
                for r in per_replica
                if e.name in r.get("expert_call_p50_ms", {})
            ]
            experts.append(
                {
                    "name": e.name,
                    "version": e.version,
                    "state": e.state,
                    "application": e.application if e.endpoint == "serve" else None,
                    "replicas": _running_replicas(apps, e.application) if e.endpoint == "serve" else None,
                    "rows_per_s": round(total("expert_rows_per_s", e.name), 2),
                    "routed_share": round(total("expert_weight_per_s", e.name) / weight, 4)
                    if weight
                    else 0.0,
                    "call_p50_ms": round(statistics.median(p50s), 3) if p50s else None,
                }
            )
        return {
            "registry_version": self.registry.version,
            "router": {
                "replicas": len(per_replica),
                "active": sum(r.get("active", 0) for r in per_replica),
                "queued": sum(r.get("queued", 0) for r in per_replica),
                "ticks_per_s": round(sum(r.get("ticks_per_s", 0.0) for r in per_replica), 2),
                "rows_per_s": round(sum(r.get("rows_per_s", 0.0) for r in per_replica), 2),
            },
            "experts": experts,
            "warm_pool": {"target": self.args.warm_pool, "free": self.registry.pool},
        }

    def snapshot(self) -> Snapshot:
        """What a request admitted now routes with: the ready experts and the live gate."""
        return self.registry.snapshot(self.gate)

    # ---- experts ------------------------------------------------------------------------------------
    def _client(self, entry: ExpertEntry) -> ExpertClient:
        """The client of one expert version (cached by its Serve application: this is on the engine's per-tick
        path, and during a replace the old and the new version are called side by side)."""
        key = _client_key(entry)
        client = self._clients.get(key)
        if client is None:
            o = self.args.router
            client = client_for(
                entry.name, entry.endpoint, self.args.grpc_target, o.transport, o.fp16_wire, entry.application
            )
            self._clients[key] = client
        return client

    async def _start(self) -> None:
        """Restore the shared registry (re-deploying missing expert apps, leaving RUNNING ones alone) or seed
        it from the model directory; router replicas starting together take turns."""
        actor, me = self.registry.actor, self.registry.replica
        deadline = time.monotonic() + 600
        while not await actor.claim_startup.remote(me):  # another replica is restoring: wait for it
            if time.monotonic() > deadline:
                raise TimeoutError("another router replica kept restoring the registry for 600 s")
            await asyncio.sleep(0.5)
        try:
            self.registry.accept((await actor.read.remote())[0])
            if not self.args.restore and await actor.fresh_once.remote():
                # start from the model directory: forget (and undeploy) hot-added experts
                if self.registry.gate is not None:
                    await self.registry.set_gate(None)
                for e in self.registry.entries():
                    if e.name in self.config.experts:
                        await self.registry.remove(e.name)
                    else:
                        await self._teardown(e)
            if not self.registry.entries():
                for name in self.config.experts:
                    path = self.args.model_dir / "experts" / name
                    card = await asyncio.to_thread(load_card, path)
                    entry = ExpertEntry(name=name, version=card.version, card=card, path=str(path))
                    await self.registry.upsert(entry)
            ready = [e for e in self.registry.entries() if e.state != "draining"]
            await asyncio.gather(*(self._bring_up(e) for e in ready))
            for e in self.registry.entries():
                if e.state == "draining":  # a drain interrupted by a restart: finish it
                    await self._teardown(e)
            await self._take_gate()
            await self._prune_pool()
        finally:
            await actor.finish_startup.remote(me)

    # ---- the warm pool (mode_ray.serve.warm_pool) ------------------------------------------------------
    async def _prune_pool(self) -> None:
        """At start: forget free warm applications Serve no longer runs, and delete the ones beyond
        `warm_pool` and the orphans (deployed by a replica that died before it could add them to the pool)."""
        from mode_ray.serve.deploy import serve_status

        apps = (await asyncio.to_thread(serve_status)).applications
        running = [a for a, st in apps.items() if is_warm_app(a) and st.status.value == "RUNNING"]
        data, orphans = await self.registry.actor.prune_pool.remote(running, self.args.warm_pool)
        self.registry.accept(data)
        for app in orphans:
            log.info("deleting warm application %s (beyond warm_pool, or an orphan)", app)
            await self._delete_app(app)

    async def _keep_pool(self) -> None:
        """Keep `warm_pool` free warm applications: deploy what the registry actor plans for this replica
        (replicas share the work; a dead replica's unfinished ones are planned again), every 2 s or at once
        after a hot-add took one."""
        from mode_ray.serve.warm_pool import deploy_warm, new_warm_names

        actor, me, target = self.registry.actor, self.registry.replica, self.args.warm_pool
        while target > 0:
            try:
                for app in await actor.plan_pool.remote(me, target, new_warm_names(target)):
                    started = time.monotonic()
                    try:
                        await asyncio.to_thread(
                            deploy_warm,
                            app,
                            actor_name(self.args.state_dir),
                            self._with_transport(self.args.expert),
                        )
                    except Exception as e:  # noqa: BLE001 - e.g. no resources for it now: try again later
                        await actor.slot_failed.remote(app)
                        log.warning("warm application %s failed to deploy (%s); retrying in 10 s", app, e)
                        await asyncio.sleep(10)
                        continue
                    self.registry.accept(await actor.slot_ready.remote(app))
                    log.info("warm application %s ready in %.1fs", app, time.monotonic() - started)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the registry actor restarting
                log.warning("warm pool upkeep failed (%r); retrying", e)
            self._pool_wake.clear()
            try:
                await asyncio.wait_for(self._pool_wake.wait(), 2.0)
            except TimeoutError:
                pass

    async def _count_replicas(self) -> None:
        """Every 5 s: the RUNNING replicas of each expert as a gauge (mode_ray_expert_replicas), from Serve."""
        from mode_ray.serve.deploy import serve_status

        while True:
            try:
                apps = (await asyncio.to_thread(serve_status)).applications
                for e in self.registry.entries():
                    if e.endpoint == "serve":
                        self.engine.metrics.expert_replicas.set(
                            _running_replicas(apps, e.application), tags={"expert": e.name}
                        )
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the controller busy or restarting: next time
                log.debug("replica count failed: %r", e)
            await asyncio.sleep(5.0)

    async def _load_warm(self, entry: ExpertEntry) -> None:
        """Ask a warm application to load the expert its registry entry assigns it; a ValueError (HTTP 400)
        naming the problem when the load fails."""
        from ray import serve

        app = entry.application
        handle = serve.get_deployment_handle(expert_deployment_of(app, entry.name), app)
        try:
            loaded = await handle.load.remote()
        except Exception as e:  # noqa: BLE001 - the replica's own error, through Ray
            detail = str(getattr(e, "cause", None) or e).strip().splitlines()
            raise ValueError(
                f"path: expert {entry.name!r} failed to load in warm application {app!r}: "
                f"{detail[-1] if detail else type(e).__name__}"
            ) from None
        if loaded is None:
            raise RuntimeError(f"warm application {app!r} found no registry entry naming it")

    async def _take_gate(self) -> None:
        if self.registry.gate != self._gate_path:
            self.gate = await asyncio.to_thread(self._build_gate, self.registry.gate)
            self._gate_path = self.registry.gate

    async def _bring_up(
        self,
        entry: ExpertEntry,
        deployment: ExpertDeployment | None = None,
        canary: bool = False,
        cancelled: threading.Event | None = None,
    ) -> None:
        """Deploy (if served here), wait for ModelReady, optionally prove it with a canary pass, then publish
        it as ready (a new registry version). `cancelled` (set by a DELETE) stops it with AddCancelled."""

        def check() -> None:
            if cancelled is not None and cancelled.is_set():
                raise AddCancelled(f"the add of expert {entry.name!r} was cancelled by a DELETE")

        if entry.endpoint == "serve":
            if entry.path is None:
                raise CheckpointError(f"expert {entry.name!r} has no path to deploy from")
            config = deployment or self.args.deployment_for(entry.name)
            await asyncio.to_thread(self._deploy, Path(entry.path), config, entry.application, cancelled)
            if is_warm_app(entry.application):
                await self._load_warm(entry)
        client = self._client(entry)
        deadline = time.monotonic() + 180
        while not await client.ready(timeout=5):
            check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"expert {entry.name!r} did not report ModelReady within 180 s")
            await asyncio.sleep(0.5)
        if canary:
            await _canary_expert(client, entry.card)
        check()
        current = self.registry.get(entry.name)
        if current is None or current.state != "ready":  # a restore of a ready expert changes nothing
            await self.registry.set_state(entry.name, "ready")
        log.info("expert %s ready (registry version %d)", entry.name, self.registry.version)

    def _deploy(
        self, path: Path, deployment: ExpertDeployment, app: str, cancelled: threading.Event | None = None
    ) -> None:
        """Deploy as Serve application `app` unless it is already RUNNING (a router restart must not restart
        healthy experts); a warm application is deployed as one again (its replicas load the expert)."""
        from mode_ray.serve.deploy import deploy_expert, serve_status
        from mode_ray.serve.warm_pool import deploy_warm

        deployment = self._with_transport(deployment)
        status = serve_status().applications.get(app)
        if status is not None and status.status.value == "RUNNING":
            return
        if is_warm_app(app):
            deploy_warm(app, actor_name(self.args.state_dir), deployment)
            return
        default = app == expert_app_name(load_card(path).name)
        deploy_expert(path, deployment, cancelled=cancelled, app=None if default else app)

    def _with_transport(self, deployment: ExpertDeployment) -> ExpertDeployment:
        """The deployment as this router's transport needs it: with 'direct', replicas publish their own OIP
        port on the host the deployment names, else the app's default expert deployment's, else the node's IP."""
        if self.args.router.transport == "direct" and deployment.direct_host is None:
            host = self.args.expert.direct_host or NODE  # e.g. loopback, which `mode-ray serve` sets alone
            return deployment.model_copy(update={"direct_host": host})
        return deployment

    @staticmethod
    async def _delete_app(entry: ExpertEntry | str) -> None:
        """Delete the Serve application of `entry` (nothing for an external endpoint), or the one named."""
        if isinstance(entry, ExpertEntry) and entry.endpoint != "serve":
            return
        from ray import serve

        from mode_ray.serve.deploy import SERVE_API_LOCK

        app = entry.application if isinstance(entry, ExpertEntry) else entry

        def delete() -> None:
            with SERVE_API_LOCK:
                if app in serve.status().applications:
                    serve.delete(app)
            unpublish_app(app)  # addresses of replicas that died without a goodbye

        await asyncio.to_thread(delete)

    async def _teardown(self, entry: ExpertEntry) -> None:
        await self._delete_app(entry)
        if is_warm_app(entry.application):
            self._pool_wake.set()
        if (
            current := self.registry.get(entry.name)
        ) is not None and current.application == entry.application:
            await self.registry.remove(entry.name)
        self._clients.pop(_client_key(entry), None)

    async def ready(self) -> bool:
        await asyncio.shield(self._started)
        return True

    async def list_experts(self) -> dict:
        return {
            "registry_version": self.registry.version,
            "gate": self.registry.gate or self._model_gate,
            "experts": [
                {
                    "name": e.name,
                    "version": e.version,
                    "endpoint": e.endpoint,
                    "state": e.state,
                    "application": e.application if e.endpoint == "serve" else None,
                    "card": e.card.model_dump(mode="json"),
                }
                for e in self.registry.entries()
            ],
            "warm_pool": {"target": self.args.warm_pool, "free": self.registry.pool},
        }

    def _resolve_path(self, raw: str, roots: dict[str, Path] | None = None) -> Path:
        """`raw` (relative to the first root) resolved; a ValueError unless it lies under one of `roots`
        (by name: the expert root by default)."""
        roots = roots or {"the expert root": self._expert_root}
        resolved = {what: r.resolve() for what, r in roots.items()}
        try:
            path = Path(raw)
            path = (path if path.is_absolute() else next(iter(resolved.values())) / path).resolve()
            path.exists()  # e.g. a component longer than the file system allows
        except (OSError, ValueError) as e:
            raise ValueError(
                f"path {raw[:80]!r} is not a usable path: {getattr(e, 'strerror', None) or e}"
            ) from None
        if not any(path.is_relative_to(r) for r in resolved.values()):
            where = " or ".join(f"{what} {str(r)!r}" for what, r in resolved.items())
            raise ValueError(f"path {raw!r} is outside {where}")
        return path

    @property
    def _model_gate(self) -> str | None:
        learned = self.config.gate.learned
        return None if learned is None else str((self.args.model_dir / learned).resolve())

    @property
    def _expert_root(self) -> Path:
        return Path(self.args.expert_root or self.args.model_dir / "experts")

    async def add_expert(self, body: dict) -> dict:
        """Validate, deploy, wait for ModelReady, then publish a new registry version."""
        await asyncio.shield(self._started)
        request = AddExpert.model_validate(body)
        limit = self.args.router.max_rows_per_call
        if request.deployment is not None and request.deployment.max_call_rows < limit:
            raise ValueError(
                f"deployment.max_call_rows ({request.deployment.max_call_rows}) must be >= the router's "
                f"max_rows_per_call ({limit})"
            )
        path = await asyncio.to_thread(self._resolve_path, request.path)  # no file I/O on the event loop
        if (
            request.endpoint == "serve"
        ):  # files, card and safetensors header; the model is built in the replica
            card = await asyncio.to_thread(check_expert, path, self._expert_root)
        else:
            await asyncio.to_thread(check_files, path, (CARD_FILE,), self._expert_root)
            card = await asyncio.to_thread(load_card, path)
        if request.endpoint == "serve":
            check_servable_name(card.name)
        ready = self.registry.snapshot()
        try:
            check_condition(self.config, card)
            if ready.entries:
                ready.entries[0].card.compatible_with(card)
        except ValueError as e:
            raise ValueError(f"path: {e}") from None
        entry = ExpertEntry(
            name=card.name, version=card.version, card=card, path=str(path), endpoint=request.endpoint
        )
        # a default deployment takes a free warm application when there is one (mode_ray.serve.warm_pool)
        warm = (
            request.endpoint == "serve"
            and request.deployment is None
            and card.name not in self.args.expert_overrides
        )
        # atomic across router replicas: FileExistsError if the name is taken
        entry = await self.registry.add(entry, warm=warm)
        if is_warm_app(entry.application):
            self._pool_wake.set()
        cancelled = threading.Event()
        task = asyncio.ensure_future(self._bring_up(entry, request.deployment, True, cancelled))
        self._adding[card.name] = (task, cancelled)
        try:
            await task
        except BaseException:
            await self._teardown(entry)
            raise
        finally:
            self._adding.pop(card.name, None)
        return {"name": card.name, "registry_version": self.registry.version, "state": "ready"}

    async def remove_expert(self, name: str, drain_timeout_s: float = 300.0) -> dict:
        """Stop routing new requests to `name`, wait for requests that may use it, then delete its app."""
        await asyncio.shield(self._started)
        adding = self._adding.get(name)
        if adding is not None:  # DELETE during an add: cancel the add, which rolls itself back
            task, cancelled = adding
            cancelled.set()
            await asyncio.wait({task}, timeout=drain_timeout_s)
            return {
                "name": name,
                "registry_version": self.registry.version,
                "state": "removed",
                "add": "cancelled",
            }
        async with self._lock:
            entry = self.registry.get(name)
            if entry is None:
                raise KeyError(
                    f"no expert named {name!r}; registered: {[e.name for e in self.registry.entries()]}"
                )
            if entry.state == "draining":  # a second DELETE while the first drains it
                raise FileExistsError(f"expert {name!r} is being removed already (draining)")
            if entry.state == "ready" and len(self.registry.snapshot().entries) == 1:
                raise FileExistsError(f"{name!r} is the last ready expert; add another before removing it")
            version = await self.registry.set_state(name, "draining")
        # every router replica stops admitting requests to it at `version`; wait for their admitted ones
        if not await self.registry.wait_drained(entry.application, version, drain_timeout_s):
            log.warning("expert %s still in use after %.0f s of draining; deleting it", name, drain_timeout_s)
        await self._teardown(entry)
        return {"name": name, "registry_version": self.registry.version, "state": "removed"}

    async def replace_expert(self, name: str, body: dict, drain_timeout_s: float = 300.0) -> dict:
        """Replace `name` by a new version with zero failed requests: deploy the new version as its own Serve
        application beside the old one, prove it (ModelReady, canary), publish it (a new registry version:
        requests admitted from then on route to it), wait until no router replica has an admitted request
        that may call the old version, then delete the old application."""
        await asyncio.shield(self._started)
        request = AddExpert.model_validate(body)
        if request.endpoint != "serve":
            raise ValueError("endpoint: a replace deploys the new version here; use 'serve'")
        old = self.registry.get(name)
        if old is None:
            raise KeyError(
                f"no expert named {name!r}; registered: {[e.name for e in self.registry.entries()]}"
            )
        if old.state != "ready":
            raise FileExistsError(f"expert {name!r} is {old.state}; only a ready expert can be replaced")
        path = await asyncio.to_thread(self._resolve_path, request.path)
        card = await asyncio.to_thread(check_expert, path, self._expert_root)
        if card.name != name:
            raise ValueError(f"path: the card names expert {card.name!r}, not {name!r}")
        if card.version == old.version:
            raise FileExistsError(
                f"expert {name!r} is version {old.version!r} already; bump the card's version"
            )
        try:
            check_condition(self.config, card)
            old.card.compatible_with(card)
        except ValueError as e:
            raise ValueError(f"path: {e}") from None
        app = replacement_app(name, card.version)
        taken = [e.name for e in self.registry.entries() if e.name != name and e.application == app]
        if taken:  # an expert registered before names were checked (check_servable_name) holds it
            raise FileExistsError(
                f"the new version's Serve application {app!r} serves expert {taken[0]!r}; give the card "
                "another version"
            )
        actor, me = self.registry.actor, self.registry.replica
        await actor.begin_change.remote(name, me)
        new = ExpertEntry(
            name=name,
            version=card.version,
            card=card,
            path=str(path),
            state="ready",
            app=app,
        )
        try:
            config = request.deployment or self.args.deployment_for(name)
            started = time.monotonic()
            await asyncio.to_thread(self._deploy, path, config, new.application)
            try:
                client = self._client(new)
                while not await client.ready(timeout=5):
                    if time.monotonic() - started > 180:
                        raise TimeoutError(
                            f"expert {name!r} v{card.version} did not report ModelReady within 180 s"
                        )
                    await asyncio.sleep(0.5)
                await _canary_expert(client, card)
            except BaseException:
                await self._delete_app(new)
                raise
            version = await self.registry.upsert(new)  # the switch: later requests route to the new version
        finally:
            await actor.end_change.remote(name, me)
        if not await self.registry.wait_drained(old.application, version, drain_timeout_s):
            log.warning(
                "expert %s v%s still in use after %.0f s; deleting it", name, old.version, drain_timeout_s
            )
        await self._delete_app(old)
        self._clients.pop(_client_key(old), None)
        log.info(
            "expert %s replaced: v%s -> v%s (registry version %d)", name, old.version, card.version, version
        )
        return {"name": name, "version": card.version, "replaced": old.version, "registry_version": version}

    # ---- the learned gate -------------------------------------------------------------------------------
    async def publish_gate(self, body: dict) -> dict:
        """Load a learned gate directory, check it against the mixture (channels, condition, a canary pass
        that must give finite log-probabilities), then route new requests with it: a new registry version,
        no redeploy. Requests in flight keep the gate they were admitted with."""
        await asyncio.shield(self._started)
        request = PublishGate.model_validate(body)
        roots = {"the model directory": self.args.model_dir, "the expert root": self._expert_root}
        path = await asyncio.to_thread(self._resolve_path, request.path, roots)
        await asyncio.to_thread(check_files, path, (GATE_CARD, WEIGHTS_FILE), path)
        gate = await asyncio.to_thread(build_gate, self.config.gate, self.args.model_dir, path)
        ready = self.registry.snapshot()
        try:
            check_gate(gate, ready.cards)
            await asyncio.to_thread(_canary, gate, ready)
        except ValueError as e:
            raise ValueError(f"path: {e}") from None
        async with self._lock:
            self.gate, self._gate_path = gate, str(path)
            version = await self.registry.set_gate(str(path))
        log.info("learned gate %s published (registry version %d)", path, version)
        return {"gate": str(path), "registry_version": version}

    # ---- generation -----------------------------------------------------------------------------------
    async def _decoded(self, result: GenerationResult) -> GenerationResult:
        """A latent mixture's result with its images decoded, once per image: by the Decoder deployment, or
        here in a worker thread."""
        if self._decoder_handle is not None:
            images = await self._decoder_handle.decode.remote(result.raw_latents())
            return result.with_decoded(torch.from_numpy(images))
        if self.decoder is None:
            return result
        return await asyncio.to_thread(result.decoded, self.decoder)

    async def _resolve(self, params: dict) -> ResolvedRequest:
        """The request resolved and its prompt encoded; a text prompt's encoder (a few ms of BERT) runs in a
        worker thread, once per request, never on the event loop that ticks every request."""
        validated = GenerateParams.model_validate(params)
        if self.config.condition == "text":
            return await asyncio.to_thread(resolve, validated, self.config)
        return resolve(validated, self.config)

    async def generate(
        self,
        params: dict,
        deadline_s: float | None = None,
        timing: bool = False,
        trace: TraceMode = "auto",
    ) -> GenerationResult:
        """The result with its trace as `trace` asks (`GenerationResult.with_trace`), cut here so that a long
        trace never crosses to the ingress in full."""
        await asyncio.shield(self._started)
        req = await self._resolve(params)
        result = await self._decoded(
            await self.engine.generate(req, self.snapshot(), deadline_s, timing=timing)
        )
        return result.with_trace(trace)

    async def generate_stream(
        self, params: dict, deadline_s: float | None = None, trace: TraceMode = "auto"
    ) -> AsyncIterator[Progress | GenerationResult]:
        """Yields Progress after every evaluation of the slowest lane, then the GenerationResult."""
        await asyncio.shield(self._started)
        req = await self._resolve(params)
        queue: asyncio.Queue[Progress] = asyncio.Queue()
        task = asyncio.ensure_future(self.engine.generate(req, self.snapshot(), deadline_s, queue.put_nowait))
        try:
            while not task.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            yield (await self._decoded(task.result())).with_trace(trace)
        finally:  # the caller left (a client hung up, the stream was cancelled): drop the request
            if not task.done():
                task.cancel()

    async def engine_stats(self) -> dict:
        """Counters of the step engine since start: ticks, rows sent to experts, each expert's reported forward
        time (benchmarks derive ticks/s, rows/s and busy fractions from two readings)."""
        e = self.engine
        active, queued = e.load
        return {
            "ticks": e.ticks,
            "rows": e.rows_sent,
            "expert_busy_s": dict(e.expert_busy_s),
            "active": active,
            "queued": queued,
            "rows_per_s": e.rows_per_s,
            "unavailable": e.unavailable(),
            "at": time.monotonic(),
        }

    async def transport_stats(self) -> dict[str, dict]:
        """Per expert application: the transport's calls each way and, for 'direct', the replica addresses
        it calls (what the transport tests and benchmarks check)."""
        out: dict[str, dict] = {}
        for client in self._clients.values():
            app = getattr(client, "app", None) or client.name
            out[app] = {
                "transport": type(client).__name__,
                "calls": dict(getattr(client, "calls", {})),
                "addresses": client.addresses() if hasattr(client, "addresses") else [],
                "rows_sent": dict(getattr(client, "rows_sent", {})),
            }
        return out

    async def check_health(self) -> None:
        if self._started.done() and self._started.exception() is not None:
            raise RuntimeError(f"router start-up failed: {self._started.exception()!r}")


def _probe(card: ExpertCard) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Canary inputs: seeded noise at sigma 0.01 / 1 / 80 (x: (3, C, H, W)), with no condition and with
    one-hot ones ((3, D); a text condition's token rows, if any, hold one-hot tokens too: (3, 1 + L, D))."""
    sigma = torch.tensor([0.01, 1.0, 80.0])
    x = (
        torch.randn(3, *card.latent_shape, generator=torch.Generator().manual_seed(0))
        * sigma[:, None, None, None]
    )
    dim, shape = card.condition.dim, card.condition.shape
    if dim == 0:
        return x, sigma, [None]
    cond = torch.eye(dim)[torch.arange(3) % dim]  # (3, D)
    if len(shape) == 2:
        cond = cond[:, None].expand(3, shape[0], dim).contiguous()  # (3, 1 + L, D)
    return x, sigma, [None, cond]


@torch.no_grad()
def _canary(gate: Gate, snapshot: Snapshot) -> None:
    """A ValueError unless `gate` gives finite logits for noise at a few sigmas, with and without a condition."""
    x, sigma, conds = _probe(snapshot.entries[0].card)
    for cond in conds:
        logits = gate(x, sigma, cond, snapshot.cards)
        if not torch.isfinite(logits).any(dim=1).all() or torch.isnan(logits).any():
            raise ValueError("the gate gives NaN or no finite logit on a canary batch; not published")


async def _canary_expert(client: ExpertClient, card: ExpertCard) -> None:
    """Prove a new expert before it is routed: probe rows at low, middle and high noise, with and without a
    condition, must come back with the input's shape and finite. A ValueError (HTTP 400) naming what failed."""
    x, sigma, conds = _probe(card)
    for cond in conds:
        try:
            out = (await client.infer(x, sigma, cond, 60.0)).x0_hat
        except ExpertCallError as e:
            raise ValueError(f"path: expert {card.name!r} failed its canary call: {e}") from None
        if tuple(out.shape) != tuple(x.shape) or not torch.isfinite(out).all():
            bad = "non-finite" if tuple(out.shape) == tuple(x.shape) else f"shape {list(out.shape)}"
            which = "without" if cond is None else "with"
            raise ValueError(
                f"path: expert {card.name!r} answered its canary pass ({which} a condition, sigma 0.01 / 1 / 80) "
                f"with {bad} x0_hat; it is not routed"
            )


def _running_replicas(apps: dict[str, Any], app: str) -> int:
    """RUNNING replicas of Serve application `app` in a `serve.status().applications` (0 when it is gone)."""
    status = apps.get(app)
    if status is None:
        return 0
    return sum(
        n
        for d in status.deployments.values()
        for state, n in d.replica_states.items()
        if getattr(state, "value", state) == "RUNNING"
    )


def _client_key(entry: ExpertEntry) -> str:
    return entry.application if entry.endpoint == "serve" else f"{entry.name}@{entry.endpoint}"


def replacement_app(name: str, version: str) -> str:
    """The Serve application of a replacement version: expert-<name>--v<version> (sanitised)."""
    safe = re.sub(r"[^a-zA-Z0-9._-]", "-", version)[:40]
    return f"{expert_app_name(name)}--v{safe}"

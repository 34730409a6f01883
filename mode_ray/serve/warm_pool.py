"""The warm pool: idle expert replicas, started ahead of time, that take a hot-added expert in about a second.

Starting an expert replica (a Ray worker process, torch, the model code) takes seconds to tens of seconds;
loading a small expert's safetensors into a running one takes milliseconds. So the router keeps `warm_pool`
Serve applications `expert-pool-<id>` deployed with the default expert deployment (resources, autoscaling,
batching) and no expert. A hot-add whose deployment is the default takes a free one in the same registry
write that registers the expert (the entry's `app` names it), asks it to `load`, proves it with the canary
pass and publishes it; the pool refills in the background.

The shared registry stays the one source of truth: a warm replica loads the expert whose registry entry names
its application, so a replica that Serve restarts or adds (autoscaling) loads the same expert before it takes
a call, and a restore after a cluster restart deploys the application again as a warm one that loads it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from ray import serve

from mode_ray.serve.config import WARM_PREFIX, ExpertDeployment
from mode_ray.serve.deploy import bound_application, run_application
from mode_ray.serve.expert_server import ExpertServer
from mode_ray.serve.shared_registry import NAMESPACE

logger = logging.getLogger("ray.serve")


def new_warm_names(n: int) -> list[str]:
    return [f"{WARM_PREFIX}{uuid.uuid4().hex[:8]}" for _ in range(n)]


class WarmExpertServer(ExpertServer):
    """An expert replica that starts empty and serves the expert the shared registry assigns to its Serve
    application (`registry`: the registry actor's name). Free, it is healthy and answers ModelReady false."""

    async def __init__(self, registry: str, *args: Any) -> None:
        import ray

        super().__init__(None, *args)
        self._app = serve.get_replica_context().app_name
        self._registry = ray.get_actor(registry, namespace=NAMESPACE)
        self._load_lock = asyncio.Lock()
        await (
            self.load()
        )  # a restarted or added replica of an assigned application loads before its first call

    async def load(self) -> dict[str, str] | None:
        """Load the expert whose registry entry names this application (once; later calls return it).
        Returns {name, version}, or None while the application is free. A load that fails raises (the
        router reports it and deletes the application)."""
        async with self._load_lock:
            if self._expert is None:
                data, _ = await self._registry.read.remote()
                entry = next((e for e in data.experts if e.app == self._app), None)
                if entry is None:
                    return None
                if entry.path is None:
                    raise RuntimeError(f"expert {entry.name!r} has no path to load from")
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._executor, self._load, entry.path)
                if (self.card.name, self.card.version) != (entry.name, entry.version):
                    found = f"{self.card.name!r} v{self.card.version}"
                    self._expert, self.name = None, None
                    raise RuntimeError(
                        f"{entry.path} now holds expert {found}, not {entry.name!r} v{entry.version} as registered"
                    )
            return {"name": self.name or "", "version": self.card.version}

    def check_health(self) -> None:
        if self._expert is not None:
            super().check_health()

    # A replica that was free when the application was assigned (the router's `load` reached a sibling) loads
    # on its first call instead of refusing it.
    async def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        if self._expert is None:
            await self.load()
        return await super().ModelReady(request, grpc_context)

    async def ModelInfer(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        if self._expert is None:
            await self.load()
        return await super().ModelInfer(request, grpc_context)

    async def infer_arrays(self, inputs: dict[str, Any]) -> tuple[Any, dict[str, float | int]]:
        if self._expert is None:
            await self.load()
        return await super().infer_arrays(inputs)


def deploy_warm(app: str, registry: str, config: ExpertDeployment, wait_s: float = 120.0) -> str:
    """Deploy warm application `app` (WarmExpertServer with `config`) and wait until it is RUNNING. It keeps at
    least one replica even when `config` scales to zero: an idle warm replica is its whole point."""
    config = config.model_copy(update={"min_replicas": max(1, config.min_replicas)})
    target = bound_application(WarmExpertServer, app.removeprefix("expert-"), config, registry)
    return run_application(target, app, f"/experts/{app}", f"warm expert application {app!r}", wait_s)

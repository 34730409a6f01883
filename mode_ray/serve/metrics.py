"""Prometheus metrics through Ray's metrics API (exported by every Ray node); no-ops outside a Ray worker."""

from __future__ import annotations

from typing import Any


class Noop:
    def inc(self, *a: Any, **k: Any) -> None: ...

    def observe(self, *a: Any, **k: Any) -> None: ...

    def set(self, *a: Any, **k: Any) -> None: ...


def _make(kind: str, name: str, description: str, tags: tuple[str, ...] = (), **kw: Any) -> Any:
    try:
        import ray
        from ray.util import metrics

        if not ray.is_initialized():
            return Noop()
        return getattr(metrics, kind)(name, description=description, tag_keys=tags, **kw)
    except Exception:  # noqa: BLE001 - metrics must never take the server down
        return Noop()


class RouterMetrics:
    def __init__(self) -> None:
        self.requests = _make(
            "Counter", "mode_ray_requests_total", "generation requests by outcome", ("outcome",)
        )
        self.expert_calls = _make(
            "Counter", "mode_ray_expert_calls_total", "ModelInfer calls", ("expert", "outcome")
        )
        self.dropped_mass = _make(
            "Counter",
            "mode_ray_dropped_mass_total",
            "routing weight lost to failed experts (sum over rows and steps)",
            ("expert",),
        )
        self.tick_seconds = _make(
            "Histogram",
            "mode_ray_tick_seconds",
            "one step-engine tick",
            boundaries=[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5],
        )
        self.active = _make("Gauge", "mode_ray_active_requests", "requests stepping in the engine")
        self.queued = _make("Gauge", "mode_ray_queued_requests", "requests waiting to join the engine")

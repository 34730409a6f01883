"""Every Prometheus metric mode_ray exports, declared once (`METRICS`), all named `mode_ray_*`.

Router metrics go through `ray.util.metrics`; expert metrics through `ray.serve.metrics`, which adds Serve's
deployment / replica / application tags. Ray's metrics agent exports them with its `ray_` prefix (e.g.
`ray_mode_ray_requests_total`). Outside a Ray worker every metric is a no-op, and a metric never takes the
server down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

ROW_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
CALL_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128]
TICK_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5]
REQUEST_BUCKETS = [0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60, 300]
PHASE_BUCKETS = [0.0001, 0.0003, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5]


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Literal["Counter", "Gauge", "Histogram"]
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        # the router (step engine)
        Metric("mode_ray_requests_total", "Counter", "generation requests by outcome", ("outcome",)),
        Metric(
            "mode_ray_request_seconds",
            "Histogram",
            "latency of a completed generation request, admission to result",
            (),
            tuple(REQUEST_BUCKETS),
        ),
        Metric("mode_ray_routed_rows_total", "Counter", "rows the router sent to each expert", ("expert",)),
        Metric(
            "mode_ray_routing_weight_total",
            "Counter",
            "routing weight each expert carried (sum over rows and evaluations; its share is its rate over the sum)",
            ("expert",),
        ),
        Metric(
            "mode_ray_expert_replicas",
            "Gauge",
            "RUNNING replicas of each expert, as Serve reports",
            ("expert",),
        ),
        Metric(
            "mode_ray_expert_calls_total",
            "Counter",
            "router -> expert ModelInfer calls",
            ("expert", "outcome"),
        ),
        Metric(
            "mode_ray_dropped_mass_total",
            "Counter",
            "routing weight lost to failed experts (sum over rows and steps)",
            ("expert",),
        ),
        Metric("mode_ray_tick_seconds", "Histogram", "one step-engine tick", (), tuple(TICK_BUCKETS)),
        Metric(
            "mode_ray_tick_phase_seconds",
            "Histogram",
            "one tick's time by phase: gate, plan, encode, wire, queue, expert, decode, combine, idle, overhead",
            ("phase",),
            tuple(PHASE_BUCKETS),
        ),
        Metric("mode_ray_active_requests", "Gauge", "requests stepping in the engine"),
        Metric("mode_ray_queued_requests", "Gauge", "requests waiting to join the engine"),
        Metric("mode_ray_registry_version", "Gauge", "the registry version new requests are admitted with"),
        # each expert replica
        Metric("mode_ray_expert_rows_total", "Counter", "rows (samples) denoised by the expert", ("expert",)),
        Metric("mode_ray_expert_answered_calls_total", "Counter", "ModelInfer calls answered", ("expert",)),
        Metric(
            "mode_ray_expert_batch_rows",
            "Histogram",
            "rows per forward pass (after @serve.batch merging)",
            ("expert",),
            tuple(ROW_BUCKETS),
        ),
        Metric(
            "mode_ray_expert_batch_calls",
            "Histogram",
            "ModelInfer calls merged into one forward pass",
            ("expert",),
            tuple(CALL_BUCKETS),
        ),
    ]
}


class Noop:
    def inc(self, *a: Any, **k: Any) -> None: ...

    def observe(self, *a: Any, **k: Any) -> None: ...

    def set(self, *a: Any, **k: Any) -> None: ...

    def set_default_tags(self, *a: Any, **k: Any) -> None: ...


def make(name: str, serve: bool = False, default_tags: dict[str, str] | None = None) -> Any:
    """The metric `name` of METRICS; `serve`: through ray.serve.metrics (inside a Serve replica)."""
    m = METRICS[name]
    try:
        import ray

        if not ray.is_initialized():
            return Noop()
        if serve:
            from ray.serve import metrics
        else:
            from ray.util import metrics
        kw: dict[str, Any] = {"description": m.description, "tag_keys": m.tags}
        if m.boundaries:
            kw["boundaries"] = list(m.boundaries)
        metric = getattr(metrics, m.kind)(m.name, **kw)
        if default_tags:
            metric.set_default_tags(dict(default_tags))  # a fresh dict: Serve adds its own tags to it
        return metric
    except Exception:  # noqa: BLE001 - metrics must never take the server down
        return Noop()


class RouterMetrics:
    def __init__(self) -> None:
        self.requests = make("mode_ray_requests_total")
        self.expert_calls = make("mode_ray_expert_calls_total")
        self.dropped_mass = make("mode_ray_dropped_mass_total")
        self.tick_seconds = make("mode_ray_tick_seconds")
        self.tick_phase_seconds = make("mode_ray_tick_phase_seconds")
        self.active = make("mode_ray_active_requests")
        self.queued = make("mode_ray_queued_requests")
        self.registry_version = make("mode_ray_registry_version")
        self.request_seconds = make("mode_ray_request_seconds")
        self.routed_rows = make("mode_ray_routed_rows_total")
        self.routing_weight = make("mode_ray_routing_weight_total")
        self.expert_replicas = make("mode_ray_expert_replicas")


class ExpertMetrics:
    def __init__(self, expert: str, in_serve: bool) -> None:
        tags = {"expert": expert}
        names = ("rows_total", "answered_calls_total", "batch_rows", "batch_calls")
        for short in names:
            metric = make(f"mode_ray_expert_{short}", serve=True, default_tags=tags) if in_serve else Noop()
            setattr(self, short, metric)

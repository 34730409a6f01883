"""Load-aware autoscaling of expert deployments: scale on how busy the replicas' forward passes are.

Serve's default policy scales on ongoing requests per replica. The router merges every tick's rows for one
expert into one call, so an expert that computes all the time sees about one ongoing request per router
cohort: queue length says nothing about its load, and the default policy never scales it up. What the rows
routed to an expert cost is what a replica spends in forward passes, so each replica reports its busy
fraction (`ExpertServer.record_autoscaling_stats`: forward-pass seconds per wall second since the last
report, and rows per second) and this policy asks for

    desired = max(sum_r busy_r / target_busy, Serve's queue-length estimate)

replicas (the second term keeps the default behaviour for direct OIP clients that send many small calls).
Serve applies min/max replicas, the scaling factors and the up/down-scale delays around it, and scales a
deployment at zero replicas up at once when calls wait for it (scale-to-zero: `min_replicas: 0`).

The policy runs in the Serve controller (`policy_function: mode_ray.serve.autoscaling:BusyPolicy`), so
mode_ray must be importable there, as it is for every replica.
"""

from __future__ import annotations

from typing import Any

BUSY = "busy"  # the custom metric: forward-pass seconds per wall second, per replica
POLICY = "mode_ray.serve.autoscaling:BusyPolicy"


class BusyPolicy:
    """Serve autoscaling policy (class form: Serve builds it once with `policy_kwargs`)."""

    def __init__(self, target_busy: float = 0.6) -> None:
        if not 0 < target_busy <= 1:
            raise ValueError(f"target_busy must be in (0, 1], got {target_busy}")
        self.target_busy = target_busy

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        """ctx: ray.serve.config.AutoscalingContext -> (desired replicas, policy state)."""
        current = ctx.current_num_replicas
        if current == 0:  # Serve's cold-start path scales up when calls wait; nothing to measure here
            return ctx.target_num_replicas, {}
        busy = (ctx.aggregated_metrics or {}).get(BUSY, {})
        by_busy = sum(min(1.0, max(0.0, float(v))) for v in busy.values()) / self.target_busy
        target_calls = ctx.config.get_target_ongoing_requests() * current
        by_calls = current * ctx.total_num_requests / target_calls
        return max(by_busy, by_calls), {"busy": round(sum(busy.values()), 3)}

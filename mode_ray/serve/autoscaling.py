"""Load-aware autoscaling of expert deployments: scale on the calls a replica holds, measured in time.

Serve's default policy scales on ongoing requests per replica. The router merges every tick's rows for one
expert into one call, so an expert that computes all the time sees about one ongoing call per router cohort
and replica: the count says nothing about its load, and the default policy never scales it up. So each
replica reports (`ExpertServer.record_autoscaling_stats`, Serve's custom autoscaling metrics), per wall second
since its last report,

    busy = forward-pass seconds        load = busy + seconds that calls waited for a forward pass

`load` is the mean number of calls the replica holds (Little's law): 1 when it computes all the time and no
call waits (a second replica would sit idle: one cohort's calls come one at a time), 2 when one call waits on
average behind the running one. The policy `LoadPolicy` asks for

    desired = max(sum_r load_r / target_load, Serve's queue-length estimate)

replicas (the second term keeps the default behaviour for direct OIP clients that send many small calls).
With `target_load` 1 the replicas match the calls that overlap (router replicas x cohorts, and calls split at
`max_rows_per_call`); below 1 leaves headroom. Serve applies min/max replicas, the scaling factors and the
up/down-scale delays around it, and scales a deployment at zero replicas up at once when calls wait for it
(scale to zero: `min_replicas: 0`).

The policy runs in the Serve controller (`policy_function: mode_ray.serve.autoscaling:LoadPolicy`), so
mode_ray must be importable there, as it is for every replica.
"""

from __future__ import annotations

from typing import Any

LOAD = "load"  # the custom metric the policy reads, per replica
POLICY = "mode_ray.serve.autoscaling:LoadPolicy"


class LoadPolicy:
    """Serve autoscaling policy (class form: Serve builds it once with `policy_kwargs`)."""

    def __init__(self, target_load: float = 1.0) -> None:
        if not 0 < target_load <= 64:
            raise ValueError(f"target_load must be in (0, 64], got {target_load}")
        self.target_load = target_load

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        """ctx: ray.serve.config.AutoscalingContext -> (desired replicas, policy state)."""
        current = ctx.current_num_replicas
        if current == 0:  # Serve's cold-start path scales up when calls wait; nothing to measure here
            return ctx.target_num_replicas, {}
        load = (ctx.aggregated_metrics or {}).get(LOAD, {})
        total = sum(max(0.0, float(v)) for v in load.values())
        target_calls = ctx.config.get_target_ongoing_requests() * current
        by_calls = current * ctx.total_num_requests / target_calls
        return max(total / self.target_load, by_calls), {"load": round(total, 3)}

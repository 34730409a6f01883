"""Gates, top-k / top-p routing, the step plan (combine, guidance) and the in-process Mixture.
Pure torch: no ray, no grpc, and no request handling (that is `mode_ray.generation`)."""

from mode_ray.routing.gates import Gate, LearnedGate, LearnedGateNet, NoiseGate, PrototypeGate, SumGate
from mode_ray.routing.mixture import Mixture
from mode_ray.routing.step import StepPlan, allowed_mask, combine, dispatch, finish_step, plan_step
from mode_ray.routing.topk import NoExpertLeft, Routing, drop_experts, top_k, top_p

__all__ = [
    "Gate",
    "LearnedGate",
    "LearnedGateNet",
    "Mixture",
    "NoExpertLeft",
    "NoiseGate",
    "PrototypeGate",
    "Routing",
    "StepPlan",
    "SumGate",
    "allowed_mask",
    "combine",
    "dispatch",
    "drop_experts",
    "finish_step",
    "plan_step",
    "top_k",
    "top_p",
]

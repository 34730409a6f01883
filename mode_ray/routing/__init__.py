"""Gates, top-k / top-p routing, combination and the in-process Mixture. Pure torch: no ray, no grpc."""

from mode_ray.routing.bundle import MixtureBundle, MixtureConfig, load_bundle
from mode_ray.routing.combine import combine, dispatch
from mode_ray.routing.gates import Gate, LearnedGate, LearnedGateNet, NoiseGate, PrototypeGate, SumGate
from mode_ray.routing.generation import GenerateParams, Generation, generate_local
from mode_ray.routing.mixture import Mixture
from mode_ray.routing.topk import Routing, drop_experts, top_k, top_p

__all__ = [
    "Gate",
    "GenerateParams",
    "Generation",
    "LearnedGate",
    "LearnedGateNet",
    "Mixture",
    "MixtureBundle",
    "MixtureConfig",
    "NoiseGate",
    "PrototypeGate",
    "Routing",
    "SumGate",
    "combine",
    "dispatch",
    "drop_experts",
    "generate_local",
    "load_bundle",
    "top_k",
    "top_p",
]

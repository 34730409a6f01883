"""One request from parameters to result: the mixture directory, the request parameters, the trajectory
state both loops drive (`prepare` -> `RequestState`), the result type, in-process generation, images.

Imports point one way: `routing` (pure mixture maths) below, `serve` / `train` / `cli` above.
"""

from mode_ray.generation.bundle import MixtureBundle, MixtureConfig, load_bundle
from mode_ray.generation.local import generate_local
from mode_ray.generation.params import DEFAULT_NUM_IMAGES, GenerateParams, ResolvedRequest, resolve
from mode_ray.generation.request import RequestState, prepare
from mode_ray.generation.result import GenerationResult, Progress, StepTrace

__all__ = [
    "DEFAULT_NUM_IMAGES",
    "GenerateParams",
    "GenerationResult",
    "MixtureBundle",
    "MixtureConfig",
    "Progress",
    "RequestState",
    "ResolvedRequest",
    "StepTrace",
    "generate_local",
    "load_bundle",
    "prepare",
    "resolve",
]

"""EDM diffusion maths in pure torch: preconditioning, sigma schedules, samplers and the training loss.

Nothing here imports ray or grpc; `routing`, `serve` and `train` build on it.
"""

from mode_ray.diffusion.denoiser import Denoiser, EDMPrecond
from mode_ray.diffusion.loss import edm_loss, sample_training_sigmas
from mode_ray.diffusion.samplers import (
    SAMPLERS,
    SamplerName,
    Trajectory,
    advance_many,
    make_trajectory,
    sample,
    to_d,
)
from mode_ray.diffusion.schedules import karras_sigmas

__all__ = [
    "Denoiser",
    "EDMPrecond",
    "SAMPLERS",
    "SamplerName",
    "Trajectory",
    "advance_many",
    "edm_loss",
    "karras_sigmas",
    "make_trajectory",
    "sample",
    "sample_training_sigmas",
    "to_d",
]

"""Expert backbones, the expert card and checkpoint format, condition encoders, the diffusers adapter."""

from mode_ray.models.card import ExpertCard
from mode_ray.models.checkpoint import (
    CheckpointError,
    Expert,
    build_denoiser,
    load_card,
    load_expert,
    save_expert,
)
from mode_ray.models.conditions import ClassLabelEncoder
from mode_ray.models.dit import DIT_PRESETS, DiT, DiTConfig
from mode_ray.models.unet import UNET_PRESETS, UNet, UNetConfig

__all__ = [
    "DIT_PRESETS",
    "UNET_PRESETS",
    "CheckpointError",
    "ClassLabelEncoder",
    "DiT",
    "DiTConfig",
    "Expert",
    "ExpertCard",
    "UNet",
    "UNetConfig",
    "build_denoiser",
    "load_card",
    "load_expert",
    "save_expert",
]

"""Latent space: the decoder of a latent mixture, a diffusers `AutoencoderKL` or `AutoencoderTiny`.

The experts, the gates and the wire work on latents `(N, c, h, w)` in the experts' space; the decoder runs
once per image at the end, `images = vae.decode(z / scaling_factor + shift_factor)` as diffusers' pipelines
do. Its directory is a diffusers save (`config.json` + `diffusion_pytorch_model.safetensors`), read with
safetensors only (`use_safetensors=True`, no hub: `local_files_only=True`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mode_ray.models.card import read_json
from mode_ray.models.checkpoint import PICKLE_SUFFIXES, CheckpointError, check_files

DECODER_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
DECODER_WEIGHTS = "diffusion_pytorch_model.safetensors"


class LatentDecoder(nn.Module):
    """z: (N, c, h, w) latents in the experts' space -> images (N, C, H, W) in about [-1, 1]."""

    def __init__(self, vae: nn.Module, scaling_factor: float = 1.0, shift_factor: float = 0.0) -> None:
        super().__init__()
        if not scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {scaling_factor}")
        self.vae = vae
        self.scaling_factor, self.shift_factor = float(scaling_factor), float(shift_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @torch.no_grad()
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        device = next(self.vae.parameters()).device
        return self.vae.decode(z.to(device) / self.scaling_factor + self.shift_factor).sample.float().cpu()


def load_decoder(path: str | Path, device: str | torch.device = "cpu") -> LatentDecoder:
    """The decoder saved in `path` (diffusers `save_pretrained` of an AutoencoderKL / AutoencoderTiny); a
    CheckpointError naming the file and the problem for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"decoder: {path} is not a directory (expected config.json and {DECODER_WEIGHTS})"
        )
    if not (path / DECODER_WEIGHTS).exists():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = (
            f"; found {pickles}: pickle weights are never loaded, convert them to safetensors"
            if pickles
            else ""
        )
        raise CheckpointError(f"decoder: {path / DECODER_WEIGHTS} is missing{hint}")
    check_files(path, ("config.json", DECODER_WEIGHTS))
    try:
        config = read_json(path / "config.json", "decoder config")
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    kind = config.get("_class_name")
    if kind not in DECODER_CLASSES:
        raise CheckpointError(f"decoder: {path} holds a {kind!r}; supported: {', '.join(DECODER_CLASSES)}")
    try:
        import diffusers
    except ImportError:
        raise CheckpointError(
            "a latent mixture's decoder needs the extra: `pip install mode-ray[diffusers]`"
        ) from None
    try:
        vae = getattr(diffusers, kind).from_pretrained(path, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"decoder: {path} does not load as a {kind}: {e}") from None
    scaling = float(config.get("scaling_factor") or 1.0)
    shift = float(config.get("shift_factor") or 0.0)
    return LatentDecoder(vae.to(device).eval().requires_grad_(False), scaling, shift)

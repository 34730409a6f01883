"""EDM training loss (Karras et al. 2022, Sec. 5)."""

from __future__ import annotations

import torch

from mode_ray.diffusion.denoiser import Denoiser


def sample_training_sigmas(
    batch: int,
    generator: torch.Generator | None = None,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Log-normal training noise levels `ln sigma ~ N(p_mean, p_std^2)`. Returns (batch,)."""
    return (torch.randn(batch, generator=generator, device=device) * p_std + p_mean).exp()


def edm_loss(
    model: Denoiser,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    cond: torch.Tensor | None,
    noise: torch.Tensor,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """Per-row weighted denoising loss `lambda(sigma) ||D(x0 + sigma n) - x0||^2`.

    x0, noise: (B, C, H, W); sigma: (B,). Returns (B,) so callers can bucket it by sigma.
    """
    s = sigma.reshape(-1, 1, 1, 1)
    weight = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    denoised = model(x0 + s * noise, sigma, cond)
    return (weight * (denoised - x0) ** 2).flatten(1).mean(1)

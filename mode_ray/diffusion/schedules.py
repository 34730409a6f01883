"""Sigma schedules for sampling."""

from __future__ import annotations

import torch

from mode_ray.diffusion.denoiser import check_sigma_range


def karras_sigmas(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: `steps` decreasing sigmas from sigma_max to sigma_min, then a final 0.

    Returns sigmas: (steps + 1,) float64 (so schedules are identical on every device).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    check_sigma_range(sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])

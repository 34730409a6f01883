"""The denoiser contract every expert honours, and EDM preconditioning (Karras et al. 2022, Table 1)."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Denoiser(Protocol):
    """`D(x, sigma, cond) -> x0_hat`.

    x: (B, C, H, W) noisy latent `x0 + sigma * n`; sigma: (B,) per-row noise level; cond: (B, D) or None.
    Returns x0_hat: (B, C, H, W). Rows are independent, so rows at different steps share one call.
    """

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor: ...


class EDMPrecond(nn.Module):
    """Wraps a raw network `F(c_in x, c_noise, cond)` into the EDM denoiser
    `D = c_skip x + c_out F(c_in x, c_noise, cond)`."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        sigma = sigma.to(x.dtype).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma**2).sqrt()
        c_noise = sigma.log().flatten() / 4  # (B,)
        return c_skip * x + c_out * self.net(c_in * x, c_noise, cond)


def check_sigma_range(sigma_min: float, sigma_max: float) -> None:
    """Validate a sigma range, naming the offending value."""
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(
            f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )

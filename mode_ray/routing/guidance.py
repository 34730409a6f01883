"""Classifier-free guidance on a mixture, exact when both branches share one routing.

With the same weights w for both branches, `sum_k w_k [D_u,k + s (D_c,k - D_u,k)]` equals
`D_u,mix + s (D_c,mix - D_u,mix)`: guidance of the mixture. So the gate is evaluated once, on the
conditional branch, and every chosen expert sees the conditional and null rows in one call.
"""

from __future__ import annotations

import torch


def needs_guidance(cond: torch.Tensor | None, scale: float) -> bool:
    return cond is not None and scale != 1.0


def expand_for_guidance(
    x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack the conditional rows over the null-condition rows: (B, ...) -> (2B, ...)."""
    return torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, torch.zeros_like(cond)])


def apply_guidance(denoised: torch.Tensor, scale: float) -> torch.Tensor:
    """denoised: (2B, C, H, W) = [D_c; D_u] -> D_u + scale (D_c - D_u): (B, C, H, W)."""
    d_cond, d_uncond = denoised.chunk(2)
    return d_uncond + scale * (d_cond - d_uncond)

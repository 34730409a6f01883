"""Small experts for routing tests: closed-form Gaussian denoisers with known cards."""

from __future__ import annotations

import torch
from torch import nn

from mode_ray.models.card import ExpertCard
from mode_ray.models.checkpoint import Expert


class GaussianDenoiser(nn.Module):
    """Optimal denoiser for data N(mean, s^2): mean + (x - mean) s^2 / (sigma^2 + s^2); cond shifts mean."""

    def __init__(self, mean: float, s: float) -> None:
        super().__init__()
        self.mean, self.s = mean, s

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        mean = self.mean + (0.0 if cond is None else cond.sum(1).reshape(-1, 1, 1, 1) * 0.1)
        s2 = self.s**2
        return mean + (x - mean) * s2 / (sigma.reshape(-1, 1, 1, 1) ** 2 + s2)


def card(
    name: str, prototype: list[float] | None = None, interval: tuple[float, float] | None = None
) -> ExpertCard:
    return ExpertCard(
        name=name, backbone_config={}, latent_shape=(1, 2, 2), prototype=prototype, sigma_interval=interval
    )


def gaussian_experts(n: int) -> list[Expert]:
    protos = torch.eye(10)[:n].tolist()
    return [
        Expert(card(f"e{i}", protos[i]), GaussianDenoiser(mean=i - n / 2, s=0.3 + 0.1 * i)) for i in range(n)
    ]

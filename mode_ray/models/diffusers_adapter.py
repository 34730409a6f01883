"""Adapter: a diffusers `UNet2DModel` trained as a DDPM (epsilon-, v- or sample-prediction) as an EDM expert.

VP <-> VE: `x_vp = x / sqrt(1 + sigma^2)`, `alpha_bar = 1 / (1 + sigma^2)`; the discrete timestep is found
by interpolating log-sigma over the training schedule (as k-diffusion's discrete wrappers do), and the
network's output is turned into x0_hat. The router only ever sees x0_hat.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from mode_ray.models.card import ExpertCard


def alphas_cumprod_from_config(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """(T,) cumulative alphas of a diffusers DDPMScheduler config (needs the `diffusers` extra)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod.double()


class DiffusersVPAdapter(nn.Module):
    """D(x, sigma, cond) for a VP epsilon/v/sample model `unet(x_vp, t, class_labels=...).sample`.

    alphas_cumprod: (T,) of the schedule it was trained on. cond: (B, D) one-hot or None; an all-zero row
    maps to class index D (the model's null class) when the model has D + 1 class embeddings.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str) -> None:
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}"
            )
        self.unet = unet
        self.prediction_type = prediction_type
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.register_buffer("log_sigmas", sigmas.log().float(), persistent=False)  # (T,) increasing

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep for sigma: (B,), linear in log-sigma between the schedule's points."""
        log_sigma = sigma.float().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        high = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        low = high - 1
        frac = (log_sigma - self.log_sigmas[low]) / (self.log_sigmas[high] - self.log_sigmas[low])
        return low.float() + frac

    def _class_labels(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        n_classes = getattr(getattr(self.unet, "config", None), "num_class_embeds", None)
        if not n_classes:
            return None
        dim = cond.shape[1] if cond is not None else n_classes - 1
        null = torch.full((batch,), n_classes - 1, dtype=torch.long)
        if cond is None:
            return null
        if n_classes < dim:
            raise ValueError(f"the diffusers model has {n_classes} classes, the condition has dim {dim}")
        return torch.where(cond.abs().sum(1) > 0, cond.argmax(1), null.to(cond.device))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        alpha_bar = 1 / (1 + s**2)
        x_vp = x * alpha_bar.sqrt()
        t = self.sigma_to_t(sigma)
        out = self.unet(x_vp, t, class_labels=self._class_labels(cond, x.shape[0])).sample  # (B, C, H, W)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return alpha_bar.sqrt() * x_vp - (1 - alpha_bar).sqrt() * out
        return out


def build_diffusers(card: ExpertCard) -> nn.Module:
    """The untrained adapter of a diffusers-backed expert card (needs the `diffusers` extra)."""
    from mode_ray.models.checkpoint import CheckpointError

    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise CheckpointError(
            f"expert {card.name!r} is a diffusers model: install the extra with `pip install mode-ray[diffusers]`"
        ) from None
    if card.backbone != "diffusers_unet2d":
        raise CheckpointError(f"expert {card.name!r}: backbone {card.backbone!r} is not supported yet")
    p = card.parametrization
    assert p.scheduler_config is not None and p.prediction_type is not None  # checked by the card
    unet = UNet2DModel.from_config(card.backbone_config)
    return DiffusersVPAdapter(unet, alphas_cumprod_from_config(p.scheduler_config), p.prediction_type)

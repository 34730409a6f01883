"""Adapter: a diffusers model trained as a DDPM (epsilon-, v- or sample-prediction) as an EDM expert.

One adapter serves three diffusers model classes (`MODEL_CLASSES`): `UNet2DModel` (unconditional, or class
labels), `UNet2DConditionModel` (cross-attention on token embeddings) and `DiTTransformer2DModel` (class
labels; its learned-sigma output channels are dropped).

VP <-> VE: `x_vp = x / sqrt(1 + sigma^2)`, `alpha_bar = 1 / (1 + sigma^2)`; the discrete timestep is found
by interpolating log-sigma over the training schedule (as k-diffusion's discrete wrappers do), and the
network's output is turned into x0_hat. The router only ever sees x0_hat.

Conditions (mode_ray.models.conditions): the all-zeros row is the null condition. A class-conditional model
reads the one-hot row's argmax and maps the null row to its extra null class; a cross-attention model reads
the packed condition's token embeddings with the token mask, and a null row has every token masked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mode_ray.models.conditions import pooled, token_mask, tokens

if TYPE_CHECKING:
    from mode_ray.models.card import ExpertCard

# diffusers model class -> card backbone: the one list of what the adapter (and the importer) supports
MODEL_CLASSES = {
    "UNet2DModel": "diffusers_unet2d",
    "UNet2DConditionModel": "diffusers_unet2d_condition",
    "DiTTransformer2DModel": "diffusers_dit",
}
BACKBONE_CLASSES = {backbone: cls for cls, backbone in MODEL_CLASSES.items()}


def alphas_cumprod_from_config(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """(T,) cumulative alphas of a diffusers DDPMScheduler config (needs the `diffusers` extra)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod.double()


def training_sigmas(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """(T,) the VE sigmas of the training schedule, increasing: `sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`."""
    alphas_cumprod = alphas_cumprod_from_config(scheduler_config)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def num_classes(config: Mapping[str, Any], backbone: str) -> int | None:
    """The conditional classes of a class-conditional model (its null class has index num_classes), or None.

    UNet2DModel: `num_class_embeds` embeddings, the last one the null class. DiT: `num_embeds_ada_norm`
    classes, and its label embedding holds one more row for the null class (index num_embeds_ada_norm)."""
    if backbone == "diffusers_dit":
        return config.get("num_embeds_ada_norm", 1000)
    if backbone == "diffusers_unet2d":
        n = config.get("num_class_embeds")
        return n - 1 if n else None
    return None


def cross_attention_dim(config: Mapping[str, Any]) -> int:
    """The token dimension a UNet2DConditionModel cross-attends to (one value for every block)."""
    dim = config.get("cross_attention_dim", 1280)
    dims = set(dim) if isinstance(dim, list | tuple) else {dim}
    if len(dims) != 1:
        raise ValueError(f"cross_attention_dim must be one value for every block, got {list(dim)}")
    return int(dims.pop())


class DiffusersVPAdapter(nn.Module):
    """D(x, sigma, cond) -> x0_hat for a VP epsilon/v/sample network `net(x_vp, t, **conditioning).sample`.

    alphas_cumprod: (T,) of the schedule it was trained on. backbone: one of MODEL_CLASSES' values; it says how
    cond reaches the network. cond: None, (B, D) one-hot for a class-conditional model, or a packed text
    condition (B, 1 + L, D) for a cross-attention model (D = its cross_attention_dim).
    """

    def __init__(
        self,
        net: nn.Module,
        alphas_cumprod: torch.Tensor,
        prediction_type: str,
        backbone: str = "diffusers_unet2d",
    ) -> None:
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}"
            )
        if backbone not in BACKBONE_CLASSES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONE_CLASSES)}, got {backbone!r}")
        self.net = net
        self.prediction_type = prediction_type
        self.backbone = backbone
        config = getattr(net, "config", {})
        config = config if isinstance(config, Mapping) else vars(config)  # diffusers' FrozenDict is a dict
        self.num_classes = num_classes(config, backbone)
        self.token_dim = cross_attention_dim(config) if backbone == "diffusers_unet2d_condition" else None
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.register_buffer("log_sigmas", sigmas.log().float(), persistent=False)  # (T,) increasing

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep for sigma: (B,), linear in log-sigma between the schedule's points."""
        log_sigma = sigma.float().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        high = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        low = high - 1
        frac = (log_sigma - self.log_sigmas[low]) / (self.log_sigmas[high] - self.log_sigmas[low])
        return low.float() + frac

    def class_labels(
        self, cond: torch.Tensor | None, batch: int, device: torch.device
    ) -> torch.Tensor | None:
        """(B,) class indices: the one-hot row's argmax, the null class for an all-zeros row or cond None."""
        if self.num_classes is None:
            return None
        null = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if cond is None:
            return null
        rows = pooled(cond)  # (B, D)
        if rows.shape[1] > self.num_classes:
            raise ValueError(
                f"the diffusers model has {self.num_classes} classes, the condition has dim {rows.shape[1]}"
            )
        return torch.where(rows.ne(0).any(dim=1), rows.argmax(dim=1), null)

    def encoder_states(
        self, cond: torch.Tensor | None, batch: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """encoder_hidden_states (B, L, D) and encoder_attention_mask (B, L) of a packed text condition; cond
        None is one fully masked zero token per row, which gives what a null row of any L gives."""
        assert self.token_dim is not None
        if cond is None:
            return {
                "encoder_hidden_states": torch.zeros(batch, 1, self.token_dim, device=device),
                "encoder_attention_mask": torch.zeros(batch, 1, dtype=torch.bool, device=device),
            }
        states, mask = tokens(cond), token_mask(cond)
        if states is None or mask is None:
            raise ValueError(
                f"a cross-attention diffusers model needs token embeddings: a packed condition (B, 1 + L, "
                f"{self.token_dim}) (condition.tokens > 0), got shape {list(cond.shape)}"
            )
        if states.shape[-1] != self.token_dim:
            raise ValueError(
                f"the diffusers model cross-attends to {self.token_dim}-d tokens, the condition has dim "
                f"{states.shape[-1]}"
            )
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        alpha_bar = 1 / (1 + s**2)
        x_vp = x * alpha_bar.sqrt()
        t = self.sigma_to_t(sigma)  # (B,)
        if self.backbone == "diffusers_unet2d_condition":
            conditioning: dict[str, Any] = self.encoder_states(cond, x.shape[0], x.device)
        else:
            conditioning = {"class_labels": self.class_labels(cond, x.shape[0], x.device)}
        dtype = next(self.net.parameters(), x_vp).dtype  # the network may run in half precision
        conditioning = {
            k: v.to(dtype) if v is not None and v.is_floating_point() else v for k, v in conditioning.items()
        }
        out = self.net(x_vp.to(dtype), t, **conditioning).sample  # (B, C_out, H, W)
        out = out[:, : x.shape[1]].to(x.dtype)  # (B, C, H, W): DiT's learned-sigma channels dropped
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return alpha_bar.sqrt() * x_vp - (1 - alpha_bar).sqrt() * out
        return out


def check_card_condition(card: ExpertCard) -> None:
    """A ValueError naming the field unless the card's condition is one the diffusers model can read."""
    config = card.backbone_config
    c = card.condition
    if card.backbone == "diffusers_unet2d_condition":
        dim = cross_attention_dim(config)
        if c.type != "text" or c.tokens < 1 or c.dim != dim:
            raise ValueError(
                f"condition: a diffusers_unet2d_condition model cross-attends to {dim}-d tokens, so it needs "
                f"condition.type 'text' with tokens >= 1 and dim {dim}; got type {c.type!r}, tokens "
                f"{c.tokens}, dim {c.dim}"
            )
        return
    classes = num_classes(config, card.backbone)
    if c.type == "text":
        raise ValueError(f"condition.type: a {card.backbone!r} model has no text conditioning, got 'text'")
    if c.type == "class_label" and (classes is None or c.dim > classes):
        raise ValueError(
            f"condition.dim: the {card.backbone!r} model has {classes or 0} classes (plus its null class), "
            f"the card has condition.dim {c.dim}"
        )


def build_diffusers(card: ExpertCard) -> nn.Module:
    """The untrained adapter of a diffusers-backed expert card (needs the `diffusers` extra)."""
    from mode_ray.models.checkpoint import CheckpointError

    try:
        import diffusers
    except ImportError:
        raise CheckpointError(
            f"expert {card.name!r} is a diffusers model: install the extra with `pip install mode-ray[diffusers]`"
        ) from None
    if card.backbone not in BACKBONE_CLASSES:
        raise CheckpointError(
            f"expert {card.name!r}: backbone {card.backbone!r} is not a diffusers backbone "
            f"({sorted(BACKBONE_CLASSES)})"
        )
    try:
        check_card_condition(card)
    except ValueError as e:
        raise CheckpointError(f"expert {card.name!r}: {e}") from None
    p = card.parametrization
    assert p.scheduler_config is not None and p.prediction_type is not None  # checked by the card
    net = getattr(diffusers, BACKBONE_CLASSES[card.backbone]).from_config(card.backbone_config)
    return DiffusersVPAdapter(
        net, alphas_cumprod_from_config(p.scheduler_config), p.prediction_type, card.backbone
    )

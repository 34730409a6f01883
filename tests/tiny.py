"""Tiny random mixtures for serving tests: xs-UNet experts with perturbed weights, a random learned gate."""

from __future__ import annotations

from pathlib import Path

import torch

from mode_ray.diffusion import EDMPrecond
from mode_ray.generation.bundle import GateSpec, MixtureConfig, save_gate
from mode_ray.models import ExpertCard, UNet, save_expert
from mode_ray.models.unet import UNET_PRESETS
from mode_ray.routing.gates import LearnedGateConfig, LearnedGateNet

XS = UNET_PRESETS["xs"]
EXPERTS = {"a": [0, 1, 2, 3], "b": [4, 5, 6], "c": [7, 8, 9], "d": [9]}  # d is not in the mixture: hot-add it


def make_expert(root: Path, name: str, digits: list[int], seed: int, scale: float = 0.02) -> Path:
    """An expert whose prototype holds `digits`; every weight perturbed (the preset zero-inits its output)."""
    torch.manual_seed(seed)
    model = EDMPrecond(UNet(XS))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    proto = [1.0 / len(digits) if i in digits else 0.0 for i in range(10)]
    card = ExpertCard(name=name, backbone_config=XS.to_dict(), latent_shape=(1, 28, 28), prototype=proto)
    return save_expert(root / name, card, model)


def build_tiny_mixture(model: Path) -> Path:
    """experts a, b, c in the mixture (learned + prototype + noise gate, top-2, heun 4 steps, guidance 2);
    expert d under the expert root only."""
    for i, (name, digits) in enumerate(EXPERTS.items()):
        make_expert(model / "experts", name, digits, seed=i)
    torch.manual_seed(9)
    save_gate(model / "gate", LearnedGateNet(LearnedGateConfig(("a", "b", "c"), width=8)))
    config = MixtureConfig(
        name="tiny",
        experts=["a", "b", "c"],
        gate=GateSpec(prototype_tau=0.5),
        top_k=2,
        sampler="heun",
        steps=4,
        guidance_scale=2.0,
    )
    (model / "mixture.json").write_text(config.model_dump_json(indent=2))
    return model

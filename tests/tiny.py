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
TINY_PRIOR = [0.3, 0.0, 0.0, 0.0, 0.2, 0.0, 0.0, 0.0, 0.5, 0.0]  # a skewed p(c) for unconditional='prior'


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
        class_prior=TINY_PRIOR,  # unconditional stays "null" unless a request asks for "prior"
    )
    (model / "mixture.json").write_text(config.model_dump_json(indent=2))
    return model


TEXT_TOKENS = 4  # L of the tiny text mixture (short prompts; the shipped encoder pads or cuts to L)


def import_tiny_diffusers_expert(model: Path, name: str, captions: list[str], seed: int) -> str:
    """A random 28x28 diffusers UNet2DConditionModel (cross-attention on the 384-d token embeddings) saved as
    a pipeline with its DDPM scheduler, imported by `import_diffusers` into model/experts/<name>."""
    import json

    from diffusers import DDPMScheduler, UNet2DConditionModel

    from mode_ray.models.importer import import_diffusers

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
        cross_attention_dim=384,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    src = model / "diffusers-src" / name
    unet.save_pretrained(src / "unet")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_config(
        src / "scheduler"
    )
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (src / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "DDPMScheduler"]}))
    (src / "captions.txt").write_text("\n".join(captions) + "\n")
    import_diffusers(src, model / "experts" / name, name, src / "captions.txt", tokens=TEXT_TOKENS)
    return name


def build_tiny_text_mixture(model: Path, backbones: tuple[str, ...] = ("unet", "unet")) -> Path:
    """A free-text mixture of len(backbones) tiny experts (xs presets, weights perturbed), expert i holding
    the digits i, i + len, ...: its prototype is the mean pooled embedding of their captions. Gates:
    prototype + noise; top-2, heun 3 steps, guidance 2. Backbones: "unet", "dit" (cross-attention on the
    tokens) or "diffusers" (an imported UNet2DConditionModel)."""
    from mode_ray.models.card import Condition
    from mode_ray.models.checkpoint import build_denoiser
    from mode_ray.models.conditions import DIGIT_NAMES, pooled
    from mode_ray.models.text import shared_encoder

    encoder = shared_encoder(TEXT_TOKENS, "float32")  # as training builds prototypes
    condition = Condition(type="text", dim=encoder.dim, tokens=TEXT_TOKENS, encoder=encoder.name)
    names = []
    for i, backbone in enumerate(backbones):
        digits = list(range(i, 10, len(backbones)))
        captions = [f"a handwritten {DIGIT_NAMES[d]}" for d in digits]
        if backbone == "diffusers":  # a diffusers UNet2DConditionModel, imported as a user would
            names.append(import_tiny_diffusers_expert(model, f"t{i}", captions, 200 + i))
            continue
        proto = pooled(encoder.encode(captions)).mean(0)
        if backbone == "unet":
            config = {**XS.to_dict(), "cond_dim": encoder.dim}
        else:
            from mode_ray.models.dit import DIT_PRESETS

            config = {**DIT_PRESETS["xs"].to_dict(), "cond_dim": encoder.dim, "cross_attention": True}
        card = ExpertCard(
            name=f"t{i}",
            backbone=backbone,
            backbone_config=config,
            latent_shape=(1, 28, 28),
            condition=condition,
            prototype=proto.tolist(),
            guidance_dropout=0.1,
        )
        torch.manual_seed(100 + i)
        net = build_denoiser(card)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        save_expert(model / "experts" / card.name, card, net)
        names.append(card.name)
    config = MixtureConfig(
        name="tiny-text",
        experts=names,
        gate=GateSpec(prototype_tau=0.1, noise=True, learned=None),
        top_k=2,
        sampler="heun",
        steps=3,
        guidance_scale=2.0,
        condition="text",
        text_tokens=TEXT_TOKENS,
    )
    (model / "mixture.json").write_text(config.model_dump_json(indent=2))
    return model


def build_tiny_latent_mixture(model: Path) -> Path:
    """A latent mixture: a tiny random diffusers AutoencoderKL (16x16x1 images <-> 8x8x4 latents, scaling
    factor 0.5) saved as `decoder/`, and two xs-UNet experts a, b on the latents (prototype + noise gates,
    top-2, heun 3 steps, guidance 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(7)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
    )
    vae.save_pretrained(model / "decoder", safe_serialization=True)
    config = {**XS.to_dict(), "in_channels": 4}
    for i, (name, digits) in enumerate((("a", [0, 1, 2, 3, 4]), ("b", [5, 6, 7, 8, 9]))):
        torch.manual_seed(30 + i)
        net = EDMPrecond(UNet(type(XS)(**config)))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        proto = [1.0 / len(digits) if d in digits else 0.0 for d in range(10)]
        card = ExpertCard(name=name, backbone_config=config, latent_shape=(4, 8, 8), prototype=proto)
        save_expert(model / "experts" / name, card, net)
    mixture = MixtureConfig(
        name="tiny-latent",
        experts=["a", "b"],
        gate=GateSpec(prototype_tau=0.5, learned=None),
        steps=3,
        decoder="decoder",
    )
    (model / "mixture.json").write_text(mixture.model_dump_json(indent=2))
    return model

"""A mixture directory: `mixture.json`, `experts/<name>/`, `gate/` (learned gate), optional `classifier/`.

mixture.json   MixtureConfig: expert names, gate composition, top_k/top_p, sampling defaults, the class prior
experts/<n>/   expert.json + model.safetensors (see mode_ray.models.checkpoint)
gate/          gate.json + model.safetensors (LearnedGateNet); extended gates live beside it (gates/...)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import ConfigDict, Field, ValidationError, model_validator

from mode_ray.diffusion import SamplerName
from mode_ray.diffusion.denoiser import check_sigma_range
from mode_ray.models.card import ExpertCard, format_validation_error, read_json
from mode_ray.models.checkpoint import CheckpointError, Expert, load_expert, load_state, save_artifact
from mode_ray.models.conditions import ClassLabelEncoder
from mode_ray.models.decoder import LatentDecoder, load_decoder
from mode_ray.models.strict import NoBooleanNumbers
from mode_ray.models.text import TextPrecision
from mode_ray.routing.gates import (
    Gate,
    LearnedGate,
    LearnedGateConfig,
    LearnedGateNet,
    NoiseGate,
    PrototypeGate,
    SumGate,
)
from mode_ray.routing.mixture import Mixture

GATE_CARD = "gate.json"
UnconditionalMode = Literal["prior", "null"]


class GateSpec(NoBooleanNumbers):
    """Which gates to sum: the prototype gate (tau), the noise gate, the learned gate (directory)."""

    model_config = ConfigDict(extra="forbid")
    prototype_tau: float | None = Field(0.1, gt=0)
    noise: bool = True
    learned: str | None = "gate"  # directory relative to the mixture directory


class MixtureConfig(NoBooleanNumbers):
    model_config = ConfigDict(extra="forbid")
    name: str = "mixture"
    experts: list[str]
    gate: GateSpec = Field(default_factory=GateSpec)
    top_k: int = Field(2, ge=1, le=16)
    top_p: float | None = Field(None, gt=0, le=1)
    min_weight: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="weight floor: experts below it are not evaluated (the rest renormalised)",
    )
    sampler: SamplerName = "heun"
    steps: int = Field(18, ge=1, le=1000)
    guidance_scale: float = Field(2.0, ge=0, le=50)  # experts train with condition dropout
    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = Field(80.0, gt=0)
    condition: Literal["class_label", "text", "none"] = Field(
        "class_label",
        description="class_label: prompts are class names or indices; text: free text through the sentence "
        "encoder (the `text` extra); none: unconditional",
    )
    class_names: list[str] = Field(default_factory=lambda: list(ClassLabelEncoder().names))
    text_tokens: int = Field(
        0, ge=0, le=512, description="text only: token embeddings per prompt (L) beside the pooled one"
    )
    text_precision: TextPrecision = Field(
        "auto",
        description="text only: the sentence encoder's matmul weights when serving. float32: the reference; "
        "bfloat16: ~1.9x faster on one CPU thread, pooled embeddings at cosine >= 0.9999; auto: bfloat16 where "
        "the device multiplies it natively (AVX512-BF16 / AMX CPUs, sm80+ GPUs), else float32",
    )
    class_prior: list[float] | None = Field(
        None,
        description="class_label only: the training data's class shares p(c), one per class name (normalised "
        "on load); what an unconditional request draws its classes from under unconditional='prior'",
    )
    unconditional: UnconditionalMode = Field(
        "null",
        description="how a request without a condition samples p(x). null: the null condition (the experts' "
        "unconditional branch, routed by the gate's p(k | x, sigma)); prior: each image draws its class "
        "c ~ p(c) from class_prior and samples p(x | c), since p(x) = sum_c p(c) p(x | c)",
    )
    decoder: str | None = Field(
        None,
        max_length=200,
        description="a latent mixture: directory (relative to the mixture) of its diffusers AutoencoderKL / "
        "AutoencoderTiny; the experts work on latents and the decoder runs once per image at the end",
    )
    notes: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sigma_range(self) -> MixtureConfig:
        check_sigma_range(self.sigma_min, self.sigma_max)
        return self

    @model_validator(mode="after")
    def _class_prior(self) -> MixtureConfig:
        if self.class_prior is not None:
            self.class_prior = normalised_prior(self.class_prior, len(self.class_names), self.condition)
        if self.unconditional == "prior" and self.class_prior is None:
            raise ValueError(
                "unconditional 'prior' needs class_prior (the data's class shares); or use 'null'"
            )
        return self


def normalised_prior(prior: Sequence[float], num_classes: int, condition: str) -> list[float]:
    """`prior` (C,) as shares summing to 1; a ValueError naming class_prior for anything that is not one."""
    if condition != "class_label":
        raise ValueError(f"class_prior is for condition 'class_label' only, not {condition!r}")
    if len(prior) != num_classes:
        raise ValueError(f"class_prior needs one share per class ({num_classes}), got {len(prior)}")
    if any(not 0 <= p < float("inf") for p in prior) or sum(prior) <= 0:
        raise ValueError("class_prior: shares must be finite, >= 0 and not all 0")
    total = sum(prior)
    return [p / total for p in prior]


def class_prior_of(labels: torch.Tensor, num_classes: int) -> list[float] | None:
    """The class shares (C,) of training labels (N,) int (-1 = unlabelled, not counted); None if none is
    labelled."""
    labelled = labels[labels >= 0]
    if labelled.numel() == 0:
        return None
    counts = torch.bincount(labelled, minlength=num_classes)[:num_classes].double()
    return [round(float(c), 6) for c in counts / counts.sum()]


def encoder_for(config: MixtureConfig) -> ClassLabelEncoder | None:
    """The condition encoder of a mixture: class labels one-hot, or None for an unconditional mixture."""
    return ClassLabelEncoder(config.class_names) if config.condition == "class_label" else None


@dataclass(frozen=True)
class MixtureBundle:
    """A loaded mixture directory."""

    path: Path
    config: MixtureConfig
    mixture: Mixture

    @property
    def encoder(self) -> ClassLabelEncoder | None:
        return encoder_for(self.config)


def save_gate(path: str | Path, net: LearnedGateNet, metrics: dict | None = None) -> Path:
    card = {"kind": "learned", "config": net.config.to_dict(), "metrics": metrics or {}}
    return save_artifact(path, GATE_CARD, json.dumps(card, indent=2), net)


def load_gate_net(path: str | Path) -> LearnedGateNet:
    path = Path(path)
    try:
        card = read_json(path / GATE_CARD, "gate card")
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(
            f"{e} (train it with `mode-ray train gate`, or set gate.learned to null)"
        ) from None
    try:
        cfg = dict(card["config"])
        cfg["experts"] = tuple(cfg["experts"])
        net = LearnedGateNet(LearnedGateConfig(**cfg))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"gate card {path / GATE_CARD} is invalid: {e!r}") from None
    net.load_state_dict(load_state(path / "model.safetensors", net.state_dict(), "learned gate"))
    return net.eval().requires_grad_(False)


def build_gate(spec: GateSpec, root: Path | None = None, learned: Path | None = None) -> Gate:
    """The sum of the gates `spec` enables; `learned` overrides the learned gate's directory."""
    gates: list[Gate] = []
    if spec.prototype_tau is not None:
        gates.append(PrototypeGate(spec.prototype_tau))
    if spec.noise:
        gates.append(NoiseGate())
    if learned is not None or spec.learned is not None:
        gates.append(LearnedGate(load_gate_net(learned or (root or Path(".")) / str(spec.learned))))
    if not gates:
        raise ValueError("mixture.json gate: enable at least one of prototype_tau, noise, learned")
    return gates[0] if len(gates) == 1 else SumGate(gates)


def check_gate(gate: Gate, cards: Sequence[ExpertCard]) -> None:
    """A CheckpointError unless the learned gate (if any) reads this mixture's latents and conditions."""
    card = cards[0]
    for g in getattr(gate, "gates", [gate]):
        if isinstance(g, LearnedGate):
            c = g.net.config
            if c.in_channels != card.latent_shape[0] or c.cond_dim != card.condition.dim:
                raise CheckpointError(
                    f"learned gate: it reads {c.in_channels} channels and cond_dim {c.cond_dim}; the "
                    f"experts have {card.latent_shape[0]} channels and cond_dim {card.condition.dim}"
                )


def load_mixture_decoder(
    path: Path, config: MixtureConfig, card: ExpertCard, device: str | torch.device = "cpu"
) -> LatentDecoder:
    """The decoder mixture.json names, checked against the experts' latent channels."""
    assert config.decoder is not None
    decoder = load_decoder(path / config.decoder, device)
    if decoder.latent_channels != card.latent_shape[0]:
        raise CheckpointError(
            f"decoder: it decodes {decoder.latent_channels}-channel latents; the experts' latents have "
            f"{card.latent_shape[0]} channels (latent_shape {list(card.latent_shape)})"
        )
    return decoder


def load_config(path: str | Path) -> MixtureConfig:
    path = Path(path)
    try:
        return MixtureConfig.model_validate(read_json(path / "mixture.json", "mixture config"))
    except ValidationError as e:
        raise CheckpointError(f"{path / 'mixture.json'}: {format_validation_error(e, 'mixture')}") from None


def check_condition(config: MixtureConfig, card: ExpertCard) -> None:
    """The mixture's condition must be the experts' (type and class count; for text, tokens per prompt)."""
    if config.condition == "text":
        if card.condition.type != "text" or card.condition.tokens != config.text_tokens:
            raise CheckpointError(
                f"expert {card.name!r}: condition {card.condition.type!r} with {card.condition.tokens} tokens "
                f"does not match mixture.json condition 'text' with text_tokens {config.text_tokens}"
            )
        return
    expected = 0 if config.condition == "none" else len(config.class_names)
    if card.condition.type != config.condition or (
        config.condition != "none" and card.condition.dim != expected
    ):
        raise CheckpointError(
            f"expert {card.name!r}: condition {card.condition.type!r} (dim {card.condition.dim}) does not "
            f"match mixture.json condition {config.condition!r} with {expected} classes"
        )


def load_bundle(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    experts: Sequence[str | Path] = (),
    gate: str | Path | None = None,
) -> MixtureBundle:
    """Load every expert, the gate and the config of a mixture directory.

    `experts`: extra expert directories appended after the mixture's own (as the cluster holds hot-added
    ones); `gate`: a learned gate directory used instead of mixture.json's (e.g. an extended gate).
    """
    path = Path(path)
    config = load_config(path)
    dirs = [path / "experts" / name for name in config.experts] + [Path(p) for p in experts]
    loaded: list[Expert] = [load_expert(d, device) for d in dirs]
    for e in loaded:
        check_condition(config, e.card)
    g = build_gate(config.gate, path, None if gate is None else Path(gate)).to(device)
    check_gate(g, [e.card for e in loaded])
    decoder = None if config.decoder is None else load_mixture_decoder(path, config, loaded[0].card, device)
    mixture = Mixture(loaded, g, config.top_k, config.top_p, config.min_weight, decoder)
    return MixtureBundle(path, config, mixture)

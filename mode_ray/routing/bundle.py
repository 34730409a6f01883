"""A mixture directory: `mixture.json`, `experts/<name>/`, `gate/` (learned gate), optional `classifier/`.

mixture.json   MixtureConfig: expert names, gate composition, top_k/top_p, sampling defaults
experts/<n>/   expert.json + model.safetensors (see mode_ray.models.checkpoint)
gate/          gate.json + model.safetensors (LearnedGateNet)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import save_file

from mode_ray.models.card import format_validation_error, read_json
from mode_ray.models.checkpoint import CheckpointError, Expert, load_expert, load_state
from mode_ray.models.conditions import ClassLabelEncoder
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


class GateSpec(BaseModel):
    """Which gates to sum: the prototype gate (tau), the noise gate, the learned gate (directory)."""

    model_config = ConfigDict(extra="forbid")
    prototype_tau: float | None = Field(0.1, gt=0)
    noise: bool = True
    learned: str | None = "gate"  # directory relative to the mixture directory


class MixtureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "mixture"
    experts: list[str]
    gate: GateSpec = Field(default_factory=GateSpec)
    top_k: int = Field(2, ge=1, le=16)
    top_p: float | None = Field(None, gt=0, le=1)
    sampler: Literal["euler", "ddim", "heun", "dpmpp_2m"] = "heun"
    steps: int = Field(18, ge=1, le=1000)
    guidance_scale: float = Field(2.0, ge=0, le=50)  # experts train with condition dropout
    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = Field(80.0, gt=0)
    condition: Literal["class_label", "none"] = "class_label"
    class_names: list[str] = Field(default_factory=lambda: list(ClassLabelEncoder().names))
    notes: dict = Field(default_factory=dict)


@dataclass(frozen=True)
class MixtureBundle:
    """A loaded mixture directory."""

    path: Path
    config: MixtureConfig
    mixture: Mixture
    encoder: ClassLabelEncoder


def save_gate(path: str | Path, net: LearnedGateNet, metrics: dict | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
        str(path / "model.safetensors"),
    )
    card = {"kind": "learned", "config": net.config.to_dict(), "metrics": metrics or {}}
    (path / GATE_CARD).write_text(json.dumps(card, indent=2) + "\n")
    return path


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


def build_gate(spec: GateSpec, root: Path | None = None) -> Gate:
    gates: list[Gate] = []
    if spec.prototype_tau is not None:
        gates.append(PrototypeGate(spec.prototype_tau))
    if spec.noise:
        gates.append(NoiseGate())
    if spec.learned is not None:
        gates.append(LearnedGate(load_gate_net((root or Path(".")) / spec.learned)))
    if not gates:
        raise ValueError("mixture.json gate: enable at least one of prototype_tau, noise, learned")
    return gates[0] if len(gates) == 1 else SumGate(gates)


def load_config(path: str | Path) -> MixtureConfig:
    path = Path(path)
    try:
        return MixtureConfig.model_validate(read_json(path / "mixture.json", "mixture config"))
    except ValidationError as e:
        raise CheckpointError(f"{path / 'mixture.json'}: {format_validation_error(e, 'mixture')}") from None


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> MixtureBundle:
    """Load every expert, the gate and the config of a mixture directory."""
    path = Path(path)
    config = load_config(path)
    experts: list[Expert] = [load_expert(path / "experts" / name, device) for name in config.experts]
    gate = build_gate(config.gate, path).to(device)
    mixture = Mixture(experts, gate, config.top_k, config.top_p)
    return MixtureBundle(path, config, mixture, ClassLabelEncoder(config.class_names))

"""Generation requests: validated parameters, seeded initial noise, and the in-process generation loop."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mode_ray.diffusion import karras_sigmas, make_trajectory
from mode_ray.models.conditions import ClassLabelEncoder
from mode_ray.routing.bundle import MixtureConfig
from mode_ray.routing.mixture import Mixture
from mode_ray.routing.step import StepTrace, trace_step

SamplerName = Literal["euler", "ddim", "heun", "dpmpp_2m"]


class GenerateParams(BaseModel):
    """One generation request. Unset fields take the mixture's defaults (`mixture.json`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    prompt: str | int | None = Field(None, description="class name or index, e.g. 7, 'seven', 'digit 7'")
    class_label: int | None = Field(None, alias="class", ge=0, description="class index (instead of prompt)")
    num_images: int = Field(4, ge=1, le=256)
    steps: int | None = Field(None, ge=1, le=1000)
    sampler: SamplerName | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    guidance_scale: float | None = Field(None, ge=0, le=50)
    top_k: int | None = Field(None, ge=1, le=16)
    top_p: float | None = Field(None, gt=0, le=1)
    experts: list[str] = Field(default_factory=list, description="pin routing to these experts")
    exclude_experts: list[str] = Field(default_factory=list, description="never route to these experts")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str | int | None) -> str | int | None:
        if isinstance(v, str) and not v.strip():
            raise ValueError("prompt must not be blank; omit it for unconditional generation")
        return v


@dataclass(frozen=True)
class ResolvedRequest:
    """A request with defaults applied and its label encoded. cond: (N, D) or None (unconditional)."""

    num_images: int
    steps: int
    sampler: str
    seed: int
    guidance_scale: float
    top_k: int
    top_p: float | None
    label: int | None
    cond: torch.Tensor | None
    pin: tuple[str, ...]
    exclude: tuple[str, ...]


def resolve(params: GenerateParams, config: MixtureConfig, encoder: ClassLabelEncoder) -> ResolvedRequest:
    """Apply defaults; ValueError naming the field for a prompt the encoder does not know."""
    if params.prompt is not None and params.class_label is not None:
        raise ValueError("give either prompt or class, not both")
    label = None
    if params.class_label is not None:
        if params.class_label >= encoder.dim:
            raise ValueError(f"class must be in [0, {encoder.dim - 1}], got {params.class_label}")
        label = params.class_label
    elif params.prompt is not None:
        try:
            label = encoder.label(params.prompt)
        except ValueError as e:
            raise ValueError(f"prompt: {e}") from None
    cond = None if label is None else encoder.encode([label] * params.num_images)
    return ResolvedRequest(
        num_images=params.num_images,
        steps=params.steps or config.steps,
        sampler=params.sampler or config.sampler,
        seed=params.seed if params.seed is not None else random.randrange(2**63),
        guidance_scale=config.guidance_scale if params.guidance_scale is None else params.guidance_scale,
        top_k=params.top_k or config.top_k,
        top_p=params.top_p if params.top_p is not None else config.top_p,
        label=label,
        cond=cond,
        pin=tuple(params.experts),
        exclude=tuple(params.exclude_experts),
    )


def initial_noise(seed: int, num: int, shape: tuple[int, int, int], sigma_max: float) -> torch.Tensor:
    """x_T = sigma_max * n with n ~ N(0, I) from a CPU generator seeded by `seed`: (num, C, H, W) float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((num, *shape), generator=g) * sigma_max


def schedule(req: ResolvedRequest, config: MixtureConfig) -> torch.Tensor:
    return karras_sigmas(req.steps, config.sigma_min, config.sigma_max)


def to_images(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> images in [0, 1]: (N, C, H, W) float32."""
    return ((x.float().clamp(-1, 1) + 1) / 2).cpu()


@dataclass(frozen=True)
class Generation:
    """images: (N, C, H, W) in [0, 1]; labels: requested class per image (-1 = unconditional)."""

    images: torch.Tensor
    labels: list[int]
    seed: int
    trace: list[StepTrace] = field(default_factory=list)


@torch.no_grad()
def generate_local(
    mixture: Mixture, config: MixtureConfig, encoder: ClassLabelEncoder, params: GenerateParams
) -> Generation:
    """Sample with the in-process mixture; the same seed gives identical images."""
    req = resolve(params, config, encoder)
    allowed = mixture.allowed(req.pin, req.exclude)
    shape = tuple(mixture.experts[0].card.latent_shape)
    device = mixture.device
    x = initial_noise(req.seed, req.num_images, shape, config.sigma_max).to(device)  # type: ignore[arg-type]
    cond = None if req.cond is None else req.cond.to(device)
    allowed = None if allowed is None else allowed.to(device)
    traj = make_trajectory(req.sampler, x, schedule(req, config))
    trace: list[StepTrace] = []
    evaluation = 0
    while not traj.done:
        x_eval, sigma = traj.query()
        plan = mixture.plan(x_eval, sigma, cond, req.guidance_scale, req.top_k, req.top_p, allowed)
        trace.append(trace_step(evaluation, float(sigma[0]), plan.base, mixture.names))
        traj.advance(mixture.evaluate(plan))
        evaluation += 1
    labels = [-1 if req.label is None else req.label] * req.num_images
    return Generation(to_images(traj.x), labels, req.seed, trace)

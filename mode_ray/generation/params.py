"""The parameters of one generation request, as every front end takes them (HTTP, gRPC, CLI, Python), and
their resolution against a mixture's defaults."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mode_ray.diffusion import SamplerName
from mode_ray.generation.bundle import MixtureConfig, encoder_for

DEFAULT_NUM_IMAGES = 4  # the one default of HTTP, gRPC, the CLI and the Python API
MAX_NUM_IMAGES = 256
MAX_PROMPT_CHARS = 1000
MAX_LISTED_EXPERTS = 256
ExpertName = Annotated[str, Field(min_length=1, max_length=128)]


class GenerateParams(BaseModel):
    """One generation request. Unset fields take the mixture's defaults (`mixture.json`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)
    prompt: str | int | None = Field(
        None, description="class name or index, e.g. 7, 'seven', 'digit 7'; free text for a text mixture"
    )
    class_label: int | None = Field(None, alias="class", ge=0, description="class index (instead of prompt)")
    num_images: int = Field(DEFAULT_NUM_IMAGES, ge=1, le=MAX_NUM_IMAGES)
    steps: int | None = Field(None, ge=1, le=1000)
    sampler: SamplerName | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    guidance_scale: float | None = Field(None, ge=0, le=50)
    top_k: int | None = Field(None, ge=1, le=16)
    top_p: float | None = Field(None, gt=0, le=1)
    min_weight: float | None = Field(
        None, ge=0, lt=1, description="weight floor: chosen experts below this weight are not evaluated"
    )
    experts: list[ExpertName] = Field(
        default_factory=list, max_length=MAX_LISTED_EXPERTS, description="pin routing to these experts"
    )
    exclude_experts: list[ExpertName] = Field(
        default_factory=list, max_length=MAX_LISTED_EXPERTS, description="never route to these experts"
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str | int | None) -> str | int | None:
        if isinstance(v, str) and not v.strip():
            raise ValueError("prompt must not be blank; omit it for unconditional generation")
        if isinstance(v, str) and len(v) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(v)}")
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate (JSON "\ud800"): not text any encoder can read
                raise ValueError(
                    f"prompt must be valid Unicode text; character {e.start} is a lone surrogate"
                ) from None
        return v


@dataclass(frozen=True)
class ResolvedRequest:
    """A request with the mixture's defaults applied and its prompt encoded. cond: (N, D), packed text
    (N, 1 + L, D), or None."""

    num_images: int
    steps: int
    sampler: str
    seed: int
    guidance_scale: float
    top_k: int
    top_p: float | None
    min_weight: float | None
    label: int | None
    cond: torch.Tensor | None
    pin: tuple[str, ...]
    exclude: tuple[str, ...]


def resolve(params: GenerateParams, config: MixtureConfig) -> ResolvedRequest:
    """Apply defaults; a ValueError naming the field for a prompt the mixture's encoder does not know."""
    if params.prompt is not None and params.class_label is not None:
        raise ValueError("give either prompt or class, not both")
    if config.condition == "text":
        return _resolved(params, config, None, _text_cond(params, config))
    encoder = encoder_for(config)
    label = None
    if (params.prompt is not None or params.class_label is not None) and encoder is None:
        field = "prompt" if params.prompt is not None else "class"
        raise ValueError(f"{field}: mixture {config.name!r} is unconditional (condition 'none'); omit it")
    if params.class_label is not None:
        assert encoder is not None
        if params.class_label >= encoder.dim:
            raise ValueError(f"class must be in [0, {encoder.dim - 1}], got {params.class_label}")
        label = params.class_label
    elif params.prompt is not None:
        assert encoder is not None
        try:
            label = encoder.label(params.prompt)
        except ValueError as e:
            raise ValueError(f"prompt: {e}") from None
    cond = None if label is None or encoder is None else encoder.encode([label] * params.num_images)
    return _resolved(params, config, label, cond)


def _text_cond(params: GenerateParams, config: MixtureConfig) -> torch.Tensor | None:
    """The packed text condition (N, 1 + L, D) of a text mixture's prompt, encoded once per request."""
    if params.class_label is not None:
        raise ValueError(f"class: mixture {config.name!r} takes free-text prompts; give `prompt` instead")
    if params.prompt is None:
        return None
    from mode_ray.models.text import shared_encoder

    cond = shared_encoder(config.text_tokens).encode_one(str(params.prompt))  # (1, 1 + L, D)
    return cond.expand(params.num_images, *cond.shape[1:]).contiguous()


def _resolved(
    params: GenerateParams, config: MixtureConfig, label: int | None, cond: torch.Tensor | None
) -> ResolvedRequest:
    return ResolvedRequest(
        num_images=params.num_images,
        steps=params.steps or config.steps,
        sampler=params.sampler or config.sampler,
        seed=params.seed if params.seed is not None else random.randrange(2**63),
        guidance_scale=config.guidance_scale if params.guidance_scale is None else params.guidance_scale,
        top_k=params.top_k or config.top_k,
        top_p=params.top_p if params.top_p is not None else config.top_p,
        min_weight=params.min_weight if params.min_weight is not None else config.min_weight,
        label=label,
        cond=cond,
        pin=tuple(params.experts),
        exclude=tuple(params.exclude_experts),
    )

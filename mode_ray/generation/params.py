"""The parameters of one generation request, as every front end takes them (HTTP, gRPC, CLI, Python), and
their resolution against a mixture's defaults."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
from pydantic import ConfigDict, Field, field_validator

from mode_ray.diffusion import SamplerName
from mode_ray.generation.bundle import MixtureConfig, UnconditionalMode, encoder_for
from mode_ray.models.strict import NoBooleanNumbers

DEFAULT_NUM_IMAGES = 4  # the one default of HTTP, gRPC, the CLI and the Python API
MAX_NUM_IMAGES = 256
MAX_PROMPT_CHARS = 1000
MAX_LISTED_EXPERTS = 256
LABEL_STREAM = 0x1ABE1  # the classes drawn under unconditional='prior' come from rng([LABEL_STREAM, seed])
ExpertName = Annotated[str, Field(min_length=1, max_length=128)]


class GenerateParams(NoBooleanNumbers):
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
    unconditional: UnconditionalMode | None = Field(
        None,
        description="without prompt or class: 'prior' draws each image's class from the data's shares, "
        "'null' samples the null condition; default: the mixture's",
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
    """A request with the mixture's defaults applied and its prompt encoded. labels: (N,) class per image
    (the requested one, or drawn from the class prior), None for the null condition and for text; cond:
    (N, D), packed text (N, 1 + L, D), or None."""

    num_images: int
    steps: int
    sampler: str
    seed: int
    guidance_scale: float
    top_k: int
    top_p: float | None
    min_weight: float | None
    labels: tuple[int, ...] | None
    cond: torch.Tensor | None
    pin: tuple[str, ...]
    exclude: tuple[str, ...]


def resolve(params: GenerateParams, config: MixtureConfig) -> ResolvedRequest:
    """Apply defaults; a ValueError naming the field for a prompt the mixture's encoder does not know."""
    if params.prompt is not None and params.class_label is not None:
        raise ValueError("give either prompt or class, not both")
    conditioned = params.prompt is not None or params.class_label is not None
    if conditioned and params.unconditional is not None:
        raise ValueError("unconditional: only for requests without prompt or class; omit one of them")
    seed = params.seed if params.seed is not None else random.randrange(2**63)
    if config.condition == "text":
        if params.unconditional == "prior":
            raise ValueError(
                f"unconditional: mixture {config.name!r} takes text, it has no class prior; use 'null'"
            )
        return _resolved(params, config, seed, None, _text_cond(params, config))
    encoder = encoder_for(config)
    if conditioned and encoder is None:
        field = "prompt" if params.prompt is not None else "class"
        raise ValueError(f"{field}: mixture {config.name!r} is unconditional (condition 'none'); omit it")
    label = None
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
    if label is not None:
        labels: tuple[int, ...] | None = (label,) * params.num_images
    elif (params.unconditional or config.unconditional) == "prior":
        if config.class_prior is None:
            raise ValueError(f"unconditional: mixture {config.name!r} has no class_prior; use 'null'")
        labels = draw_labels(config.class_prior, params.num_images, seed)
    else:
        labels = None
    cond = None if labels is None or encoder is None else encoder.encode(list(labels))
    return _resolved(params, config, seed, labels, cond)


def draw_labels(prior: list[float], num: int, seed: int) -> tuple[int, ...]:
    """`num` classes c ~ p(c) = `prior` (C,), i.i.d., from a stream of `seed` that the initial noise does not use."""
    rng = np.random.default_rng([LABEL_STREAM, seed])
    return tuple(int(c) for c in rng.choice(len(prior), size=num, p=np.asarray(prior, dtype=np.float64)))


def _text_cond(params: GenerateParams, config: MixtureConfig) -> torch.Tensor | None:
    """The packed text condition (N, 1 + L, D) of a text mixture's prompt, encoded once per request."""
    if params.class_label is not None:
        raise ValueError(f"class: mixture {config.name!r} takes free-text prompts; give `prompt` instead")
    if params.prompt is None:
        return None
    from mode_ray.models.text import shared_encoder

    cond = shared_encoder(config.text_tokens, config.text_precision).encode_one(
        str(params.prompt)
    )  # (1, 1 + L, D)
    return cond.expand(params.num_images, *cond.shape[1:]).contiguous()


def _resolved(
    params: GenerateParams,
    config: MixtureConfig,
    seed: int,
    labels: tuple[int, ...] | None,
    cond: torch.Tensor | None,
) -> ResolvedRequest:
    return ResolvedRequest(
        num_images=params.num_images,
        steps=params.steps or config.steps,
        sampler=params.sampler or config.sampler,
        seed=seed,
        guidance_scale=config.guidance_scale if params.guidance_scale is None else params.guidance_scale,
        top_k=params.top_k or config.top_k,
        top_p=params.top_p if params.top_p is not None else config.top_p,
        min_weight=params.min_weight if params.min_weight is not None else config.min_weight,
        labels=labels,
        cond=cond,
        pin=tuple(params.experts),
        exclude=tuple(params.exclude_experts),
    )

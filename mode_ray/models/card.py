"""The expert card (`expert.json`): everything needed to build, validate and route to an expert."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from mode_ray.models.strict import NoBooleanNumbers

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"


class Parametrization(NoBooleanNumbers):
    """How the expert's network is parametrised inside; the expert always *exposes* EDM x0_hat."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["edm", "ddpm"] = "edm"
    sigma_data: float = Field(0.5, gt=0)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None  # ddpm only
    scheduler_config: dict[str, Any] | None = None  # ddpm only: a diffusers DDPMScheduler config

    @model_validator(mode="after")
    def _ddpm_fields(self) -> Parametrization:
        if self.kind == "ddpm" and (self.prediction_type is None or self.scheduler_config is None):
            raise ValueError("a 'ddpm' parametrization needs prediction_type and scheduler_config")
        return self


ConditionType = Literal["class_label", "text", "none"]
Backbone = Literal["unet", "dit", "diffusers_unet2d", "diffusers_unet2d_condition", "diffusers_dit"]
DIFFUSERS_BACKBONES = ("diffusers_unet2d", "diffusers_unet2d_condition", "diffusers_dit")


class Condition(NoBooleanNumbers):
    """What an expert is conditioned on. `class_label`: one-hot rows (B, D). `text`: a sentence encoder's
    pooled embedding (B, D) and, when `tokens` > 0, its token embeddings packed beside it as (B, 1 + L, D)
    (see mode_ray.models.conditions). The all-zeros condition is the null condition in both."""

    model_config = ConfigDict(extra="forbid")
    type: ConditionType = "class_label"
    dim: int = Field(10, ge=0, le=4096)
    names: list[str] = Field(default_factory=list)
    tokens: int = Field(
        0, ge=0, le=512, description="L: token embeddings per prompt (text only; 0: pooled only)"
    )
    encoder: str | None = Field(None, max_length=200, description="the text encoder, e.g. 'all-MiniLM-L6-v2'")

    @model_validator(mode="after")
    def _tokens_need_text(self) -> Condition:
        if self.tokens and self.type != "text":
            raise ValueError(
                f"condition.tokens: only a 'text' condition has tokens, this one is {self.type!r}"
            )
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one row's condition: () without one, (D,) pooled, (1 + L, D) with tokens."""
        if self.type == "none" or self.dim == 0:
            return ()
        return (1 + self.tokens, self.dim) if self.tokens else (self.dim,)


class DataSummary(NoBooleanNumbers):
    model_config = ConfigDict(extra="allow")
    dataset: str = "mnist"
    partition: str = "all"  # e.g. "labels:0,6" or "kmeans:4:2" (k clusters, cluster index)
    num_examples: int = Field(0, ge=0)
    label_counts: dict[str, int] = Field(default_factory=dict)


class ExpertCard(NoBooleanNumbers):
    """Card of one expert. Every expert of one mixture shares `formulation`, `latent_shape` and `condition`."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    version: str = "1"
    backbone: Backbone = "unet"
    backbone_config: dict[str, Any]
    formulation: Literal["edm"] = "edm"
    parametrization: Parametrization = Field(default_factory=Parametrization)
    latent_shape: tuple[int, int, int]
    condition: Condition = Field(default_factory=Condition)
    prototype: list[float] | None = None  # mean condition embedding of the training data, (D,)
    sigma_interval: tuple[float, float] | None = None  # the noise gate routes here only inside it
    guidance_dropout: float = Field(0.0, ge=0, le=1)  # condition dropout used in training (CFG ready if > 0)
    parameters: int = Field(0, ge=0)
    data: DataSummary = Field(default_factory=DataSummary)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @field_validator("latent_shape")
    @classmethod
    def _positive_shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(d < 1 for d in v):
            raise ValueError(f"latent_shape must be positive (C, H, W), got {list(v)}")
        return v

    @field_validator("prototype")
    @classmethod
    def _finite_prototype(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(math.isfinite(p) for p in v):
            raise ValueError("prototype must hold finite numbers (no NaN or inf)")
        return v

    @field_validator("sigma_interval")
    @classmethod
    def _interval(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (math.isfinite(v[0]) and not math.isnan(v[1]) and 0 <= v[0] < v[1]):
            raise ValueError(f"sigma_interval must be [lo, hi] with 0 <= lo < hi, got {list(v)}")
        return v

    @field_serializer("sigma_interval", when_used="json")
    def _interval_json(self, v: tuple[float, float] | None) -> list[float | str] | None:
        """[lo, inf) as [lo, "Infinity"]: JSON has no inf (pydantic would write null, Starlette refuse it)."""
        return None if v is None else [x if math.isfinite(x) else "Infinity" for x in v]

    @model_validator(mode="after")
    def _prototype_dim(self) -> ExpertCard:
        if self.prototype is not None and len(self.prototype) != self.condition.dim:
            raise ValueError(
                f"prototype has {len(self.prototype)} values, condition.dim is {self.condition.dim}"
            )
        return self

    @model_validator(mode="after")
    def _parametrization_fits_backbone(self) -> ExpertCard:
        expected = "ddpm" if self.backbone in DIFFUSERS_BACKBONES else "edm"
        if self.parametrization.kind != expected:
            raise ValueError(
                f"parametrization.kind: a {self.backbone!r} backbone needs {expected!r}, "
                f"got {self.parametrization.kind!r}"
            )
        return self

    @classmethod
    def load(cls, path: Path) -> ExpertCard:
        return cls.model_validate(read_json(path, cls.__name__))

    def compatible_with(self, other: ExpertCard) -> None:
        """Raise ValueError naming the field unless `other` can join a mixture with this expert: the same
        formulation, latent shape and condition (for text: type, dim, tokens, and the encoder where both
        name one; an imported expert without class names joins experts with them)."""
        for field in ("formulation", "latent_shape", "condition"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if field == "condition" and mine.type == "text":
                keys = ["type", "dim", "tokens"] + (["encoder"] if mine.encoder and theirs.encoder else [])
                mine, theirs = ({k: getattr(c, k) for k in keys} for c in (mine, theirs))
            if mine != theirs:
                raise ValueError(
                    f"expert {other.name!r}: {field} {theirs!r} differs from the mixture's {mine!r}"
                )


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object with errors that name the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{what}: {path} nests JSON arrays or objects too deeply to read") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def shown(value: Any, limit: int = 80) -> str:
    """repr(value) for an error message, cut to `limit` characters (never echo a huge input back)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 12]}... ({len(text)} chars)"


def format_validation_error(e: ValidationError, where: str) -> str:
    """One line per field: `where.field: message (got value)`."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        got = f" (got {shown(err['input'])})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"{where}.{loc}: {err['msg']}{got}")
    return "; ".join(lines)

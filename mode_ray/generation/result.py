"""The result of one generation, the one type every layer hands on: `generate_local`, the router's engine,
the ingress (HTTP JSON / PNG, gRPC) and the Python client (`mode_ray.client`), with its JSON form."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mode_ray.generation.images import png_bytes


@dataclass(frozen=True)
class StepTrace:
    """Routing of one evaluation: per row, the chosen experts' names and weights, and the dropped mass."""

    step: int
    sigma: float
    experts: list[list[str]]
    weights: list[list[float]]
    dropped: list[float]

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "sigma": self.sigma,
            "experts": self.experts,
            "weights": self.weights,
            "dropped": self.dropped,
        }

    @classmethod
    def from_dict(cls, d: dict) -> StepTrace:
        return cls(d["step"], d["sigma"], d["experts"], d["weights"], d["dropped"])


@dataclass(frozen=True)
class Progress:
    """One evaluation done (streamed by GenerateStream): `step` of `total` sampler steps, at `sigma`."""

    step: int
    total: int
    sigma: float


@dataclass(frozen=True)
class GenerationResult:
    """images: (N, C, H, W) float32 in [0, 1]; labels: requested class per image (-1 = unconditional);
    trace: one StepTrace per evaluation; dropped_mass: routing weight lost to failed experts.
    request_id, registry_version and seconds are set by the cluster ('' / None / 0 in-process); timing, when
    asked for, holds the served time breakdown of each evaluation's tick (ms per phase, see the engine)."""

    images: torch.Tensor
    labels: list[int]
    seed: int
    trace: list[StepTrace] = field(default_factory=list)
    dropped_mass: float = 0.0
    request_id: str = ""
    registry_version: int | None = None
    seconds: float = 0.0
    timing: list[dict] | None = None

    def png(self, nrow: int | None = None) -> bytes:
        return png_bytes(self.images, nrow)

    def raw(self) -> np.ndarray:
        """The images as a C-contiguous little-endian float32 array (N, C, H, W)."""
        return np.ascontiguousarray(self.images.numpy().astype("<f4"))

    def to_json(self) -> dict[str, Any]:
        """The `output: json` body of POST /v1/generate: base64 float32 images, a PNG grid and the trace."""
        arr = self.raw()
        return {
            "request_id": self.request_id,
            "seed": self.seed,
            "labels": self.labels,
            "shape": list(arr.shape),
            "dtype": "float32",
            "images": base64.b64encode(arr.tobytes()).decode(),
            "png": base64.b64encode(self.png()).decode(),
            "trace": [t.to_dict() for t in self.trace],
            "dropped_mass": self.dropped_mass,
            "registry_version": self.registry_version,
            "seconds": self.seconds,
            **({} if self.timing is None else {"timing": self.timing}),
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> GenerationResult:
        arr = np.frombuffer(base64.b64decode(body["images"]), dtype="<f4").reshape(body["shape"]).copy()
        return cls(
            images=torch.from_numpy(arr),
            labels=list(body["labels"]),
            seed=int(body["seed"]),
            trace=[StepTrace.from_dict(t) for t in body["trace"]],
            dropped_mass=float(body.get("dropped_mass", 0.0)),
            request_id=body.get("request_id", ""),
            registry_version=body.get("registry_version"),
            seconds=float(body.get("seconds", 0.0)),
            timing=body.get("timing"),
        )

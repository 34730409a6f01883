"""The result of one generation, the one type every layer hands on: `generate_local`, the router's engine,
the ingress (HTTP JSON / PNG, gRPC) and the Python client (`mode_ray.client`), with its JSON form."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch

from mode_ray.generation.images import heatmap_png, png_bytes

TraceMode = Literal["auto", "full", "summary", "none"]
MAX_FULL_TRACE_ROWS = 16_384  # "auto": a full trace up to this many image-evaluations, else the summary


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

    def summary(self) -> StepTrace:
        """One row standing for all: each expert's routing weight averaged over the rows (0 where a row did
        not choose it), heaviest first, and the mean dropped mass. Its size does not grow with the images."""
        n = max(1, len(self.experts))
        total: dict[str, float] = {}
        for names, weights in zip(self.experts, self.weights, strict=True):
            for name, w in zip(names, weights, strict=True):
                total[name] = total.get(name, 0.0) + w
        ranked = sorted(total.items(), key=lambda kv: -kv[1])
        return StepTrace(
            self.step,
            self.sigma,
            [[k for k, _ in ranked]],
            [[round(v / n, 6) for _, v in ranked]],
            [round(sum(self.dropped) / n, 6)],
        )


@dataclass(frozen=True)
class Progress:
    """One evaluation done (streamed by GenerateStream): `step` of `total` sampler steps, at `sigma`."""

    step: int
    total: int
    sigma: float


@dataclass(frozen=True)
class GenerationResult:
    """images: (N, C, H, W) float32 in [0, 1]; labels: class per image, requested or drawn from the class
    prior (-1 = null condition); trace: one StepTrace per evaluation; dropped_mass: routing weight lost to
    failed experts.
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
    trace_mode: str = "full"  # "full": one trace row per image; "summary": one averaged row; "none"
    attempts: int = 1  # router replicas it ran on: > 1 when one died under it and it was run again
    cold_starts: dict[str, float] = field(default_factory=dict)  # expert -> seconds a call waited for its
    # replica to start (an expert scaled to zero, or one whose replicas were all lost)
    latents: torch.Tensor | None = None  # a latent mixture's x0 (N, c, h, w), float32; `images` decode it

    def decoded(self, decoder: Callable[[torch.Tensor], torch.Tensor]) -> GenerationResult:
        """This result with `images` = the decoder's images of `latents` (in [-1, 1], mapped to [0, 1])."""
        assert self.latents is not None, "only a latent mixture's result has latents to decode"
        return self.with_decoded(decoder(self.latents))

    def with_decoded(self, decoded: torch.Tensor) -> GenerationResult:
        """This result with `images` = `decoded` (N, C, H, W), a decoder's output in about [-1, 1], mapped
        to [0, 1]."""
        return replace(self, images=((decoded.float().clamp(-1, 1) + 1) / 2).cpu())

    def with_trace(self, mode: TraceMode) -> GenerationResult:
        """This result with its trace as asked: "full", "summary" (`StepTrace.summary` per evaluation), "none",
        or "auto" (full up to MAX_FULL_TRACE_ROWS image-evaluations, so a 256-image x 1000-step trace does not
        break a client's message size limit, else the summary)."""
        if mode == "auto":
            mode = "full" if len(self.labels) * len(self.trace) <= MAX_FULL_TRACE_ROWS else "summary"
        if mode == self.trace_mode or self.trace_mode != "full":
            return self
        trace = [] if mode == "none" else [t.summary() for t in self.trace]
        return replace(self, trace=trace, trace_mode=mode)

    def png(self, nrow: int | None = None, scale: int = 1, labels: list[str] | None = None) -> bytes:
        return png_bytes(self.images, nrow, scale, labels)

    def routing(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The routing as a matrix: the experts (heaviest first), their weight at each evaluation averaged over
        the images (E, S), and the mean dropped mass at each evaluation (S,)."""
        steps = [t.summary() if len(t.experts) > 1 else t for t in self.trace]
        total: dict[str, float] = {}
        for t in steps:
            for name, w in zip(t.experts[0], t.weights[0], strict=True):
                total[name] = total.get(name, 0.0) + w
        names = sorted(total, key=lambda n: -total[n])
        weights = np.zeros((len(names), len(steps)), np.float32)
        for j, t in enumerate(steps):
            for name, w in zip(t.experts[0], t.weights[0], strict=True):
                weights[names.index(name), j] = w
        dropped = np.asarray([t.dropped[0] if t.dropped else 0.0 for t in steps], np.float32)
        return names, weights, dropped

    def routing_png(self) -> bytes:
        """The routing heatmap (experts x evaluations, colour = weight; dropped mass in the last row)."""
        return heatmap_png(*self.routing())

    def raw(self) -> np.ndarray:
        """The images as a C-contiguous little-endian float32 array (N, C, H, W)."""
        return np.ascontiguousarray(self.images.numpy().astype("<f4"))

    def raw_latents(self) -> np.ndarray:
        """A latent mixture's latents as a C-contiguous little-endian float32 array (N, c, h, w)."""
        assert self.latents is not None, "only a latent mixture's result has latents"
        return np.ascontiguousarray(self.latents.numpy().astype("<f4"))

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
            "trace_mode": self.trace_mode,
            "attempts": self.attempts,
            "cold_starts": self.cold_starts,
            "dropped_mass": self.dropped_mass,
            "registry_version": self.registry_version,
            "seconds": self.seconds,
            **({} if self.timing is None else {"timing": self.timing}),
            **({} if self.latents is None else _latents_json(self.raw_latents())),
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
            trace_mode=body.get("trace_mode", "full"),
            attempts=int(body.get("attempts", 1)),
            cold_starts={str(k): float(v) for k, v in body.get("cold_starts", {}).items()},
            latents=_latents_of(body),
        )


def _latents_json(arr: np.ndarray) -> dict[str, Any]:
    return {"latents": base64.b64encode(arr.tobytes()).decode(), "latent_shape": list(arr.shape)}


def _latents_of(body: dict[str, Any]) -> torch.Tensor | None:
    if "latents" not in body:
        return None
    raw = np.frombuffer(base64.b64decode(body["latents"]), dtype="<f4")
    return torch.from_numpy(raw.reshape(body["latent_shape"]).copy())


def merge_results(parts: list[GenerationResult]) -> GenerationResult:
    """The result of a request run as slices of its images (`RequestState.split`), in slice order: images and
    labels concatenated, every evaluation's trace rows joined (the slices share steps and sigmas), dropped
    mass summed. The first part's request id, version, seconds and timing stand for the whole."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    trace = [
        StepTrace(
            steps[0].step,
            steps[0].sigma,
            [row for t in steps for row in t.experts],
            [row for t in steps for row in t.weights],
            [d for t in steps for d in t.dropped],
        )
        for steps in zip(*(p.trace for p in parts), strict=True)
    ]
    return GenerationResult(
        images=torch.cat([p.images for p in parts]),
        labels=[label for p in parts for label in p.labels],
        seed=first.seed,
        trace=trace,
        dropped_mass=round(sum(p.dropped_mass for p in parts), 6),
        request_id=first.request_id,
        registry_version=first.registry_version,
        seconds=first.seconds,
        timing=first.timing,
        latents=None if first.latents is None else torch.cat([p.latents for p in parts]),  # type: ignore[misc]
    )

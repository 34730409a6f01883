"""Evaluation of a mixture (or a dense one-expert mixture): held-out denoising loss per sigma bucket,
class-conditional accuracy judged by the project's classifier, and a classifier-feature FID."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mode_ray.diffusion import edm_loss
from mode_ray.generation import GenerateParams, generate_local
from mode_ray.generation.bundle import MixtureBundle
from mode_ray.models.conditions import one_hot
from mode_ray.models.flops import forward_flops
from mode_ray.routing.gates import LearnedGate
from mode_ray.train.classifier import Classifier
from mode_ray.train.data import Dataset
from mode_ray.train.partitions import PartitionSpec

SIGMA_BUCKETS = ((0.002, 0.02), (0.02, 0.2), (0.2, 2.0), (2.0, 20.0), (20.0, 80.0))


@dataclass(frozen=True)
class EvalResult:
    name: str
    accuracy: float
    fid: float
    loss_by_sigma: dict[str, float]
    active_params: int
    total_params: int
    seconds_per_image: float
    num_samples: int
    sampler: str
    steps: int
    guidance_scale: float
    top_k: int
    min_weight: float | None = None
    expert_rows_per_image: float = (
        0.0  # expert forward rows per image: every chosen expert, both guidance branches
    )
    top_p: float | None = None
    gflops_per_image: float = (
        0.0  # counted forward GFLOPs per image: every evaluated expert and the gate, both branches
    )


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between feature sets a: (N, F) and b: (M, F) in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    mid = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * mid)


def bootstrap_fid(
    a: torch.Tensor, b: torch.Tensor, rounds: int = 200, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """FID of features a: (N, F) against b: (M, F) and a bootstrap interval at `level` for its sampling
    spread: both sets resampled with replacement `rounds` times, the resampled FIDs' quantiles shifted so that
    their mean is the estimate. (A resample repeats points, which shrinks its covariances and adds a near-
    constant bias to its FID: the raw percentiles can miss the estimate altogether, and the pivotal interval
    would subtract that bias twice.) Returns (fid, low, high)."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.tensor(
        [
            frechet_distance(
                a[torch.randint(len(a), (len(a),), generator=g)],
                b[torch.randint(len(b), (len(b),), generator=g)],
            )
            for _ in range(rounds)
        ]
    )
    tail = (1 - level) / 2
    q_low, q_high = torch.quantile(
        draws.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64)
    ).tolist()
    fid = frechet_distance(a, b)
    shift = fid - float(draws.double().mean())
    return fid, max(0.0, q_low + shift), q_high + shift


def noise_by_bucket(x0: torch.Tensor, g: torch.Generator) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Per SIGMA_BUCKETS entry: its name, sigma (N,) log-uniform inside it, and noise shaped like x0 (N, ...)."""
    n = x0.shape[0]
    for lo, hi in SIGMA_BUCKETS:
        sigma = torch.exp(torch.empty(n).uniform_(math.log(lo), math.log(hi), generator=g))
        yield f"{lo:g}-{hi:g}", sigma, torch.randn(x0.shape, generator=g)


@torch.no_grad()
def denoising_loss_by_sigma(
    bundle: MixtureBundle, test: Dataset, n: int = 512, seed: int = 0
) -> dict[str, float]:
    """Mean EDM-weighted loss of the routed mixture on n held-out images, per log-uniform sigma bucket."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(test), generator=g)[:n]
    x0, cond = test.images[idx], _conditions(bundle, test.labels[idx])
    return {
        bucket: round(float(edm_loss(bundle.mixture, x0, sigma, cond, noise).mean()), 5)
        for bucket, sigma, noise in noise_by_bucket(x0, g)
    }


def _conditions(bundle: MixtureBundle, labels: torch.Tensor) -> torch.Tensor:
    """The condition of each label: one-hot, or for a text mixture its DEFAULT_TEMPLATE caption encoded."""
    if bundle.config.condition != "text":
        return one_hot(labels, bundle.encoder.dim)
    from mode_ray.models.text import shared_encoder

    return shared_encoder(bundle.config.text_tokens, bundle.config.text_precision).encode(
        [prompt_for(bundle, int(y)) for y in labels]
    )


def prompt_for(bundle: MixtureBundle, label: int, template: str | None = None) -> str | int:
    """The prompt that asks `bundle` for class `label`: the index, or for a text mixture the caption of
    `template` (default DEFAULT_TEMPLATE) with the neutral attributes."""
    if bundle.config.condition != "text":
        return label
    from mode_ray.train.captions import DEFAULT_TEMPLATE, caption

    return caption(template or DEFAULT_TEMPLATE, label)


def num_classes(bundle: MixtureBundle) -> int:
    """Classes the evaluation asks for: the class names of the mixture (the digits for a text one)."""
    return len(bundle.config.class_names)


@torch.no_grad()
def evaluate(
    bundle: MixtureBundle,
    classifier: Classifier,
    test: Dataset,
    num_samples: int = 1000,
    steps: int | None = None,
    sampler: str | None = None,
    guidance_scale: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
    batch: int = 100,
    min_weight: float | None = None,
    template: str | None = None,
    top_p: float | None = None,
    reference: torch.Tensor | None = None,
) -> tuple[EvalResult, torch.Tensor, torch.Tensor]:
    """Returns the result, the generated images (N, C, H, W) in [0, 1] and their requested labels (N,).
    template: for a text mixture, the caption template of the prompts (mode_ray.train.captions).
    reference: the real images (M, C, H, W) in [-1, 1] the FID compares with (default: the first
    max(N, 2000) of `test`)."""
    if bundle.config.condition == "none":
        raise ValueError(f"eval needs a conditional mixture; {bundle.config.name!r} is unconditional")
    classes = num_classes(bundle)
    per_class = max(1, num_samples // classes)
    images, labels, seconds, expert_rows = [], [], 0.0, 0
    row_flops = inference_flops(bundle)
    flops = 0
    for c in range(classes):
        for start in range(0, per_class, batch):
            n = min(batch, per_class - start)
            params = GenerateParams(
                prompt=prompt_for(bundle, c, template),
                num_images=n,
                steps=steps,
                sampler=sampler,
                seed=seed * 7919 + c * 104729 + start,
                guidance_scale=guidance_scale,
                top_k=top_k,
                min_weight=min_weight,
                top_p=top_p,
            )
            t0 = time.perf_counter()
            gen = generate_local(bundle.mixture, bundle.config, params)
            seconds += time.perf_counter() - t0
            scale = bundle.config.guidance_scale if guidance_scale is None else guidance_scale
            branches = (
                1 if scale == 1.0 else 2
            )  # the guided null-condition rows run beside the conditional ones
            expert_rows += branches * sum(len(row) for t in gen.trace for row in t.experts)
            flops += branches * sum(
                row_flops["gate"] + sum(row_flops[e] for e in row) for t in gen.trace for row in t.experts
            )
            images.append(gen.images)
            labels += [c] * n
    x = torch.cat(images)  # (N, C, H, W) in [0, 1]
    y = torch.tensor(labels)
    model_in = x * 2 - 1
    accuracy = float((classifier(model_in).argmax(1) == y).float().mean())
    if reference is None:
        reference = test.images[: max(len(x), 2000)]
    fid = frechet_distance(classifier.features(model_in), classifier.features(reference))
    k = top_k or bundle.config.top_k
    sizes = sorted((sum(p.numel() for p in d.parameters()) for d in bundle.mixture.denoisers), reverse=True)
    result = EvalResult(
        name=bundle.config.name,
        accuracy=round(accuracy, 4),
        fid=round(fid, 3),
        loss_by_sigma=denoising_loss_by_sigma(bundle, test),
        active_params=sum(sizes[:k]),
        total_params=sum(sizes),
        seconds_per_image=round(seconds / len(x), 4),
        num_samples=len(x),
        sampler=sampler or bundle.config.sampler,
        steps=steps or bundle.config.steps,
        guidance_scale=bundle.config.guidance_scale if guidance_scale is None else guidance_scale,
        top_k=min(k, len(sizes)),
        min_weight=bundle.config.min_weight if min_weight is None else min_weight,
        expert_rows_per_image=round(expert_rows / len(x), 2),
        top_p=bundle.config.top_p if top_p is None else top_p,
        gflops_per_image=round(flops / len(x) / 1e9, 4),
    )
    return result, x, y


def inference_flops(bundle: MixtureBundle) -> dict[str, int]:
    """Forward FLOPs of one row (mode_ray.models.flops): each expert by name, and "gate" for the gate
    (prototype, noise and learned gates together), which scores every row at every evaluation."""
    mixture, card = bundle.mixture, bundle.mixture.cards[0]
    shape, cond_shape = tuple(card.latent_shape), card.condition.shape
    out = {
        c.name: forward_flops(d, shape, cond_shape)
        for c, d in zip(mixture.cards, mixture.denoisers, strict=True)
    }
    out["gate"] = forward_flops(mixture.logits, shape, cond_shape)
    return out


def markdown_table(results: list[EvalResult]) -> str:
    buckets = list(results[0].loss_by_sigma)
    head = [
        "model",
        "top-k",
        "active params",
        "total params",
        "accuracy",
        "classifier-FID",
        "s/image",
        "expert rows/image",
        *[f"loss σ∈{b}" for b in buckets],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [
            r.name,
            str(r.top_k),
            f"{r.active_params / 1e6:.2f}M",
            f"{r.total_params / 1e6:.2f}M",
            f"{100 * r.accuracy:.1f}%",
            f"{r.fid:.2f}",
            f"{r.seconds_per_image:.3f}",
            f"{r.expert_rows_per_image:.1f}",
            *[f"{r.loss_by_sigma[b]:.4f}" for b in buckets],
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def gate_accuracy_by_sigma(
    bundle: MixtureBundle, test: Dataset, n: int = 2000, seed: int = 0
) -> dict[str, float]:
    """How often the learned gate alone, without the condition, names the expert whose label group holds a
    held-out image, per sigma bucket: its estimate of p(k | x, sigma) over the bundle's experts (an expert
    the gate was not trained on is never named: the gate abstains for it). Needs label-group experts."""
    gate = bundle.mixture.gate
    learned = next((g for g in getattr(gate, "gates", [gate]) if isinstance(g, LearnedGate)), None)
    if learned is None:
        raise ValueError(f"mixture {bundle.config.name!r} has no learned gate")
    cards = bundle.mixture.cards
    owner = torch.full((int(test.labels.max()) + 1,), -1)
    for k, card in enumerate(cards):
        spec = PartitionSpec.parse(card.data.partition)
        if spec.kind != "labels":
            raise ValueError(f"expert {card.name!r} is not a label-group expert ({card.data.partition!r})")
        owner[list(spec.groups[0])] = k
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(test), generator=g)[:n]
    idx = idx[owner[test.labels[idx]] >= 0]  # images some expert holds
    x0, target = test.images[idx], owner[test.labels[idx]]
    out = {}
    for bucket, sigma, noise in noise_by_bucket(x0, g):
        x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
        out[bucket] = round(float((learned(x, sigma, None, cards).argmax(1) == target).float().mean()), 4)
    return out


@torch.no_grad()
def classifier_accuracy(classifier: Classifier, data: Dataset) -> float:
    return round(float((classifier(data.images).argmax(1) == data.labels).float().mean()), 4)


@torch.no_grad()
def reference_fid(classifier: Classifier, train: Dataset, test: Dataset, n: int = 1000) -> float:
    """FID between n real training images (class-balanced, like the generated sets) and the same test
    images the models are compared with: what a generator drawing real data would score at this n."""
    classes = int(train.labels.max()) + 1
    per_class = max(1, n // classes)
    index = torch.cat([(train.labels == c).nonzero().flatten()[:per_class] for c in range(classes)])
    real = classifier.features(train.images[index])
    return round(frechet_distance(real, classifier.features(test.images[: max(len(index), 2000)])), 3)


def write_report(out: Path, results: list[EvalResult], grids: dict[str, torch.Tensor], meta: dict) -> None:
    """results.json, results.md and one sample grid PNG per model in `out`."""
    from mode_ray.generation.images import save_grid

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2) + "\n"
    )
    notes = "".join(f"- {k}: {v}\n" for k, v in meta.items())
    (out / "results.md").write_text(markdown_table(results) + "\n" + notes)
    for name, grid in grids.items():
        save_grid(grid, out / f"samples-{name}.png", nrow=10)


@torch.no_grad()
def prompt_accuracy(
    bundle: MixtureBundle,
    classifier: Classifier,
    templates: Sequence[str],
    per_class: int = 10,
    seed: int = 0,
    guidance_scale: float | None = None,
) -> dict[str, dict[str, float]]:
    """A text mixture's accuracy per caption template: `per_class` samples of every digit asked with the
    template (neutral attributes), judged by the classifier. template -> {accuracy, low, high} (Wilson 95%)."""
    out = {}
    for t, template in enumerate(templates):
        hits = total = 0
        for c in range(num_classes(bundle)):
            params = GenerateParams(
                prompt=prompt_for(bundle, c, template),
                num_images=per_class,
                seed=seed * 7919 + c * 104729 + t * 15485863,
                guidance_scale=guidance_scale,
            )
            images = generate_local(bundle.mixture, bundle.config, params).images
            hits += int((classifier(images * 2 - 1).argmax(1) == c).sum())
            total += per_class
        low, high = wilson_interval(hits, total)
        out[template] = {"accuracy": round(hits / total, 4), "low": round(low, 4), "high": round(high, 4)}
    return out


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion hits / n (95% for z = 1.96)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)

"""Do unconditional samples follow the data?

An unconditional mixture samples p(x) = sum_k pi_k p_k(x) only if its denoiser is the posterior-weighted sum
D(x; sigma) = sum_k p(k | x, sigma) D_k(x; sigma), so three things can go wrong: the experts' own unconditional
denoisers D_k, the gate's estimate of p(k | x, sigma), and the top-k truncation of it. This module measures
the samples (class shares judged by the classifier, a chi-square test against the data's shares, the share
of ambiguous digits) and the gate (calibration per sigma bucket, against held-out labels and against the
*empirical posterior* of the training set), and gives the exact posterior of the (noised) training set as a
gate, `EmpiricalPosteriorGate`, so that sampling with it separates gate errors from expert errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mode_ray.generation import GenerateParams, generate_local
from mode_ray.generation.bundle import MixtureBundle, UnconditionalMode
from mode_ray.routing.gates import Gate, LearnedGate
from mode_ray.train.classifier import Classifier
from mode_ray.train.data import Dataset
from mode_ray.train.evaluate import frechet_distance, noise_by_bucket
from mode_ray.train.partitions import PartitionSpec

AMBIGUOUS = 0.5  # a sample whose top class probability is below this is ambiguous


@dataclass(frozen=True)
class ShareReport:
    """Class shares of `num_samples` samples against the data's; shares and gaps are fractions."""

    name: str
    num_samples: int
    shares: list[float]  # (C,) classifier's argmax share per class
    data_shares: list[float]  # (C,) share per class in the training data
    max_gap: float  # max_c |shares_c - data_shares_c|
    chi2: float  # Pearson's statistic of the counts against the data's shares, C - 1 degrees of freedom
    p_value: float
    ambiguous: float  # share of samples with top class probability < AMBIGUOUS
    fid: float  # classifier-feature FID against the test set
    expert_weight: dict[str, float]  # mean routing weight each expert carried over images and evaluations
    seconds_per_image: float


def label_owners(bundle: MixtureBundle, num_classes: int) -> torch.Tensor:
    """(C,) the index (in `bundle.mixture.cards`) of the label-group expert that holds each class, -1 for none."""
    owner = torch.full((num_classes,), -1)
    for k, card in enumerate(bundle.mixture.cards):
        spec = PartitionSpec.parse(card.data.partition)
        if spec.kind != "labels":
            raise ValueError(f"expert {card.name!r} is not a label-group expert ({card.data.partition!r})")
        owner[list(spec.groups[0])] = k
    return owner


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's chi-square of `counts` (C,) against `probs` (C,) and its p-value (C - 1 degrees of freedom)."""
    n = counts.sum().double()
    expected = probs.double() * n
    stat = ((counts.double() - expected).square() / expected).sum()
    dof = torch.tensor((len(counts) - 1) / 2, dtype=torch.float64)
    return float(stat), float(torch.special.gammaincc(dof, stat / 2))


@torch.no_grad()
def sample(
    bundle: MixtureBundle,
    num_samples: int,
    prompt: int | str | None = None,
    top_k: int | None = None,
    experts: list[str] | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    seed: int = 0,
    batch: int = 100,
    unconditional: UnconditionalMode = "null",
) -> tuple[torch.Tensor, dict[str, float], float]:
    """`num_samples` images (N, C, H, W) in [0, 1] for `prompt` (None: unconditional, by `unconditional`:
    'null' or 'prior'), routed to `experts` only when given; the mean routing weight of each expert over
    images and evaluations, and the seconds per image."""
    images, carried, evals, seconds = [], {}, 0, 0.0
    for start in range(0, num_samples, batch):
        params = GenerateParams(
            prompt=prompt,
            num_images=min(batch, num_samples - start),
            seed=seed * 7919 + start,
            top_k=top_k,
            steps=steps,
            sampler=sampler,
            experts=experts or [],
            unconditional=unconditional if prompt is None else None,
        )
        t0 = time.perf_counter()
        result = generate_local(bundle.mixture, bundle.config, params)
        seconds += time.perf_counter() - t0
        images.append(result.images)
        for t in result.trace:
            for names, weights in zip(t.experts, t.weights, strict=True):
                for name, w in zip(names, weights, strict=True):
                    carried[name] = carried.get(name, 0.0) + w
                evals += 1
    total = max(evals, 1)
    return (
        torch.cat(images),
        {k: round(v / total, 4) for k, v in sorted(carried.items())},
        seconds / num_samples,
    )


@torch.no_grad()
def share_report(
    name: str,
    images: torch.Tensor,
    classifier: Classifier,
    train: Dataset,
    test: Dataset,
    expert_weight: dict[str, float] | None = None,
    seconds_per_image: float = 0.0,
) -> ShareReport:
    """images: (N, C, H, W) in [0, 1], judged by `classifier` against the class shares of `train`."""
    x = images * 2 - 1
    probs = classifier(x).softmax(1)
    classes = probs.shape[1]
    counts = torch.bincount(probs.argmax(1), minlength=classes)
    data = torch.bincount(train.labels[train.labels >= 0], minlength=classes).double()
    data = data / data.sum()
    shares = counts.double() / counts.sum()
    chi2, p = chi_square(counts, data)
    fid = frechet_distance(classifier.features(x), classifier.features(test.images[: max(len(x), 2000)]))
    return ShareReport(
        name=name,
        num_samples=len(x),
        shares=[round(float(s), 4) for s in shares],
        data_shares=[round(float(s), 4) for s in data],
        max_gap=round(float((shares - data).abs().max()), 4),
        chi2=round(chi2, 2),
        p_value=float(f"{p:.3g}"),
        ambiguous=round(float((probs.max(1).values < AMBIGUOUS).double().mean()), 4),
        fid=round(fid, 3),
        expert_weight=expert_weight or {},
        seconds_per_image=round(seconds_per_image, 4),
    )


class EmpiricalPosteriorGate(Gate):
    """log p(k | x, sigma) of the noised training set: p(x | sigma) = 1/M sum_i N(x; x_i, sigma^2 I), so
    p(k | x, sigma) = sum_{i in k} exp(-|x - x_i|^2 / 2 sigma^2) / sum_i (the same, over every image). The
    exact posterior of the data the experts were trained on (the prior pi_k is the share of images k holds):
    what a perfect learned gate would output. O(M) per row: a diagnostic, not a serving gate.

    images: (M, C, H, W) in the experts' space; owner: (M,) the index in `experts` of each image's expert."""

    def __init__(
        self, images: torch.Tensor, owner: torch.Tensor, experts: tuple[str, ...], chunk: int = 8192
    ):
        super().__init__()
        keep = owner >= 0
        self.images = images[keep].flatten(1).double()  # (M, P)
        self.sq = self.images.square().sum(1)  # (M,)
        self.owner = owner[keep]
        self.names = experts
        self.chunk = chunk

    def log_posterior(
        self, x: torch.Tensor, sigma: torch.Tensor, exclude: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, C, H, W), sigma: (B,) -> (B, K) log p(k | x, sigma) over `names` (-inf where k holds none).
        exclude: (B,) an image index per row left out of the sum (leave-one-out: the posterior of a noised
        training image without its own term, which would otherwise pull it towards its own expert)."""
        flat = x.flatten(1).double()
        scale = -0.5 / sigma.double().square()[:, None]  # (B, 1)
        parts = []
        for s in range(0, len(self.images), self.chunk):
            d2 = flat.square().sum(1, keepdim=True) - 2 * flat @ self.images[s : s + self.chunk].T
            parts.append((d2 + self.sq[s : s + self.chunk]) * scale)  # (B, m): log N up to a row constant
        log_k = torch.cat(parts, 1)  # (B, M)
        if exclude is not None:
            log_k[torch.arange(len(x)), exclude] = float("-inf")
        out = torch.full((len(x), len(self.names)), float("-inf"), dtype=torch.float64)
        for k in range(len(self.names)):
            mine = self.owner == k
            if mine.any():
                out[:, k] = torch.logsumexp(log_k[:, mine], 1)
        return (out - torch.logsumexp(out, 1, keepdim=True)).float()

    def forward(self, x, sigma, cond, experts):  # type: ignore[no-untyped-def]
        lp = self.log_posterior(x, sigma)
        cols = [self.names.index(c.name) for c in experts]
        return lp[:, cols].to(x.dtype).clamp(min=-1e4)  # finite: top-k and softmax stay defined


def empirical_gate(bundle: MixtureBundle, train: Dataset) -> EmpiricalPosteriorGate:
    """The empirical posterior over `bundle`'s label-group experts of the `train` images."""
    owner = label_owners(bundle, len(train.class_names))[train.labels.clamp(min=0)]
    owner[train.labels < 0] = -1
    return EmpiricalPosteriorGate(train.images, owner, tuple(c.name for c in bundle.mixture.cards))


@torch.no_grad()
def gate_calibration(
    bundle: MixtureBundle,
    test: Dataset,
    posterior: EmpiricalPosteriorGate,
    n: int = 1000,
    seed: int = 0,
    bins: int = 10,
) -> dict[str, dict]:
    """The learned gate at the null condition against held-out truth, per bucket of mode_ray.train.evaluate.SIGMA_BUCKETS:
    - accuracy (argmax == the owner of the image's label) and ECE with `bins` confidence bins (a reliability
      diagram: per bin the mean confidence, the accuracy and the count);
    - tv_to_posterior: mean total variation between the gate's p(k | x, sigma) and the empirical posterior's,
      and the posterior's own accuracy (what a perfect gate scores at that noise);
    - mean_gate / mean_posterior: the gate's and the posterior's mean probability per expert (the prior each
      implies; a calibrated gate matches the posterior's)."""
    gate = bundle.mixture.gate
    learned = next((g for g in getattr(gate, "gates", [gate]) if isinstance(g, LearnedGate)), None)
    if learned is None:
        raise ValueError(f"mixture {bundle.config.name!r} has no learned gate")
    cards = bundle.mixture.cards
    owner = label_owners(bundle, len(test.class_names))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(test), generator=g)[:n]
    idx = idx[owner[test.labels[idx]] >= 0]
    x0, target = test.images[idx], owner[test.labels[idx]]
    out = {}
    for bucket, sigma, noise in noise_by_bucket(x0, g):
        x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
        p = learned(x, sigma, None, cards).softmax(1)
        q = torch.cat(
            [posterior.log_posterior(x[i : i + 250], sigma[i : i + 250]) for i in range(0, len(x), 250)]
        ).exp()
        conf, pred = p.max(1)
        hit = (pred == target).double()
        edges = torch.linspace(0, 1, bins + 1)
        which = torch.bucketize(conf, edges[1:-1])
        diagram, ece = [], 0.0
        for b in range(bins):
            m = which == b
            if m.any():
                c, a = float(conf[m].mean()), float(hit[m].mean())
                ece += int(m.sum()) / len(x) * abs(c - a)
                diagram.append({"confidence": round(c, 4), "accuracy": round(a, 4), "count": int(m.sum())})
        out[bucket] = {
            "accuracy": round(float(hit.mean()), 4),
            "ece": round(ece, 4),
            "posterior_accuracy": round(float((q.argmax(1) == target).double().mean()), 4),
            "tv_to_posterior": round(float(0.5 * (p - q).abs().sum(1).mean()), 4),
            "mean_gate": [round(float(v), 4) for v in p.mean(0)],
            "mean_posterior": [round(float(v), 4) for v in q.mean(0)],
            "reliability": diagram,
        }
    return out


__all__ = [
    "AMBIGUOUS",
    "EmpiricalPosteriorGate",
    "ShareReport",
    "chi_square",
    "empirical_gate",
    "gate_calibration",
    "label_owners",
    "sample",
    "share_report",
]

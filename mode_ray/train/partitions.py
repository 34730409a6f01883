"""Partitions of a data set into expert shards: by label groups or by k-means clusters of features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mode_ray.train.data import Dataset


def parse_label_groups(spec: str) -> list[list[int]]:
    """'0,6|1,4,7|2,3,5|8,9' -> [[0, 6], [1, 4, 7], [2, 3, 5], [8, 9]]; a clear error for a bad spec."""
    try:
        groups = [[int(v) for v in g.split(",") if v.strip()] for g in spec.split("|")]
    except ValueError:
        raise ValueError(
            f"partition groups must be comma-separated integers split by '|', got {spec!r}"
        ) from None
    flat = [v for g in groups for v in g]
    if any(not g for g in groups) or len(flat) != len(set(flat)):
        raise ValueError(f"partition groups must be non-empty and disjoint, got {spec!r}")
    return groups


def kmeans_features(images: torch.Tensor) -> torch.Tensor:
    """Cheap features for clustering: 7x7 average-pooled pixels, (N, C*49)."""
    return F.adaptive_avg_pool2d(images, 7).flatten(1)


def kmeans(
    features: torch.Tensor, k: int, iters: int = 25, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding. features: (N, F) -> (assignments (N,), centroids (k, F))."""
    g = torch.Generator().manual_seed(seed)
    centroids = features[torch.randint(len(features), (1,), generator=g)]
    for _ in range(1, k):
        d2 = torch.cdist(features, centroids).min(dim=1).values ** 2
        centroids = torch.cat([centroids, features[torch.multinomial(d2 / d2.sum(), 1, generator=g)]])
    for _ in range(iters):
        assign = torch.cdist(features, centroids).argmin(dim=1)
        centroids = torch.stack(
            [features[assign == j].mean(0) if (assign == j).any() else centroids[j] for j in range(k)]
        )
    return torch.cdist(features, centroids).argmin(dim=1), centroids


def partition(data: Dataset, spec: str, seed: int = 0) -> list[torch.Tensor]:
    """Index tensors, one per shard. spec: 'all', 'labels:<groups>' or 'kmeans:<k>'."""
    if spec == "all":
        return [torch.arange(len(data))]
    kind, _, arg = spec.partition(":")
    if kind == "labels":
        return [torch.isin(data.labels, torch.tensor(g)).nonzero().flatten() for g in parse_label_groups(arg)]
    if kind == "kmeans":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"kmeans partition needs a cluster count, e.g. 'kmeans:4', got {spec!r}")
        assign, _ = kmeans(kmeans_features(data.images), int(arg), seed=seed)
        return [(assign == j).nonzero().flatten() for j in range(int(arg))]
    raise ValueError(f"partition must be 'all', 'labels:0,6|1,7|...' or 'kmeans:<k>', got {spec!r}")


def shard_spec(spec: str, index: int) -> str:
    """The spec of one shard, recorded in its expert's card: 'labels:0,6' or 'kmeans:4:2'."""
    kind, _, arg = spec.partition(":")
    if kind == "labels":
        return "labels:" + ",".join(str(v) for v in parse_label_groups(arg)[index])
    return f"{spec}:{index}" if kind == "kmeans" else spec


def shard(data: Dataset, spec: str, index: int, seed: int = 0) -> Dataset:
    """Shard `index` of the partition `spec`."""
    parts = partition(data, spec, seed)
    if not 0 <= index < len(parts):
        raise ValueError(f"shard index must be in [0, {len(parts) - 1}] for partition {spec!r}, got {index}")
    return data.subset(parts[index])

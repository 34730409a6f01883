"""Partitions of a data set into expert shards: by label groups or by k-means clusters of features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from mode_ray.train.data import Dataset

PartitionKind = Literal["all", "labels", "kmeans"]


@dataclass(frozen=True)
class PartitionSpec:
    """The one parser of partition specs.

    A partition: 'all', 'labels:0,6|1,4,7' (label groups, disjoint) or 'kmeans:<k>' (k clusters of
    features). A shard's own spec, recorded in its expert's card: 'labels:0,6' or 'kmeans:4:2' (cluster 2).
    """

    kind: PartitionKind
    groups: tuple[tuple[int, ...], ...] = ()  # labels
    k: int = 0  # kmeans: the cluster count
    index: int | None = None  # kmeans shard spec: the cluster

    @classmethod
    def parse(cls, spec: str) -> PartitionSpec:
        kind, _, arg = spec.partition(":")
        if spec == "all":
            return cls("all")
        if kind == "labels":
            return cls("labels", groups=_label_groups(arg))
        if kind == "kmeans":
            k, _, index = arg.partition(":")
            if not k.isdigit() or int(k) < 1 or (index and not (index.isdigit() and int(index) < int(k))):
                raise ValueError(f"kmeans partition needs a cluster count, e.g. 'kmeans:4', got {spec!r}")
            return cls("kmeans", k=int(k), index=int(index) if index else None)
        raise ValueError(f"partition must be 'all', 'labels:0,6|1,7|...' or 'kmeans:<k>', got {spec!r}")

    @classmethod
    def of_shards(cls, specs: list[str]) -> PartitionSpec:
        """The partition whose shards, in order, are the given shard specs (the experts' cards)."""
        parsed = [cls.parse(s) for s in specs]
        if all(p.kind == "labels" and len(p.groups) == 1 for p in parsed):
            return cls(
                "labels", groups=_label_groups("|".join(str(p).removeprefix("labels:") for p in parsed))
            )
        if all(p.kind == "kmeans" for p in parsed) and [p.index for p in parsed] == list(range(parsed[0].k)):
            if len({p.k for p in parsed}) == 1:
                return cls("kmeans", k=parsed[0].k)
        raise ValueError(
            f"cannot route one gate over shards {specs}: they must be label groups, or clusters 0..k-1 of one "
            "k-means partition, in order"
        )

    def __str__(self) -> str:
        if self.kind == "labels":
            return "labels:" + "|".join(",".join(str(v) for v in g) for g in self.groups)
        if self.kind == "kmeans":
            return f"kmeans:{self.k}" + ("" if self.index is None else f":{self.index}")
        return "all"

    @property
    def num_shards(self) -> int:
        return len(self.groups) if self.kind == "labels" else self.k if self.kind == "kmeans" else 1

    def _check(self, index: int) -> None:
        if not 0 <= index < self.num_shards:
            raise ValueError(
                f"shard index must be in [0, {self.num_shards - 1}] for partition {self}, got {index}"
            )

    def shard_spec(self, index: int) -> str:
        """The spec of one shard: 'labels:0,6', 'kmeans:4:2' or 'all'."""
        self._check(index)
        if self.kind == "labels":
            return "labels:" + ",".join(str(v) for v in self.groups[index])
        return f"kmeans:{self.k}:{index}" if self.kind == "kmeans" else "all"

    def shard_name(self, index: int) -> str:
        """'labels:0,6|1,7' shard 0 -> 'digits-0-6'; 'kmeans:4' shard 2 -> 'cluster-2'."""
        self._check(index)
        if self.kind == "labels":
            return "digits-" + "-".join(str(v) for v in self.groups[index])
        return f"cluster-{index}" if self.kind == "kmeans" else "dense"


def _label_groups(arg: str) -> tuple[tuple[int, ...], ...]:
    """'0,6|1,4,7' -> ((0, 6), (1, 4, 7)); a clear error for a bad or overlapping spec."""
    try:
        groups = tuple(tuple(int(v) for v in g.split(",") if v.strip()) for g in arg.split("|"))
    except ValueError:
        raise ValueError(
            f"partition groups must be comma-separated integers split by '|', got {arg!r}"
        ) from None
    flat = [v for g in groups for v in g]
    if any(not g for g in groups) or len(flat) != len(set(flat)) or any(v < 0 for v in flat):
        raise ValueError(f"partition groups must be non-empty, disjoint and >= 0, got {arg!r}")
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


def partition(data: Dataset, spec: str | PartitionSpec, seed: int = 0) -> list[torch.Tensor]:
    """Index tensors, one per shard of the partition `spec`."""
    p = PartitionSpec.parse(spec) if isinstance(spec, str) else spec
    if p.kind == "all":
        return [torch.arange(len(data))]
    if p.kind == "labels":
        return [torch.isin(data.labels, torch.tensor(g)).nonzero().flatten() for g in p.groups]
    assign, _ = kmeans(kmeans_features(data.images), p.k, seed=seed)
    return [(assign == j).nonzero().flatten() for j in range(p.k)]


def shard(data: Dataset, spec: str, index: int, seed: int = 0) -> Dataset:
    """Shard `index` of the partition `spec`."""
    p = PartitionSpec.parse(spec)
    p.shard_spec(index)  # checks the index
    return data.subset(partition(data, p, seed)[index])

"""Builders behind `mode-ray train ...`: lay out a mixture directory and run its Ray Train jobs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mode_ray.models.checkpoint import load_card
from mode_ray.routing.bundle import GateSpec, MixtureConfig, load_config
from mode_ray.train.loops import JobConfig, fit
from mode_ray.train.partitions import parse_label_groups


def shard_name(partition: str, index: int) -> str:
    """'labels:0,6|1,7' shard 0 -> 'digits-0-6'; 'kmeans:4' shard 2 -> 'cluster-2'."""
    kind, _, arg = partition.partition(":")
    if kind == "labels":
        return "digits-" + "-".join(str(v) for v in parse_label_groups(arg)[index])
    return f"cluster-{index}" if kind == "kmeans" else "dense"


def num_shards(partition: str) -> int:
    kind, _, arg = partition.partition(":")
    if kind == "labels":
        return len(parse_label_groups(arg))
    if kind == "kmeans" and arg.isdigit():
        return int(arg)
    raise ValueError(f"an expert partition must be 'labels:...' or 'kmeans:<k>', got {partition!r}")


def train_experts(
    out: Path,
    partition: str,
    base: JobConfig,
    workers: int,
    cpus_per_worker: int,
    parallel: int,
    use_gpu: bool = False,
    only: list[int] | None = None,
) -> list[Path]:
    """One isolated TorchTrainer job per shard (`parallel` at a time); writes out/experts/<name> and
    out/mixture.json (experts listed in shard order)."""
    n = num_shards(partition)
    shards = list(range(n)) if only is None else only
    for s in shards:
        if not 0 <= s < n:
            raise ValueError(f"--shard must be in [0, {n - 1}] for partition {partition!r}, got {s}")
    names = [shard_name(partition, i) for i in range(n)]

    def job(i: int) -> Path:
        cfg = JobConfig(
            **{**base.__dict__, "kind": "expert", "name": names[i], "partition": partition, "shard": i}
        )
        return fit(cfg, out / "experts" / names[i], workers, cpus_per_worker, use_gpu)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        paths = list(pool.map(job, shards))
    mixture_file = out / "mixture.json"
    config = load_config(out) if mixture_file.exists() else MixtureConfig(name=out.name, experts=names)
    config = config.model_copy(update={"experts": names})
    mixture_file.write_text(config.model_dump_json(indent=2) + "\n")
    return paths


def gate_partition(mixture_dir: Path) -> tuple[str, list[str]]:
    """Rebuild the partition the experts were trained on from their cards."""
    config = load_config(mixture_dir)
    specs = [load_card(mixture_dir / "experts" / n).data.partition for n in config.experts]
    if all(s.startswith("labels:") for s in specs):
        return "labels:" + "|".join(s.removeprefix("labels:") for s in specs), config.experts
    kinds = {s.rsplit(":", 1)[0] for s in specs}
    if len(kinds) == 1 and next(iter(kinds)).startswith("kmeans:"):
        return next(iter(kinds)), config.experts
    raise ValueError(f"cannot train one gate over experts with partitions {specs}")


def train_gate(
    mixture_dir: Path, base: JobConfig, workers: int, cpus_per_worker: int, use_gpu: bool = False
) -> Path:
    """Fit the learned gate on the experts' partitions and enable it in mixture.json."""
    partition, names = gate_partition(mixture_dir)
    cfg = JobConfig(
        **{
            **base.__dict__,
            "kind": "gate",
            "name": "gate",
            "partition": partition,
            "gate_experts": names,
            "cond_dropout": 0.5,
        }
    )
    path = fit(cfg, mixture_dir / "gate", workers, cpus_per_worker, use_gpu)
    config = load_config(mixture_dir)
    gate = config.gate.model_copy(update={"learned": "gate"})
    (mixture_dir / "mixture.json").write_text(
        config.model_copy(update={"gate": gate}).model_dump_json(indent=2) + "\n"
    )
    return path


def train_dense(
    out: Path, base: JobConfig, workers: int, cpus_per_worker: int, use_gpu: bool = False
) -> Path:
    """A dense baseline on all the data, laid out as a one-expert mixture (out/experts/dense, out/mixture.json)
    so that generate and eval treat it like any mixture."""
    cfg = JobConfig(**{**base.__dict__, "kind": "dense", "name": "dense", "partition": "all"})
    path = fit(cfg, out / "experts" / "dense", workers, cpus_per_worker, use_gpu)
    gate = GateSpec(prototype_tau=None, learned=None)
    config = MixtureConfig(name=out.name, experts=["dense"], gate=gate, top_k=1)
    (out / "mixture.json").write_text(config.model_dump_json(indent=2) + "\n")
    return path

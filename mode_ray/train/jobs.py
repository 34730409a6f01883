"""Builders behind `mode-ray train ...`: lay out a mixture directory and run its Ray Train jobs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mode_ray.generation.bundle import (
    GateSpec,
    MixtureConfig,
    class_prior_of,
    load_bundle,
    load_config,
    load_gate_net,
    save_gate,
)
from mode_ray.models.card import ExpertCard
from mode_ray.models.checkpoint import load_card
from mode_ray.train.loops import JobConfig, fit
from mode_ray.train.partitions import PartitionSpec
from mode_ray.train.partitions import partition as shard_indices


def train_experts(
    out: Path,
    partition: str,
    base: JobConfig,
    workers: int,
    cpus_per_worker: int,
    parallel: int,
    use_gpu: bool = False,
    only: list[int] | None = None,
    backbones: list[str] | None = None,
) -> list[Path]:
    """One isolated TorchTrainer job per shard (`parallel` at a time); writes out/experts/<name> and
    out/mixture.json (experts listed in shard order). backbones: one network for all shards, or one per
    shard (a mixture of architectures); default base.backbone."""
    spec = PartitionSpec.parse(partition)
    if spec.kind == "all":
        raise ValueError(f"an expert partition must be 'labels:...' or 'kmeans:<k>', got {partition!r}")
    shards = list(range(spec.num_shards)) if only is None else only
    for s in shards:
        if not 0 <= s < spec.num_shards:
            raise ValueError(
                f"--shard must be in [0, {spec.num_shards - 1}] for partition {partition!r}, got {s}"
            )
    names = [spec.shard_name(i) for i in range(spec.num_shards)]
    backbones = backbones or [base.backbone]
    if len(backbones) not in (1, spec.num_shards):
        raise ValueError(
            f"--backbone: give one network or one per shard ({spec.num_shards} for {partition!r}), "
            f"got {len(backbones)}: {','.join(backbones)}"
        )
    per_shard = backbones * spec.num_shards if len(backbones) == 1 else backbones

    def job(i: int) -> Path:
        cfg = JobConfig(
            **{
                **base.__dict__,
                "kind": "expert",
                "name": names[i],
                "partition": partition,
                "shard": i,
                "backbone": per_shard[i],
            }
        )
        return fit(cfg, out / "experts" / names[i], workers, cpus_per_worker, use_gpu)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        paths = list(pool.map(job, shards))
    mixture_file = out / "mixture.json"
    config = load_config(out) if mixture_file.exists() else MixtureConfig(name=out.name, experts=names)
    config = MixtureConfig.model_validate(
        {**config.model_dump(), "experts": names, **_condition_fields(base, config, partition)}
    )
    mixture_file.write_text(config.model_dump_json(indent=2) + "\n")
    return paths


def _condition_fields(cfg: JobConfig, config: MixtureConfig, partition: str) -> dict:
    """mixture.json's condition fields for experts trained with `cfg` on `partition`; a class-label mixture
    records the class shares of the data its experts cover and samples unconditional requests from them
    (see MixtureConfig)."""
    no_prior = {"condition": cfg.condition, "class_prior": None, "unconditional": "null"}
    if cfg.condition == "text":
        return {**no_prior, "text_tokens": cfg.text_tokens}
    if cfg.condition != "class_label":
        return no_prior
    from mode_ray.train.data import load_dataset

    data = load_dataset(cfg.dataset, "train")
    spec = PartitionSpec.parse(partition)
    covered = data.labels[torch.cat(shard_indices(data, spec))] if spec.kind == "labels" else data.labels
    num_classes = len(config.class_names)
    prior = class_prior_of(covered, num_classes) if len(data.class_names) == num_classes else None
    if prior is None:  # unlabelled data, or classes the mixture does not name: nothing to draw from
        return no_prior
    return {"condition": cfg.condition, "class_prior": prior, "unconditional": "prior"}


def gate_partition(cards: list[ExpertCard]) -> str:
    """The partition whose shards, in order, are the experts' training data (from their cards)."""
    return str(PartitionSpec.of_shards([c.data.partition for c in cards]))


def train_gate(
    mixture_dir: Path,
    base: JobConfig,
    workers: int,
    cpus_per_worker: int,
    use_gpu: bool = False,
    out: Path | None = None,
) -> Path:
    """Fit the learned gate on the experts' partitions into `out` (default mixture_dir/gate, then enabled in
    mixture.json; a gate written elsewhere leaves mixture.json alone: load it with `load_bundle(..., gate=)`
    or publish it with `mode-ray gate publish`)."""
    config = load_config(mixture_dir)
    cards = [load_card(mixture_dir / "experts" / n) for n in config.experts]
    cfg = JobConfig(
        **{
            **base.__dict__,
            "kind": "gate",
            "name": "gate",
            "partition": gate_partition(cards),
            "gate_experts": list(config.experts),
            "cond_dropout": 0.5,
            "condition": "class_label" if config.condition == "none" else config.condition,
            "text_tokens": config.text_tokens,
        }
    )
    default = mixture_dir / "gate"
    path = fit(cfg, out or default, workers, cpus_per_worker, use_gpu)
    if out is not None and out.resolve() != default.resolve():
        return path
    gate = config.gate.model_copy(update={"learned": "gate"})
    (mixture_dir / "mixture.json").write_text(
        config.model_copy(update={"gate": gate}).model_dump_json(indent=2) + "\n"
    )
    return path


def extend_gate(
    mixture_dir: Path,
    expert_dirs: list[Path],
    base: JobConfig,
    workers: int,
    cpus_per_worker: int,
    use_gpu: bool = False,
    out: Path | None = None,
    base_gate: Path | None = None,
) -> Path:
    """Add one output row per new expert to the mixture's learned gate, fitted on the experts' data with the
    old rows frozen (no retraining of the rest), and write the extended gate to `out` (default
    mixture_dir/gates/<n>). Its card records the held-out accuracy of the gate before and after.

    The new experts' partitions must be disjoint from the known ones (the gate learns which partition x0
    came from). mixture.json is left alone: publish the result with `mode-ray gate publish`.
    """
    from mode_ray.train.data import load_dataset
    from mode_ray.train.evaluate import gate_accuracy_by_sigma

    config = load_config(mixture_dir)
    base_gate = base_gate or mixture_dir / str(config.gate.learned)
    known = list(load_gate_net(base_gate).config.experts)
    new_cards = [load_card(d) for d in expert_dirs]
    clash = [c.name for c in new_cards if c.name in known]
    if clash:
        raise ValueError(f"--expert: the gate at {base_gate} already has a row for {clash}")
    cards = [load_card(mixture_dir / "experts" / n) for n in known] + new_cards
    out = out or _next_gate_dir(mixture_dir)
    cfg = JobConfig(
        **{
            **base.__dict__,
            "kind": "gate",
            "name": "gate-" + "-".join(c.name for c in new_cards),
            "partition": gate_partition(cards),
            "gate_experts": [c.name for c in cards],
            "cond_dropout": 0.5,
            "base_gate": str(base_gate.resolve()),
            "condition": "class_label" if config.condition == "none" else config.condition,
            "text_tokens": config.text_tokens,
        }
    )
    path = fit(cfg, out, workers, cpus_per_worker, use_gpu)
    # held-out accuracy over the extended expert set: before (the base gate abstains for the new experts)
    # and after
    test = load_dataset(base.dataset, "test")
    before = load_bundle(mixture_dir, experts=[str(d) for d in expert_dirs], gate=base_gate)
    after = load_bundle(mixture_dir, experts=[str(d) for d in expert_dirs], gate=path)
    net = load_gate_net(path)
    metrics = dict(_gate_metrics(path))
    metrics["heldout_accuracy_before"] = gate_accuracy_by_sigma(before, test)
    metrics["heldout_accuracy_after"] = gate_accuracy_by_sigma(after, test)
    metrics["extended_from"] = str(base_gate)
    save_gate(path, net, metrics)
    return path


def _gate_metrics(path: Path) -> dict:
    from mode_ray.models.card import read_json

    return read_json(path / "gate.json", "gate card").get("metrics", {})


def _next_gate_dir(mixture_dir: Path) -> Path:
    n = 1
    while (mixture_dir / "gates" / str(n)).exists():
        n += 1
    return mixture_dir / "gates" / str(n)


def train_dense(
    out: Path, base: JobConfig, workers: int, cpus_per_worker: int, use_gpu: bool = False
) -> Path:
    """A dense baseline on all the data, laid out as a one-expert mixture (out/experts/dense, out/mixture.json)
    so that generate and eval treat it like any mixture."""
    cfg = JobConfig(**{**base.__dict__, "kind": "dense", "name": "dense", "partition": "all"})
    path = fit(cfg, out / "experts" / "dense", workers, cpus_per_worker, use_gpu)
    gate = GateSpec(prototype_tau=None, learned=None)
    config = MixtureConfig(name=out.name, experts=["dense"], gate=gate, top_k=1)
    config = MixtureConfig.model_validate({**config.model_dump(), **_condition_fields(base, config, "all")})
    (out / "mixture.json").write_text(config.model_dump_json(indent=2) + "\n")
    return path

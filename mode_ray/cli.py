"""`mode-ray`: the command line. It only parses and calls builders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="mode_ray: serve and train a Mixture of Diffusion Experts on Ray.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
train_app = typer.Typer(help="Train experts, the learned gate, dense baselines and the eval classifier (Ray Train).",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")

DEFAULT_MODEL = Path(__file__).parent / "pretrained" / "mnist"
DEFAULT_PARTITION = "labels:0,6|1,4,7|2,3,5|8,9"

Steps = Annotated[int, typer.Option(help="optimizer steps")]
Batch = Annotated[int, typer.Option(help="global batch size, split over the workers")]
Workers = Annotated[int, typer.Option(help="Ray Train workers per job (data parallel)")]
CpusPerWorker = Annotated[int, typer.Option(help="CPUs (and torch threads) per worker")]
Gpu = Annotated[bool, typer.Option("--gpu/--no-gpu", help="one GPU per worker")]
Address = Annotated[Optional[str], typer.Option(help="join this Ray cluster (default: start a local one)")]
NumCpus = Annotated[Optional[int], typer.Option(help="CPUs for a local Ray cluster (default: all)")]
Seed = Annotated[int, typer.Option(help="random seed")]
Lr = Annotated[float, typer.Option(help="peak learning rate (Adam, warmup then cosine)")]
Dataset = Annotated[str, typer.Option(help="'mnist', an .npz with images/labels, or a folder of class folders")]


def _ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=True, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(_pythonpath())}})


def _pythonpath() -> list[str]:
    root = str(Path(__file__).resolve().parent.parent)
    return [root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]


def _job(**kw):  # type: ignore[no-untyped-def]
    from mode_ray.train.loops import JobConfig

    return JobConfig(**kw)


@train_app.command("experts")
def train_experts_cmd(
    out: Annotated[Path, typer.Option(help="mixture directory to write (experts/<name>/, mixture.json)")],
    partition: Annotated[str, typer.Option(help="'labels:0,6|1,7|...' (label groups) or 'kmeans:<k>'")] = DEFAULT_PARTITION,
    shard: Annotated[Optional[list[int]], typer.Option(help="train only these shards (repeatable)")] = None,
    preset: Annotated[str, typer.Option(help="UNet size preset (xs, s, s2, m, l)")] = "s",
    steps: Steps = 2000, batch_size: Batch = 64, lr: Lr = 2e-3,
    cond_dropout: Annotated[float, typer.Option(help="probability of the null condition (enables guidance)")] = 0.1,
    dataset: Dataset = "mnist", workers: Workers = 1, cpus_per_worker: CpusPerWorker = 1,
    parallel: Annotated[int, typer.Option(help="experts trained at the same time")] = 2,
    gpu: Gpu = False, seed: Seed = 0, address: Address = None, num_cpus: NumCpus = None,
) -> None:
    """Train one expert per shard of a partition, each in its own isolated TorchTrainer job."""
    from mode_ray.train.jobs import train_experts

    _ray(address, num_cpus)
    base = _job(kind="expert", name="x", dataset=dataset, preset=preset, steps=steps, batch_size=batch_size, lr=lr,
                cond_dropout=cond_dropout, seed=seed)
    for p in train_experts(out, partition, base, workers, cpus_per_worker, parallel, gpu, shard):
        typer.echo(f"wrote {p}")


@train_app.command("gate")
def train_gate_cmd(
    mixture: Annotated[Path, typer.Option(help="mixture directory whose experts the gate routes between")],
    steps: Steps = 1500, batch_size: Batch = 128, lr: Lr = 2e-3, workers: Workers = 1,
    cpus_per_worker: CpusPerWorker = 2, gpu: Gpu = False, seed: Seed = 0, address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Train the learned gate p(k | x, sigma, cond) on the experts' partitions."""
    from mode_ray.train.jobs import train_gate

    _ray(address, num_cpus)
    base = _job(kind="gate", name="gate", steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    typer.echo(f"wrote {train_gate(mixture, base, workers, cpus_per_worker, gpu)}")


@train_app.command("dense")
def train_dense_cmd(
    out: Annotated[Path, typer.Option(help="directory of the one-expert mixture to write")],
    preset: Annotated[str, typer.Option(help="UNet size preset (xs, s, s2, m, l)")] = "s2",
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps (default: from --match-compute)")] = None,
    match_compute: Annotated[Optional[Path], typer.Option(
        help="a mixture directory: train for the same total FLOPs as all its experts together")] = None,
    batch_size: Batch = 64, lr: Lr = 2e-3, cond_dropout: Annotated[float, typer.Option(
        help="probability of the null condition")] = 0.1, dataset: Dataset = "mnist", workers: Workers = 1,
    cpus_per_worker: CpusPerWorker = 2, gpu: Gpu = False, seed: Seed = 0, address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Train a dense baseline of the same backbone family on all the data."""
    from mode_ray.routing.bundle import load_config
    from mode_ray.train.jobs import train_dense
    from mode_ray.train.loops import steps_for_compute

    if (steps is None) == (match_compute is None):
        raise typer.BadParameter("give exactly one of --steps and --match-compute")
    if match_compute is not None:
        dirs = [match_compute / "experts" / n for n in load_config(match_compute).experts]
        steps = steps_for_compute(dirs, preset, batch_size)
        typer.echo(f"{preset}: {steps} steps match the training compute of {match_compute}")
    _ray(address, num_cpus)
    base = _job(kind="dense", name="dense", dataset=dataset, preset=preset, steps=steps, batch_size=batch_size,
                lr=lr, cond_dropout=cond_dropout, seed=seed)
    typer.echo(f"wrote {train_dense(out, base, workers, cpus_per_worker, gpu)}")


@train_app.command("classifier")
def train_classifier_cmd(
    out: Annotated[Path, typer.Option(help="directory to write (classifier.json, model.safetensors)")],
    steps: Steps = 1500, batch_size: Batch = 128, lr: Lr = 2e-3, dataset: Dataset = "mnist",
    workers: Workers = 1, cpus_per_worker: CpusPerWorker = 2, gpu: Gpu = False, seed: Seed = 0,
    address: Address = None, num_cpus: NumCpus = None,
) -> None:
    """Train the evaluation classifier (accuracy judge and FID feature extractor) on the training split."""
    from mode_ray.train.loops import fit

    _ray(address, num_cpus)
    cfg = _job(kind="classifier", name="classifier", dataset=dataset, steps=steps, batch_size=batch_size, lr=lr,
               seed=seed, ema_decay=0.99)
    typer.echo(f"wrote {fit(cfg, out, workers, cpus_per_worker, gpu)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""Ray Train jobs: one `TorchTrainer` per expert (data-parallel over its workers), the learned gate, a dense
baseline and the evaluation classifier. Every job writes a safetensors checkpoint through Ray Train's
checkpointing, which the driver copies to the output directory."""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from mode_ray.diffusion import EDMPrecond, edm_loss, sample_training_sigmas
from mode_ray.generation.bundle import load_gate_net, save_gate
from mode_ray.models.card import DataSummary, ExpertCard
from mode_ray.models.checkpoint import load_card, save_expert
from mode_ray.models.dit import DIT_PRESETS, DiT
from mode_ray.models.flops import forward_flops
from mode_ray.models.unet import UNET_PRESETS, UNet
from mode_ray.routing.gates import LearnedGateConfig, LearnedGateNet
from mode_ray.train.classifier import Classifier, save_classifier
from mode_ray.train.conditioning import Conditioner
from mode_ray.train.data import Dataset, load_dataset
from mode_ray.train.partitions import PartitionSpec, partition
from mode_ray.train.progress import report

JobKind = Literal["expert", "dense", "gate", "classifier"]


@dataclass
class JobConfig:
    """Everything a training job needs; travels to the workers as a dict."""

    kind: JobKind
    name: str
    dataset: str = "mnist"
    partition: str = "all"
    shard: int = 0
    backbone: str = "unet"  # expert / dense network: "unet" (UNET_PRESETS) or "dit" (DIT_PRESETS)
    preset: str = "s"
    steps: int = 2000
    batch_size: int = 64  # global: split over the workers
    lr: float = 2e-3
    warmup: int = 100
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    seed: int = 0
    log_every: int = 100
    threads: int = 0  # torch threads per worker; 0 = the worker's CPUs
    gate_experts: list[str] = field(default_factory=list)  # gate: output rows, one per shard of `partition`
    base_gate: str | None = None  # gate: extend this gate directory (its rows frozen) with the new rows
    gate_head: str = "pool"  # gate: LearnedGateConfig.head ("pool" or "spatial")
    # gate: the target of a null-condition row: "labels" (the expert that holds x0, a one-hot sample of
    # p(k | x, sigma)) or "posterior" (the leave-one-out empirical posterior of the noised training set, the
    # expectation of that sample: the same optimum, far less variance at mid noise)
    gate_targets: str = "labels"
    progress: str | None = None  # the ProgressBoard actor to report to (mode_ray.train.progress), if any
    condition: str = "class_label"  # or "text": captions of the labels through the text encoder
    text_tokens: int = 16  # text: token embeddings per caption (L) beside the pooled one


def _shard_data(cfg: JobConfig) -> tuple[Dataset, list[torch.Tensor]]:
    data = load_dataset(cfg.dataset, "train")
    return data, partition(data, cfg.partition, cfg.seed)


def _lr(cfg: JobConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    return cfg.lr * warm * (0.5 * (1 + math.cos(math.pi * step / cfg.steps)) * 0.9 + 0.1)


def train_loop_per_worker(config: dict) -> None:
    """The function every Ray Train worker runs."""
    import ray.train
    import ray.train.torch

    cfg = JobConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = ray.train.torch.get_device()
    data, parts = _shard_data(cfg)
    if cfg.kind == "gate":
        index = torch.cat(parts)
        targets = torch.cat([torch.full((len(p),), k) for k, p in enumerate(parts)])
    else:
        index = parts[cfg.shard] if cfg.kind in ("expert",) else torch.cat(parts)
        targets = data.labels[index]
    images = data.images[index]
    labels = data.labels[index]
    kind = "class_label" if cfg.kind == "classifier" else cfg.condition
    conditioner = Conditioner.build(kind, data.class_names, images, labels, cfg.text_tokens)
    dim = conditioner.dim
    model = _build_model(cfg, dim, tuple(images.shape[1:]))
    denoiser = cfg.kind in ("expert", "dense")
    flops = forward_flops(model, tuple(images.shape[1:]), conditioner.shape) if denoiser else 0
    ema = copy.deepcopy(model).requires_grad_(False)
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    local_batch = max(1, cfg.batch_size // world)
    t0, seen, running = time.time(), 0, 0.0
    smooth: float | None = None
    posterior = None
    if cfg.kind == "gate" and cfg.gate_targets == "posterior":
        from mode_ray.train.unconditional import EmpiricalPosteriorGate

        posterior = EmpiricalPosteriorGate(images, targets, tuple(cfg.gate_experts))
    elif cfg.gate_targets != "labels":
        raise ValueError(f"gate_targets must be 'labels' or 'posterior', got {cfg.gate_targets!r}")
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        idx = torch.randint(len(images), (local_batch,), generator=g)
        x0, y, t = images[idx].to(device), labels[idx], targets[idx].to(device)
        cond = None
        if cfg.kind != "classifier":
            drop = torch.rand(local_batch, generator=g) < cfg.cond_dropout
            cond = conditioner.draw(idx, y, drop, g).to(device)
        if posterior is not None:
            loss = _gate_posterior_loss(model, x0, cond, t, drop, idx, posterior, g, device)
        else:
            loss = _loss(cfg, model, x0, cond, t, g, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            src = model.module if hasattr(model, "module") else model
            for p_ema, p in zip(ema.parameters(), src.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
            for b_ema, b in zip(ema.buffers(), src.buffers(), strict=True):
                b_ema.copy_(b)
        seen += local_batch * world
        running += loss.item()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()  # the bar's (EMA)
        if (
            rank == 0
            and cfg.progress
            and ((step + 1) % max(1, cfg.steps // 200) == 0 or step + 1 == cfg.steps)
        ):
            elapsed = time.time() - t0
            report(
                cfg.progress,
                f"{cfg.kind} {cfg.name}",
                {
                    "step": step + 1,
                    "steps": cfg.steps,
                    "loss": smooth,
                    "images_per_s": seen / elapsed,
                    "elapsed_s": elapsed,
                },
            )
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            elapsed = time.time() - t0
            n = (step % cfg.log_every) + 1
            metrics = {
                "step": step + 1,
                "loss": running / n,
                "images_per_s": seen / elapsed,
                "elapsed_s": elapsed,
            }
            if rank == 0 and not cfg.progress:  # with a board, the driver draws a progress bar instead
                print(
                    f"[{cfg.kind} {cfg.name}] step {step + 1}/{cfg.steps} loss {running / n:.4f} "
                    f"{seen / elapsed:.0f} img/s {elapsed:.0f}s",
                    flush=True,
                )
            running = 0.0
            if step + 1 < cfg.steps:
                ray.train.report(metrics)
    elapsed = time.time() - t0
    summary = {
        "train_steps": cfg.steps,
        "train_seconds": round(elapsed, 1),
        "train_examples": seen,
        "train_flops": 3 * flops * seen,
        "final_loss": metrics["loss"],
        "workers": world,
    }
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            _save(cfg, ema.cpu(), Path(tmp), data, parts, summary, conditioner)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def _build_model(cfg: JobConfig, dim: int, shape: tuple[int, ...]) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    if cfg.kind in ("expert", "dense"):
        networks = {"unet": (UNET_PRESETS, UNet), "dit": (DIT_PRESETS, DiT)}
        if cfg.backbone not in networks:
            raise ValueError(f"backbone must be one of {sorted(networks)}, got {cfg.backbone!r}")
        presets, network = networks[cfg.backbone]
        if cfg.preset not in presets:
            raise ValueError(f"preset must be one of {sorted(presets)} ({cfg.backbone}), got {cfg.preset!r}")
        fitted = {"in_channels": shape[0], "cond_dim": dim}  # to the data
        if cfg.backbone == "dit":
            fitted["image_size"] = shape[1]
            fitted["cross_attention"] = cfg.condition == "text" and cfg.text_tokens > 0  # reads the tokens
        net_cfg = type(presets[cfg.preset])(**{**presets[cfg.preset].to_dict(), **fitted})
        return EDMPrecond(network(net_cfg))
    if cfg.kind == "gate":
        if cfg.base_gate is not None:
            return extended_gate_net(load_gate_net(cfg.base_gate), tuple(cfg.gate_experts))
        return LearnedGateNet(
            LearnedGateConfig(tuple(cfg.gate_experts), in_channels=shape[0], cond_dim=dim, head=cfg.gate_head)
        )
    return Classifier(classes=dim, in_channels=shape[0])


def extended_gate_net(base: LearnedGateNet, experts: tuple[str, ...]) -> LearnedGateNet:
    """`base` with one output row per expert of `experts` that it lacks, everything else frozen.

    The old rows keep their weights exactly (their gradients are masked to zero, and Adam moves nothing
    with zero gradients); a new row starts at the mean of the old rows (the neutral score) and is the only
    thing trained."""
    old = base.config.experts
    if tuple(experts[: len(old)]) != old:
        raise ValueError(f"the extended gate's experts must start with the base gate's {list(old)}")
    net = LearnedGateNet(replace(base.config, experts=tuple(experts)))
    state = base.state_dict()
    last = f"head.{len(net.head) - 1}"
    for key, value in net.state_dict().items():
        if key.startswith(last):  # (N, 2w) weight and (N,) bias of the last layer
            new = value.clone()
            new[: len(old)] = state[key]
            new[len(old) :] = state[key].mean(dim=0)
            state[key] = new
    net.load_state_dict(state)
    net.requires_grad_(False)
    keep = torch.zeros(len(experts), 1)
    keep[len(old) :] = 1.0
    for p in net.head[-1].parameters():
        p.requires_grad_(True)
        mask = keep if p.ndim == 2 else keep[:, 0]
        p.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device))
    return net


def _loss(cfg, model, x0, cond, t, g, device) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """x0: (B, C, H, W); cond: (B, ...) with condition dropout applied (None for the classifier)."""
    b = x0.shape[0]
    if cfg.kind == "classifier":
        shift = torch.randint(-2, 3, (2,), generator=g).tolist()  # small translations
        return F.cross_entropy(model(torch.roll(x0, shifts=shift, dims=(2, 3))), t)
    if cfg.kind == "gate":
        # the gate is queried over the whole sampling range, so train it log-uniformly over [0.002, 80]
        sigma = torch.exp(torch.empty(b).uniform_(math.log(0.002), math.log(80), generator=g)).to(device)
        x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g).to(device)
        return F.nll_loss(model(x, sigma, cond), t)
    sigma = sample_training_sigmas(b, g).to(device)
    return edm_loss(model, x0, sigma, cond, torch.randn(x0.shape, generator=g).to(device)).mean()


def _gate_posterior_loss(model, x0, cond, t, drop, idx, posterior, g, device) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The gate's cross-entropy with, on null-condition rows (`drop`), the leave-one-out empirical posterior
    p(k | x, sigma) of the training set as the target; conditioned rows keep their expert's label (given a
    label-group condition the posterior is exactly that one-hot)."""
    b = x0.shape[0]
    sigma = torch.exp(torch.empty(b).uniform_(math.log(0.002), math.log(80), generator=g))
    x = x0.cpu() + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
    target = F.one_hot(t.cpu(), len(posterior.names)).float()
    if drop.any():
        target[drop] = posterior.log_posterior(x[drop], sigma[drop], exclude=idx[drop]).exp()
    logp = model(x.to(device), sigma.to(device), cond)
    return -(target.to(device) * logp).sum(1).mean()


def _save(
    cfg: JobConfig, model, out: Path, data: Dataset, parts, summary: dict, conditioner: Conditioner
) -> None:  # type: ignore[no-untyped-def]
    model = model.eval()  # dropout off, BatchNorm on running statistics for the metrics below
    dim = len(data.class_names)
    if cfg.kind == "gate":
        save_gate(out, model, {**summary, "partition": cfg.partition})
        return
    if cfg.kind == "classifier":
        test = load_dataset(cfg.dataset, "test")
        with torch.no_grad():
            acc = float((model(test.images).argmax(1) == test.labels).float().mean())
        save_classifier(out, model, {**summary, "test_accuracy": round(acc, 4)})
        return
    index = parts[cfg.shard] if cfg.kind == "expert" else torch.cat(parts)
    labels = data.labels[index]
    counts = torch.bincount(labels[labels >= 0], minlength=dim)
    prototype = conditioner.prototype(torch.arange(len(index)), labels)  # the job's examples are `index`
    net = model.net
    card = ExpertCard(
        name=cfg.name,
        backbone=cfg.backbone,
        backbone_config=net.config.to_dict(),
        latent_shape=tuple(data.images.shape[1:]),
        condition=conditioner.condition(),
        prototype=prototype,
        guidance_dropout=cfg.cond_dropout,
        data=DataSummary(
            dataset=cfg.dataset,
            partition=PartitionSpec.parse(cfg.partition).shard_spec(cfg.shard)
            if cfg.kind == "expert"
            else cfg.partition,
            num_examples=len(index),
            label_counts={data.class_names[i]: int(c) for i, c in enumerate(counts) if c > 0},
        ),
        metrics={**summary, "preset": cfg.preset, "batch_size": cfg.batch_size, "lr": cfg.lr},
    )
    save_expert(out, card, model)


def fit(
    cfg: JobConfig,
    out: Path,
    workers: int = 1,
    cpus_per_worker: int = 1,
    use_gpu: bool = False,
    storage: Path | None = None,
) -> Path:
    """Run one job as a Ray Train `TorchTrainer` and copy its final checkpoint to `out`."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mode_ray import env

    storage_path = str(storage.resolve()) if storage else env.train_storage()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**asdict(cfg), "threads": cfg.threads or cpus_per_worker},
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(name=f"{cfg.kind}-{cfg.name}-{int(time.time())}", storage_path=storage_path),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training job {cfg.kind} {cfg.name!r} finished without a checkpoint")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    result.checkpoint.to_directory(str(out))
    report(cfg.progress, f"{cfg.kind} {cfg.name}", {"done": True, "path": str(out)})
    return out


def steps_for_compute(expert_dirs: list[Path], preset: str, batch_size: int, backbone: str = "unet") -> int:
    """Training steps that give a `preset` model of `backbone` the same total training FLOPs as the given
    experts (on their data shape and condition, read from their cards)."""
    cards = [load_card(d) for d in expert_dirs]
    total = sum(int(c.metrics.get("train_flops", 0)) for c in cards)
    if total <= 0:
        raise ValueError(f"no train_flops recorded in the cards of {[str(d) for d in expert_dirs]}")
    shape, condition = tuple(cards[0].latent_shape), cards[0].condition
    cfg = JobConfig(
        kind="dense",
        name="probe",
        preset=preset,
        backbone=backbone,
        condition=condition.type,
        text_tokens=condition.tokens,
    )
    per_sample = 3 * forward_flops(_build_model(cfg, condition.dim, shape), shape, condition.shape)
    return max(1, round(total / (per_sample * batch_size)))

"""`mode-ray`: the command line. It only parses and calls builders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import typer

from mode_ray.diffusion.samplers import SamplerName
from mode_ray.generation.bundle import UnconditionalMode
from mode_ray.generation.params import DEFAULT_NUM_IMAGES
from mode_ray.models.dit import DIT_PRESETS
from mode_ray.models.unet import PresetName
from mode_ray.ports import free_ports

app = typer.Typer(
    help="mode_ray: serve and train a Mixture of Diffusion Experts on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(
    help="Train experts, the learned gate, dense baselines and the eval classifier (Ray Train).",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")

DEFAULT_MODEL = Path(__file__).parent / "pretrained" / "mnist"
SHIPPED_MODELS = (
    "mnist",
    "mnist-text",
    "mnist-dense-s",
    "mnist-dense-s2",
    "mnist-dense-m",
)  # --model takes these names as well as directories


def model_dir(model: Path) -> Path:
    """--model: a mixture directory, or the name of a shipped model (`mnist`, `mnist-text`, the dense
    baselines `mnist-dense-s`, `-s2`, `-m`)."""
    if not model.exists() and str(model) in SHIPPED_MODELS:
        return DEFAULT_MODEL.parent / str(model)
    return model


DEFAULT_PARTITION = "labels:0,6|1,4,7|2,3,5|8,9"

Steps = Annotated[int, typer.Option(help="optimizer steps")]
Batch = Annotated[int, typer.Option(help="global batch size, split over the workers")]
Workers = Annotated[int, typer.Option(help="Ray Train workers per job (data parallel)")]
CpusPerWorker = Annotated[int, typer.Option(help="CPUs (and torch threads) per worker")]
Gpu = Annotated[bool, typer.Option("--gpu/--no-gpu", help="one GPU per worker")]
Address = Annotated[str | None, typer.Option(help="join this Ray cluster (default: start a local one)")]
NumCpus = Annotated[int | None, typer.Option(help="CPUs for a local Ray cluster (default: all)")]
Seed = Annotated[int, typer.Option(help="random seed")]
Lr = Annotated[float, typer.Option(help="peak learning rate (Adam, warmup then cosine)")]
Dataset = Annotated[
    str, typer.Option(help="'mnist', an .npz with images/labels, or a folder of class folders")
]
Backbone = Annotated[
    Literal["unet", "dit"],
    typer.Option(
        help=f"network: 'unet', or 'dit' (adaLN-Zero transformer; presets {', '.join(DIT_PRESETS)})"
    ),
]
Preset = Annotated[PresetName, typer.Option(help="size preset of the backbone")]
ConditionKind = Annotated[
    Literal["class_label", "text"],
    typer.Option(
        "--condition",
        help="'class_label' (one-hot), or 'text': captions of the labels and measured attributes through the "
        "all-MiniLM-L6-v2 encoder (the `text` extra); free-text prompts then",
    ),
]
TextTokens = Annotated[
    int,
    typer.Option(help="text: token embeddings per caption beside the pooled one (cross-attention experts)"),
]


def _ray(address: str | None, num_cpus: int | None, train: bool = False) -> None:
    """Start Ray on this machine (or join `address` / RAY_ADDRESS). For training (`train`), with the dashboard
    process on loopback: it serves the state API that Ray Train's placement-group cleaner polls (without it
    the cleaner logs "State API may be temporarily unavailable" every few seconds)."""
    import ray

    if not ray.is_initialized():
        joining = bool(address or os.environ.get("RAY_ADDRESS"))
        ray.init(
            address=address,
            num_cpus=None if joining else num_cpus,
            include_dashboard=train and not joining,
            dashboard_host="127.0.0.1",
            dashboard_port=free_ports(1)[0] if train and not joining else None,
            log_to_driver=True,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(_pythonpath())}},
        )


def _pythonpath() -> list[str]:
    root = str(Path(__file__).resolve().parent.parent)
    return [root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]


def _check_preset(backbone: str, preset: str) -> None:
    if backbone == "dit" and preset not in DIT_PRESETS:
        raise typer.BadParameter(f"the dit backbone has presets {', '.join(DIT_PRESETS)}, got {preset!r}")


def _job(**kw):  # type: ignore[no-untyped-def]
    from mode_ray.train.loops import JobConfig

    return JobConfig(**kw)


@train_app.command("experts")
def train_experts_cmd(
    out: Annotated[Path, typer.Option(help="mixture directory to write (experts/<name>/, mixture.json)")],
    partition: Annotated[
        str, typer.Option(help="'labels:0,6|1,7|...' (label groups) or 'kmeans:<k>'")
    ] = DEFAULT_PARTITION,
    shard: Annotated[list[int] | None, typer.Option(help="train only these shards (repeatable)")] = None,
    backbone: Annotated[
        str,
        typer.Option(
            help="network of every expert: 'unet' or 'dit' (adaLN-Zero transformer), or one per shard, "
            "comma-separated (e.g. 'unet,unet,unet,dit'): a mixture of architectures"
        ),
    ] = "unet",
    preset: Preset = "s",
    condition: ConditionKind = "class_label",
    text_tokens: TextTokens = 16,
    steps: Steps = 2000,
    batch_size: Batch = 64,
    lr: Lr = 2e-3,
    cond_dropout: Annotated[
        float, typer.Option(help="probability of the null condition (enables guidance)")
    ] = 0.1,
    dataset: Dataset = "mnist",
    workers: Workers = 1,
    cpus_per_worker: CpusPerWorker = 1,
    parallel: Annotated[int, typer.Option(help="experts trained at the same time")] = 2,
    gpu: Gpu = False,
    seed: Seed = 0,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Train one expert per shard of a partition, each in its own isolated TorchTrainer job."""
    from mode_ray.train.jobs import train_experts
    from mode_ray.train.progress import progress_bars

    backbones = [b.strip() for b in backbone.split(",")]
    for b in backbones:
        if b not in ("unet", "dit"):
            raise typer.BadParameter(f"--backbone: each network must be 'unet' or 'dit', got {b!r}")
        _check_preset(b, preset)
    _ray(address, num_cpus, train=True)
    with progress_bars(typer.echo) as board:  # one bar per expert job, then a summary line each
        base = _job(
            kind="expert",
            name="x",
            dataset=dataset,
            backbone=backbones[0],
            preset=preset,
            condition=condition,
            text_tokens=text_tokens,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            cond_dropout=cond_dropout,
            seed=seed,
            progress=board,
        )
        try:
            paths = train_experts(
                out, partition, base, workers, cpus_per_worker, parallel, gpu, shard, backbones=backbones
            )
        except ValueError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
    for p in paths:
        typer.echo(f"wrote {p}")


train_app.command("expert", help="Alias of `train experts`; with --shard N it trains one expert.")(
    train_experts_cmd
)


@train_app.command("gate")
def train_gate_cmd(
    mixture: Annotated[
        Path | None, typer.Option(help="mixture directory whose experts the gate routes between")
    ] = None,
    extend: Annotated[
        Path | None,
        typer.Option(
            help="mixture directory whose learned gate gets one new row per --expert (old rows frozen)"
        ),
    ] = None,
    expert: Annotated[
        list[Path] | None, typer.Option(help="with --extend: a hot-added expert directory (repeatable)")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="where to write the gate (--extend: default <mixture>/gates/<n>; --mixture: default <mixture>/gate, "
            "enabled in mixture.json, while an --out elsewhere leaves mixture.json alone)"
        ),
    ] = None,
    head: Annotated[
        Literal["pool", "spatial"],
        typer.Option(help="gate features averaged over the image (pool) or kept on a 4 x 4 grid (spatial)"),
    ] = "pool",
    targets: Annotated[
        Literal["labels", "posterior"],
        typer.Option(
            help="null-condition target: the expert holding x0 (labels) or the leave-one-out empirical posterior "
            "p(k | x, sigma) of the training set (posterior: same optimum, less variance)"
        ),
    ] = "labels",
    publish: Annotated[
        str | None, typer.Option(help="with --extend: publish the new gate to this running cluster (its URL)")
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar="MODE_RAY_ADMIN_TOKEN", help="admin token for --publish")
    ] = None,
    steps: Steps = 1500,
    batch_size: Batch = 128,
    lr: Lr = 2e-3,
    workers: Workers = 1,
    cpus_per_worker: CpusPerWorker = 2,
    gpu: Gpu = False,
    seed: Seed = 0,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Train the learned gate p(k | x, sigma, cond) on the experts' partitions (--mixture), or extend it
    with rows for hot-added experts without retraining the rest (--extend M --expert DIR)."""
    from mode_ray.train.jobs import extend_gate, train_gate

    if (mixture is None) == (extend is None):
        raise typer.BadParameter("give exactly one of --mixture (train) and --extend (add rows)")
    if extend is not None and not expert:
        raise typer.BadParameter("--extend needs at least one --expert directory")
    if extend is None and (expert or publish):
        raise typer.BadParameter("--expert and --publish go with --extend")
    from mode_ray.train.progress import progress_bars

    _ray(address, num_cpus, train=True)
    try:
        with progress_bars(typer.echo) as board:
            base = _job(
                kind="gate",
                name="gate",
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                progress=board,
                gate_head=head,
                gate_targets=targets,
            )
            if mixture is not None:
                path = train_gate(mixture, base, workers, cpus_per_worker, gpu, out)
            else:
                assert extend is not None and expert
                path = extend_gate(extend, list(expert), base, workers, cpus_per_worker, gpu, out)
        if mixture is not None:
            typer.echo(f"wrote {path}")
            return
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {path}")
    if publish:
        from mode_ray.client import Client, ClusterError

        try:
            with Client(publish, token) as c:
                typer.echo(f"published: {c.publish_gate(str(path.resolve()))}")
        except ClusterError as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(2) from None


@train_app.command("dense")
def train_dense_cmd(
    out: Annotated[Path, typer.Option(help="directory of the one-expert mixture to write")],
    backbone: Backbone = "unet",
    preset: Preset = "s2",
    condition: ConditionKind = "class_label",
    text_tokens: TextTokens = 16,
    steps: Annotated[int | None, typer.Option(help="optimizer steps (default: from --match-compute)")] = None,
    match_compute: Annotated[
        Path | None,
        typer.Option(help="a mixture directory: train for the same total FLOPs as all its experts together"),
    ] = None,
    batch_size: Batch = 64,
    lr: Lr = 2e-3,
    cond_dropout: Annotated[float, typer.Option(help="probability of the null condition")] = 0.1,
    dataset: Dataset = "mnist",
    workers: Workers = 1,
    cpus_per_worker: CpusPerWorker = 2,
    gpu: Gpu = False,
    seed: Seed = 0,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Train a dense baseline of the same backbone family on all the data."""
    from mode_ray.generation.bundle import load_config
    from mode_ray.train.jobs import train_dense
    from mode_ray.train.loops import steps_for_compute

    if (steps is None) == (match_compute is None):
        raise typer.BadParameter("give exactly one of --steps and --match-compute")
    _check_preset(backbone, preset)
    if match_compute is not None:
        dirs = [match_compute / "experts" / n for n in load_config(match_compute).experts]
        steps = steps_for_compute(dirs, preset, batch_size, backbone=backbone)
        typer.echo(f"{backbone} {preset}: {steps} steps match the training compute of {match_compute}")
    from mode_ray.train.progress import progress_bars

    _ray(address, num_cpus, train=True)
    with progress_bars(typer.echo) as board:
        base = _job(
            kind="dense",
            name="dense",
            dataset=dataset,
            backbone=backbone,
            preset=preset,
            condition=condition,
            text_tokens=text_tokens,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            cond_dropout=cond_dropout,
            seed=seed,
            progress=board,
        )
        path = train_dense(out, base, workers, cpus_per_worker, gpu)
    typer.echo(f"wrote {path}")


@train_app.command("classifier")
def train_classifier_cmd(
    out: Annotated[Path, typer.Option(help="directory to write (classifier.json, model.safetensors)")],
    steps: Steps = 1500,
    batch_size: Batch = 128,
    lr: Lr = 2e-3,
    dataset: Dataset = "mnist",
    workers: Workers = 1,
    cpus_per_worker: CpusPerWorker = 2,
    gpu: Gpu = False,
    seed: Seed = 0,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Train the evaluation classifier (accuracy judge and FID feature extractor) on the training split."""
    from mode_ray.train.loops import fit
    from mode_ray.train.progress import progress_bars

    _ray(address, num_cpus, train=True)
    with progress_bars(typer.echo) as board:
        cfg = _job(
            kind="classifier",
            name="classifier",
            dataset=dataset,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            ema_decay=0.99,
            progress=board,
        )
        path = fit(cfg, out, workers, cpus_per_worker, gpu)
    typer.echo(f"wrote {path}")


def _write_output(out: Path, result, scale: int = 1, labels: bool = False) -> None:  # type: ignore[no-untyped-def]
    import json

    import numpy as np

    if out.suffix == ".png":
        captions = [str(c) if c >= 0 else "uncond" for c in result.labels] if labels else None
        out.write_bytes(result.png(scale=scale, labels=captions))
    elif out.suffix == ".npz":
        np.savez(
            out,
            images=result.raw(),
            labels=np.asarray(result.labels, np.int64),
            trace=np.asarray(json.dumps([t.to_dict() for t in result.trace])),
        )


@app.command()
def generate(
    prompt: Annotated[
        str | None, typer.Option(help="class to draw: 7, 'seven', 'digit 7'; omit for unconditional")
    ] = None,
    num_images: Annotated[int, typer.Option(help="images to generate")] = DEFAULT_NUM_IMAGES,
    seed: Annotated[int | None, typer.Option(help="random seed; the same seed gives the same images")] = None,
    steps: Annotated[int | None, typer.Option(help="sampler steps (default: the model's)")] = None,
    sampler: Annotated[SamplerName | None, typer.Option(help="sampler (default: the model's)")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="classifier-free guidance (1 = off)")] = None,
    top_k: Annotated[int | None, typer.Option(help="experts per step (default: the model's)")] = None,
    top_p: Annotated[
        float | None, typer.Option(help="adaptive k: smallest expert set with this mass")
    ] = None,
    min_weight: Annotated[
        float | None, typer.Option(help="weight floor: chosen experts below this weight are not evaluated")
    ] = None,
    unconditional: Annotated[
        UnconditionalMode | None,
        typer.Option(
            help="without --prompt: prior (each image's class drawn from the data's shares) or null (the "
            "null condition); default: the model's"
        ),
    ] = None,
    expert: Annotated[
        list[str] | None, typer.Option(help="pin routing to these experts (repeatable)")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="never route to these experts (repeatable)")
    ] = None,
    out: Annotated[
        Path, typer.Option(help="grid.png (image grid) or samples.npz (raw images, labels, trace)")
    ] = Path("grid.png"),
    scale: Annotated[int, typer.Option(min=1, max=32, help="grid.png: each pixel as scale x scale")] = 4,
    labels: Annotated[bool, typer.Option("--labels", help="grid.png: the class under each image")] = False,
    trace_png: Annotated[
        Path | None, typer.Option(help="also write the routing heatmap (experts x evaluations) to this PNG")
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="run the mixture in this process (no Ray Serve)")
    ] = False,
    model: Annotated[
        Path, typer.Option(help="mixture directory for --local, or a shipped model: mnist, mnist-text")
    ] = DEFAULT_MODEL,
    url: Annotated[
        str, typer.Option(help="a running `mode-ray serve` (without --local)")
    ] = "http://127.0.0.1:8000",
) -> None:
    """Generate images from the shipped mixture in-process (--local) or from a running cluster (--url)."""
    if out.suffix not in (".png", ".npz"):
        raise typer.BadParameter(f"--out must end in .png or .npz, got {out}")
    fields = {
        "prompt": prompt,
        "num_images": num_images,
        "seed": seed,
        "steps": steps,
        "sampler": sampler,
        "guidance_scale": guidance_scale,
        "top_k": top_k,
        "top_p": top_p,
        "min_weight": min_weight,
        "unconditional": unconditional,
        "experts": expert or [],
        "exclude_experts": exclude or [],
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    if local:
        from pydantic import ValidationError

        from mode_ray import env
        from mode_ray.generation import GenerateParams, generate_local, load_bundle
        from mode_ray.models.card import format_validation_error

        try:
            params = GenerateParams(**fields)
            bundle = load_bundle(model_dir(model), env.device())
            result = generate_local(bundle.mixture, bundle.config, params)
        except ValidationError as e:
            raise typer.BadParameter(format_validation_error(e, "generate")) from None
        except (ValueError, FileNotFoundError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        source = ""
    else:
        from rich.progress import Progress as Bar

        from mode_ray.client import Client, ClusterError
        from mode_ray.generation import GenerationResult

        result = None
        try:  # the stream's progress as a bar on stderr, then the result
            with Client(url) as c, Bar(transient=True, console=_stderr()) as bar:
                task = bar.add_task("generating", total=None)
                for item in c.stream(**fields):
                    if isinstance(item, GenerationResult):
                        result = item
                    else:
                        bar.update(task, total=item.total, completed=item.step)
        except ClusterError as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(2) from None
        if result is None:
            typer.echo(f"error: the stream from {url} ended without a result", err=True)
            raise typer.Exit(2)
        source = f" from {url}"
    _write_output(out, result, scale, labels)
    typer.echo(f"wrote {out} ({num_images} images, seed {result.seed}){source}")
    if trace_png is not None:
        if not result.trace:
            typer.echo("no routing trace to draw (trace: none)", err=True)
        else:
            trace_png.write_bytes(result.routing_png())
            typer.echo(f"wrote {trace_png} (routing: {len(result.trace)} evaluations)")


@app.command("eval")
def eval_cmd(
    model: Annotated[list[Path], typer.Option(help="mixture directories to compare (repeatable)")],
    classifier: Annotated[Path, typer.Option(help="evaluation classifier directory")] = DEFAULT_MODEL
    / "classifier",
    out: Annotated[Path, typer.Option(help="directory for results.json, results.md and sample grids")] = Path(
        "runs/eval"
    ),
    num_samples: Annotated[
        int, typer.Option(help="class-conditional samples per model (split evenly by class)")
    ] = 1000,
    steps: Annotated[int | None, typer.Option(help="sampler steps (default: each model's)")] = None,
    sampler: Annotated[SamplerName | None, typer.Option(help="sampler (default: each model's)")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="guidance (default: each model's)")] = None,
    top_k: Annotated[int | None, typer.Option(help="experts per step (default: each model's)")] = None,
    min_weight: Annotated[float | None, typer.Option(help="weight floor (default: each model's)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    prompt_samples: Annotated[
        int, typer.Option(help="text mixtures: samples per digit and caption template for the phrasing table")
    ] = 10,
) -> None:
    """Accuracy, classifier-FID and denoising loss per sigma bucket for each model, side by side; for a text
    mixture also the accuracy per prompt phrasing (templates seen in training and paraphrases never seen)."""
    import torch

    from mode_ray.generation import load_bundle
    from mode_ray.train.classifier import load_classifier
    from mode_ray.train.data import load_mnist
    from mode_ray.train.evaluate import evaluate, markdown_table, num_classes, prompt_accuracy, write_report

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    judge, test = load_classifier(classifier), load_mnist("test")
    results, grids, text_meta = [], {}, {}
    for path in model:
        bundle = load_bundle(path)
        result, images, labels = evaluate(
            bundle,
            judge,
            test,
            num_samples,
            steps,
            sampler,
            guidance_scale,
            top_k,
            seed,
            min_weight=min_weight,
        )
        results.append(result)
        classes = num_classes(bundle)
        per_class = len(images) // classes
        pick = (
            torch.cat([torch.arange(8) + c * per_class for c in range(classes)])
            if per_class >= 8
            else (torch.arange(len(images)))
        )
        grids[bundle.config.name] = (
            images[pick.reshape(classes, -1).T.flatten()] if per_class >= 8 else images
        )
        typer.echo(f"{bundle.config.name}: accuracy {result.accuracy:.3f} FID {result.fid:.2f}")
        if bundle.config.condition == "text":  # accuracy per phrasing: seen in training, and never seen
            from mode_ray.train.captions import TEMPLATES, UNSEEN

            for kind, templates in (("seen", TEMPLATES), ("unseen", UNSEEN)):
                by_template = prompt_accuracy(bundle, judge, templates, prompt_samples, seed, guidance_scale)
                text_meta[f"prompt_accuracy_{kind}_{path.name}"] = by_template
                mean = sum(v["accuracy"] for v in by_template.values()) / len(by_template)
                typer.echo(f"{bundle.config.name}: {kind} phrasings, mean accuracy {mean:.3f}")
    from mode_ray.train.evaluate import classifier_accuracy, reference_fid

    meta = {
        "reference_fid_real_train_vs_test": reference_fid(judge, load_mnist("train"), test, num_samples),
        "classifier_test_accuracy": classifier_accuracy(judge, test),
        **text_meta,
    }
    from mode_ray.train.evaluate import gate_accuracy_by_sigma

    for path in model:
        try:  # the learned gate alone, unconditional: how well it estimates p(k | x, sigma)
            meta[f"gate_accuracy_uncond_{path.name}"] = gate_accuracy_by_sigma(load_bundle(path), test)
        except ValueError:
            pass  # no learned gate, or experts not split by label group
    write_report(out, results, grids, meta)
    typer.echo(markdown_table(results))


import_app = typer.Typer(help="Import experts trained elsewhere as expert directories.", no_args_is_help=True)
app.add_typer(import_app, name="import")


@import_app.command("diffusers")
def import_diffusers_cmd(
    src: Annotated[
        Path,
        typer.Argument(
            help="a saved diffusers pipeline (model_index.json, unet/ or transformer/, scheduler/) or model "
            "directory (config.json + diffusion_pytorch_model.safetensors)"
        ),
    ],
    name: Annotated[str, typer.Option(help="expert name: lowercase letters, digits and '-'")],
    out: Annotated[
        Path | None,
        typer.Option(help="expert directory to write (default with --mixture: MIXTURE/experts/NAME)"),
    ] = None,
    captions: Annotated[
        Path | None,
        typer.Option(
            help="text models: a file of captions, one per line; their mean pooled embedding becomes the "
            "card's prototype (the prototype gate routes to the expert at once)"
        ),
    ] = None,
    tokens: Annotated[
        int, typer.Option(min=1, max=512, help="text models: token embeddings per prompt (L)")
    ] = 16,
    mixture: Annotated[
        Path | None,
        typer.Option(help="add the expert to this mixture directory's mixture.json (created if absent)"),
    ] = None,
    scheduler: Annotated[
        Path | None,
        typer.Option(
            help="the training schedule's scheduler_config.json (default: the one in or beside SRC)"
        ),
    ] = None,
    prediction_type: Annotated[
        Literal["epsilon", "v_prediction", "sample"] | None,
        typer.Option(help="what the network predicts (default: the scheduler config's, else epsilon)"),
    ] = None,
    sigma_interval: Annotated[
        tuple[float, float] | None,
        typer.Option(help="LO HI: the noise gate routes here only for LO <= sigma < HI (HI may be inf)"),
    ] = None,
) -> None:
    """Import a diffusers UNet2DModel, UNet2DConditionModel or DiTTransformer2DModel (DDPM-trained, safetensors)
    as an expert directory, optionally added to a mixture."""
    from mode_ray.models.importer import add_to_mixture, import_diffusers

    expected = None if mixture is None else mixture / "experts" / name
    if out is None and expected is None:
        raise typer.BadParameter("give --out (the expert directory) or --mixture")
    if out is not None and expected is not None and out.resolve() != expected.resolve():
        raise typer.BadParameter(f"with --mixture the expert lives in {expected}: omit --out or give that")
    target = out if out is not None else expected
    assert target is not None
    try:
        card = import_diffusers(
            src,
            target,
            name,
            captions,
            tokens=tokens,
            scheduler=scheduler,
            prediction_type=prediction_type,
            sigma_interval=sigma_interval,
        )
        added = "" if mixture is None else f", added to {add_to_mixture(mixture, name)}"
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    c = card.condition
    typer.echo(
        f"wrote {target} (expert {card.name}: {card.backbone}, {card.parameters} parameters, latent "
        f"{list(card.latent_shape)}, condition {c.type} dim {c.dim}"
        f"{f' tokens {c.tokens}' if c.tokens else ''}{', prototype' if card.prototype else ''}){added}"
    )


experts_app = typer.Typer(
    help="List, hot-add, replace and remove experts of a running cluster.", no_args_is_help=True
)
app.add_typer(experts_app, name="experts")
Url = Annotated[str, typer.Option(help="the cluster's HTTP address")]
Token = Annotated[
    str | None, typer.Option(envvar="MODE_RAY_ADMIN_TOKEN", help="admin token (env MODE_RAY_ADMIN_TOKEN)")
]


def _cluster(call):  # type: ignore[no-untyped-def]
    import json

    from mode_ray.client import ClusterError

    try:
        typer.echo(json.dumps(call(), indent=2))
    except ClusterError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None


@experts_app.command("list")
def experts_list(url: Url = "http://127.0.0.1:8000") -> None:
    """The registered experts, their state and the registry version."""
    from mode_ray.client import Client

    def brief() -> dict:
        with Client(url) as c:
            listing = c.experts.list()
        keys = ("name", "version", "endpoint", "state", "application")
        return {
            "registry_version": listing["registry_version"],
            "experts": [{k: e.get(k) for k in keys} for e in listing["experts"]],
            "warm_pool": listing.get("warm_pool"),
        }

    _cluster(brief)


@experts_app.command("add")
def experts_add(
    path: Annotated[str, typer.Argument(help="expert directory (under the cluster's expert root)")],
    endpoint: Annotated[
        str, typer.Option(help="'serve' to deploy it, or host:port of an OIP server")
    ] = "serve",
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """Hot-add an expert: validated, loaded into a warm replica (or deployed as its own Serve app), routable
    once it answers ModelReady and its canary pass."""
    from mode_ray.client import Client

    _cluster(lambda: Client(url, token).experts.add(path, endpoint))


@experts_app.command("replace")
def experts_replace(
    name: Annotated[str, typer.Argument(help="expert name")],
    path: Annotated[str, typer.Argument(help="directory of the new version (under the expert root)")],
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """Replace an expert with zero failed requests: the new version is deployed beside the old, proven and
    published; requests admitted before keep the old one, which is drained and deleted."""
    from mode_ray.client import Client

    _cluster(lambda: Client(url, token).experts.replace(name, path))


@experts_app.command("remove")
def experts_remove(
    name: Annotated[str, typer.Argument(help="expert name")],
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """Drain an expert (requests in flight finish with it), then delete its Serve app."""
    from mode_ray.client import Client

    _cluster(lambda: Client(url, token).experts.remove(name))


def _stderr():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True)


def status_table(status: dict):  # type: ignore[no-untyped-def]
    """The `mode-ray status` table of a `GET /v1/status` reply (a rich Table)."""
    from rich.table import Table

    r = status["router"]
    pool = status.get("warm_pool") or {}
    title = (
        f"registry v{status['registry_version']}  |  router: {r['replicas']} replica(s), {r['active']} active, "
        f"{r['queued']} queued, {r['ticks_per_s']} ticks/s, {r['rows_per_s']} rows/s  |  warm pool "
        f"{len(pool.get('free', []))}/{pool.get('target', 0)}"
    )
    table = Table(title=title, title_justify="left")
    for column in ("expert", "version", "state", "replicas", "rows/s", "routed", "call p50 ms"):
        table.add_column(column, justify="left" if column in ("expert", "state") else "right")
    for e in status["experts"]:
        p50 = "-" if e["call_p50_ms"] is None else f"{e['call_p50_ms']:.1f}"
        replicas = "-" if e["replicas"] is None else str(e["replicas"])
        table.add_row(
            e["name"],
            e["version"],
            e["state"],
            replicas,
            f"{e['rows_per_s']:.0f}",
            f"{e['routed_share']:.0%}",
            p50,
        )
    return table


@app.command("status")
def status_cmd(
    url: Url = "http://127.0.0.1:8000",
    once: Annotated[bool, typer.Option("--once", help="print one table and exit (for scripts)")] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="seconds between refreshes")] = 1.0,
) -> None:
    """A live table of the cluster: experts, replicas, rows/s, routed share, call p50, the router's queue;
    refreshed every second until Ctrl-C (rates over the last ~5 s)."""
    import time

    from rich.console import Console
    from rich.live import Live

    from mode_ray.client import Client, ClusterError

    with Client(url, retries=0) as c:
        try:
            if once:
                Console().print(status_table(c.status()))
                return
            with Live(status_table(c.status()), refresh_per_second=4) as live:
                while True:
                    time.sleep(interval)
                    live.update(status_table(c.status()))
        except ClusterError as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            pass


gate_app = typer.Typer(help="Publish a learned gate to a running cluster.", no_args_is_help=True)
app.add_typer(gate_app, name="gate")


@gate_app.command("publish")
def gate_publish(
    path: Annotated[str, typer.Argument(help="learned gate directory (under the model dir or expert root)")],
    url: Url = "http://127.0.0.1:8000",
    token: Token = None,
) -> None:
    """Route new requests with this gate (e.g. from `train gate --extend`): a new registry version, no
    redeploy; requests in flight keep their gate."""
    from mode_ray.client import Client

    _cluster(lambda: Client(url, token).publish_gate(path))


@app.command()
def serve(
    model: Annotated[
        Path,
        typer.Option(help="mixture directory the cluster starts with, or a shipped model: mnist, mnist-text"),
    ] = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="HTTP bind address (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port (generation API and the experts' OIP)")] = 9000,
    state_dir: Annotated[
        Path | None, typer.Option(help="registry directory (env MODE_RAY_STATE_DIR)")
    ] = None,
    expert_root: Annotated[Path | None, typer.Option(help="hot-added experts must live here")] = None,
    expert_cpus: Annotated[float, typer.Option(help="CPUs per expert replica")] = 0.25,
    expert_gpus: Annotated[
        float, typer.Option(help="GPUs per expert replica (fractions pack experts)")
    ] = 0.0,
    max_replicas: Annotated[int, typer.Option(help="autoscaling ceiling per expert")] = 2,
    router_cpus: Annotated[float, typer.Option(help="CPUs of each router replica")] = 0.5,
    router_replicas: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="router replicas (one shared registry; a request whose replica dies runs again)",
        ),
    ] = 1,
    warm_pool: Annotated[
        int,
        typer.Option(
            min=0,
            max=16,
            help="idle expert replicas kept started, so that a hot-add loads into one in about a second",
        ),
    ] = 1,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="ignore the saved registry and start from --model")
    ] = False,
    decoder_placement: Annotated[
        Literal["deployment", "router"],
        typer.Option(help="a latent mixture's decoder: its own Serve deployment, or in each router process"),
    ] = "deployment",
    decoder_gpus: Annotated[float, typer.Option(help="GPUs of the decoder deployment's replica")] = 0.0,
    address: Address = None,
    num_cpus: NumCpus = None,
) -> None:
    """Start Ray (or join --address) and Serve with the mixture; Ctrl-C stops it cleanly."""
    import signal
    import time

    from ray import serve as ray_serve
    from ray.serve.config import gRPCOptions

    from mode_ray import env as mr_env
    from mode_ray.serve.app import build_app
    from mode_ray.serve.config import APP_NAME, GRPC_SERVICER_FUNCTIONS, AppArgs

    args = AppArgs(
        model_dir=model_dir(model).resolve(),
        state_dir=(state_dir or mr_env.state_dir()).resolve(),
        expert_root=expert_root.resolve() if expert_root else None,
        grpc_target=f"127.0.0.1:{grpc_port}",
        restore=not fresh,
        warm_pool=warm_pool,
        expert={
            "num_cpus": expert_cpus,
            "num_gpus": expert_gpus,
            "max_replicas": max_replicas,
            # a Ray of its own on this machine: the experts' direct OIP ports on loopback, not on the network
            **({} if address or os.environ.get("RAY_ADDRESS") else {"direct_host": "127.0.0.1"}),
        },
        router={"num_cpus": router_cpus, "num_replicas": router_replicas},
        decoder={"placement": decoder_placement, "num_gpus": decoder_gpus, "num_cpus": router_cpus},
    )
    _ray(address, num_cpus)
    ray_serve.start(
        http_options={"host": host, "port": port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
    )
    typer.echo("deploying the router and the experts ...")
    ray_serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    typer.echo(
        f"playground  http://{host}:{port}/\n"
        f"HTTP  http://{host}:{port}/v1/generate   (GET /v1/experts, GET /v1/status, GET /healthz)\n"
        f"      curl -s -X POST {host}:{port}/v1/generate -H 'content-type: application/json' "
        f'-d \'{{"prompt": "seven", "num_images": 16}}\' -o grid.png\n'
        f"gRPC  {host}:{grpc_port}  mode_ray.v1.GenerationService, experts via inference.GRPCInferenceService\n"
        f"admin API {'on' if mr_env.admin_token() else 'off (set MODE_RAY_ADMIN_TOKEN to enable)'}\n"
        "Ctrl-C to stop."
    )
    stop = {"now": False}
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored (e.g. `nohup ... &`)
        signal.signal(sig, lambda *_: stop.update(now=True))
    while not stop["now"]:
        time.sleep(0.5)
    typer.echo("stopping ...")
    ray_serve.shutdown()
    import ray

    ray.shutdown()


def main() -> None:
    app()


if __name__ == "__main__":
    main()

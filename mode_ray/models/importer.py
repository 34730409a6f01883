"""Bring-your-own experts: a diffusers save as an expert directory (`mode-ray import diffusers <src>`).

`src` is a saved pipeline (`model_index.json` with `unet/` or `transformer/`, and `scheduler/`) or one saved
model (`config.json` + `diffusion_pytorch_model.safetensors`, the scheduler config beside it or given). The
expert directory written is what `save_expert` writes for the card's `build_denoiser`: `expert.json` (backbone
and backbone_config from the model's config, the DDPM parametrization from the scheduler config) and
`model.safetensors`. Only safetensors weights are read; a pipeline's VAE and text encoder are not imported
(the expert denoises in the model's own latent space).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from mode_ray.models.card import Condition, DataSummary, ExpertCard, Parametrization, format_validation_error
from mode_ray.models.checkpoint import (
    PICKLE_SUFFIXES,
    CheckpointError,
    build_denoiser,
    check_expert,
    load_card,
    save_expert,
)
from mode_ray.models.conditions import pooled
from mode_ray.models.diffusers_adapter import MODEL_CLASSES, training_sigmas

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = f"{WEIGHTS}.index.json"  # a sharded save
SCHEDULER_FILE = "scheduler_config.json"
DEFAULT_TOKENS = 16  # L, as the text encoder's default
CAPTION_BATCH = 64


@dataclass(frozen=True)
class DiffusersSource:
    """A diffusers model found on disk: its directory, class name, config, and its training schedule."""

    model_dir: Path
    model_class: str
    config: dict[str, Any]
    scheduler_config: dict[str, Any]


def _read(path: Path, what: str, hint: str = "") -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} is missing{hint}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what}: {path} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _scheduler_file(path: Path) -> Path:
    return path / SCHEDULER_FILE if path.is_dir() else path


def find_source(src: Path, scheduler: Path | None = None) -> DiffusersSource:
    """The model and schedule of a saved pipeline or model directory; `scheduler` (a scheduler_config.json or
    its directory) overrides the one found in the save."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(
            f"{src} is not a directory: give a saved diffusers pipeline (model_index.json) or model "
            f"(config.json + {WEIGHTS})"
        )
    if (src / "model_index.json").is_file():
        index = _read(src / "model_index.json", "pipeline index")
        component = next((c for c in ("unet", "transformer") if c in index), None)
        if component is None:
            parts = sorted(k for k in index if not k.startswith("_"))
            raise CheckpointError(
                f"pipeline {src}: model_index.json names neither 'unet' nor 'transformer' (components: {parts})"
            )
        model_dir, found = src / component, src / "scheduler" / SCHEDULER_FILE
    elif (src / "config.json").is_file():
        model_dir = src
        found = next(
            (p for p in (src / SCHEDULER_FILE, src.parent / "scheduler" / SCHEDULER_FILE) if p.is_file()),
            src / SCHEDULER_FILE,
        )
        if scheduler is None and not found.is_file():
            raise CheckpointError(
                f"model {src}: no {SCHEDULER_FILE} beside it (nor in ../scheduler/): give the training "
                "schedule's scheduler config with --scheduler"
            )
    else:
        raise CheckpointError(
            f"{src} is neither a saved diffusers pipeline (model_index.json) nor a model directory "
            f"(config.json + {WEIGHTS})"
        )
    config = _read(model_dir / "config.json", "model config")
    model_class = str(config.get("_class_name"))
    if model_class not in MODEL_CLASSES:
        raise CheckpointError(
            f"model {model_dir}: class {model_class!r} is not supported; supported: {sorted(MODEL_CLASSES)}"
        )
    if scheduler is not None:
        sched = _read(_scheduler_file(Path(scheduler)), "scheduler config")
    else:
        sched = _read(found, "scheduler config", " (give the training schedule's config with --scheduler)")
    return DiffusersSource(model_dir, model_class, config, sched)


def check_weights(source: DiffusersSource) -> None:
    """A CheckpointError unless the model directory holds safetensors weights (one file or a sharded index);
    pickle checkpoints (.bin, .pt, ...) are never loaded."""
    model_dir = source.model_dir
    if (model_dir / WEIGHTS).is_file() or (model_dir / WEIGHTS_INDEX).is_file():
        return
    files = sorted(p.name for p in model_dir.iterdir() if p.is_file())
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(
            f"model {model_dir}: only pickle weights {pickles[:3]}, and pickle checkpoints are never loaded: "
            f"convert them to safetensors where you trust them (`{source.model_class}.from_pretrained(dir)"
            ".save_pretrained(dir, safe_serialization=True)`)"
        )
    raise CheckpointError(f"model {model_dir}: {WEIGHTS} is missing (found {files[:8]})")


def schedule(source: DiffusersSource, prediction_type: str | None = None) -> dict[str, Any]:
    """The DDPM training schedule of the card: the DDPMScheduler keys of the source's scheduler config."""
    from diffusers import DDPMScheduler

    raw = source.scheduler_config
    if not any(k in raw for k in ("beta_start", "beta_schedule", "trained_betas")):
        raise CheckpointError(
            f"scheduler {raw.get('_class_name')!r} has no DDPM beta schedule (beta_start, beta_schedule or "
            "trained_betas): only VP (DDPM-trained) models are supported, not flow matching or EDM ones"
        )
    if raw.get("rescale_betas_zero_snr"):
        raise CheckpointError(
            "scheduler config: rescale_betas_zero_snr is true (infinite sigma_max); it is not supported"
        )
    keys = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    config = {k: v for k, v in raw.items() if k in keys}
    config["prediction_type"] = prediction_type or raw.get("prediction_type", "epsilon")
    return config


def latent_shape(source: DiffusersSource) -> tuple[int, int, int]:
    c = source.config
    size = c.get("sample_size")
    if size is None:
        raise CheckpointError(f"model {source.model_dir}: config.json has no sample_size (the latent size)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(c.get("in_channels", 4)), int(h), int(w)


def condition(source: DiffusersSource, tokens: int) -> Condition:
    """The card's condition, from the model's config; a CheckpointError for conditioning it cannot read."""
    c, where = source.config, f"model {source.model_dir} ({source.model_class})"
    if source.model_class == "DiTTransformer2DModel":
        return Condition(type="class_label", dim=int(c.get("num_embeds_ada_norm") or 1000))
    unsupported = {
        k: c.get(k)
        for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim")
        if c.get(k) is not None
    }
    if source.model_class == "UNet2DConditionModel":
        if c.get("num_class_embeds") is not None:
            unsupported["num_class_embeds"] = c["num_class_embeds"]
        if unsupported:
            raise CheckpointError(f"{where}: {unsupported} not supported (only cross-attention on tokens)")
        dim = c.get("cross_attention_dim", 1280)
        if isinstance(dim, list) and len(set(dim)) != 1:
            raise CheckpointError(f"{where}: cross_attention_dim {dim} differs between blocks; not supported")
        dim = int(dim[0] if isinstance(dim, list) else dim)
        if tokens < 1:
            raise CheckpointError(f"tokens must be >= 1 for a cross-attention model, got {tokens}")
        return Condition(type="text", dim=dim, tokens=tokens)
    if unsupported:
        raise CheckpointError(f"{where}: {unsupported} not supported (only num_class_embeds class labels)")
    n = c.get("num_class_embeds")
    if n is None:
        return Condition(type="none", dim=0)
    if n < 2:
        raise CheckpointError(f"{where}: num_class_embeds is {n}; a class-conditional model needs >= 2")
    return Condition(type="class_label", dim=n - 1)  # the last embedding is the null class


def caption_prototype(captions: Path, cond: Condition) -> tuple[list[float], str]:
    """The mean pooled embedding of the captions (one per line) through the text encoder, and its name."""
    from mode_ray.models.text import TextEncoder

    if cond.type != "text":
        raise CheckpointError(
            f"--captions: only a text-conditioned model has a caption prototype, this is {cond.type!r}"
        )
    try:
        lines = [line.strip() for line in Path(captions).read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"--captions: {captions} cannot be read ({e})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise CheckpointError(f"--captions: {captions} holds no caption (one per line)")
    encoder = TextEncoder(tokens=0, precision="float32")  # once per import: the reference precision
    if encoder.dim != cond.dim:
        raise CheckpointError(
            f"--captions: the text encoder {encoder.name} gives {encoder.dim}-d embeddings, the model's "
            f"condition has dim {cond.dim}"
        )
    total = torch.zeros(encoder.dim, dtype=torch.float64)
    for i in range(0, len(lines), CAPTION_BATCH):
        total += pooled(encoder.encode(lines[i : i + CAPTION_BATCH])).double().sum(0)  # (D,)
    return (total / len(lines)).tolist(), encoder.name


def import_diffusers(
    src: Path,
    out: Path,
    name: str,
    captions: Path | None = None,
    *,
    tokens: int = DEFAULT_TOKENS,
    scheduler: Path | None = None,
    prediction_type: str | None = None,
    sigma_interval: tuple[float, float] | None = None,
) -> ExpertCard:
    """Write the expert directory `out` for the diffusers save `src`; returns its card.

    captions: a text file, one caption per line; the card's prototype becomes their mean pooled embedding
    (text models). tokens: L, token embeddings per prompt (text models). scheduler: the training schedule's
    scheduler config (default: the one in the save). prediction_type: overrides the scheduler config's.
    sigma_interval: [lo, hi), where the noise gate routes to this expert.
    """
    source = find_source(Path(src), scheduler)
    check_weights(source)
    cond = condition(source, tokens)
    ddpm = schedule(source, prediction_type)
    prototype, encoder = caption_prototype(captions, cond) if captions is not None else (None, None)
    try:
        card = ExpertCard(
            name=name,
            backbone=MODEL_CLASSES[source.model_class],
            backbone_config={k: v for k, v in source.config.items() if not k.startswith("_")},
            parametrization=Parametrization(
                kind="ddpm", prediction_type=ddpm["prediction_type"], scheduler_config=ddpm
            ),
            latent_shape=latent_shape(source),
            condition=cond.model_copy(update={"encoder": encoder}),
            prototype=prototype,
            sigma_interval=sigma_interval,
            data=DataSummary(
                dataset="imported", source=str(Path(src).resolve()), model_class=source.model_class
            ),
        )
    except ValidationError as e:
        raise CheckpointError(format_validation_error(e, "card")) from None
    try:  # the card's backbone_config must rebuild the very architecture of the saved weights
        adapter = build_denoiser(card)
        adapter.net.load_state_dict(load_model(source).state_dict())
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a config diffusers rejects, or weights it does not fit
        raise CheckpointError(
            f"model {source.model_dir}: {source.model_class} does not build from it ({e})"
        ) from None
    save_expert(out, card, adapter)
    return check_expert(out)


def load_model(source: DiffusersSource) -> torch.nn.Module:
    """The saved model with its weights (safetensors only; diffusers converts legacy key names)."""
    import diffusers

    cls = getattr(diffusers, source.model_class)
    try:
        return cls.from_pretrained(
            source.model_dir, use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False
        ).float()
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"model {source.model_dir}: the weights do not load ({e})") from None


def add_to_mixture(mixture: Path, name: str, steps: int = 25) -> Path:
    """Add the expert `mixture/experts/<name>` to `mixture/mixture.json`, creating a one-expert mixture
    (euler, `steps` steps, the noise and prototype gates, top_k 1, guidance off, the sigma range of the
    expert's training schedule) when there is none. Returns the mixture.json path."""
    mixture = Path(mixture)
    card = load_card(mixture / "experts" / name)
    path = mixture / "mixture.json"
    if path.is_file():
        config = _read(path, "mixture config")
        experts = list(config.get("experts", []))
        if experts and name not in experts:
            try:
                load_card(mixture / "experts" / experts[0]).compatible_with(card)
            except ValueError as e:
                raise CheckpointError(f"{path}: {e}") from None
        config["experts"] = experts if name in experts else [*experts, name]
    else:
        sigmas = training_sigmas(card.parametrization.scheduler_config or {})  # (T,) increasing
        c = card.condition
        config = {
            "name": mixture.name,
            "experts": [name],
            "gate": {"prototype_tau": 0.1, "noise": True, "learned": None},
            "top_k": 1,
            "sampler": "euler",
            "steps": steps,
            "guidance_scale": 1.0,
            "sigma_min": float(sigmas[0]),
            "sigma_max": float(sigmas[-1]),
            "condition": c.type,
            "class_names": (c.names or [str(i) for i in range(c.dim)]) if c.type == "class_label" else [],
            "text_tokens": c.tokens,
        }
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path

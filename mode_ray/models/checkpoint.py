"""Expert checkpoints: a directory with `expert.json` (the card) and `model.safetensors`. Nothing else loads."""

from __future__ import annotations

import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mode_ray.diffusion import EDMPrecond
from mode_ray.models.card import ExpertCard, format_validation_error, read_json
from mode_ray.models.unet import UNet, UNetConfig

CARD_FILE, WEIGHTS_FILE = "expert.json", "model.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
MAX_CARD_BYTES = 1 << 20  # a card is a few KB; a bigger one is not a card
MAX_WEIGHTS_BYTES = 64 << 30


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Expert:
    """A loaded expert: its card and its denoiser `D(x, sigma, cond) -> x0_hat` (an nn.Module in eval mode)."""

    card: ExpertCard
    denoiser: nn.Module

    @property
    def name(self) -> str:
        return self.card.name


def build_denoiser(card: ExpertCard) -> nn.Module:
    """An untrained denoiser with the architecture the card describes."""
    if card.backbone == "unet":
        try:
            config = UNetConfig(**card.backbone_config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"expert {card.name!r}: backbone_config is invalid: {e}") from None
        return EDMPrecond(UNet(config), sigma_data=card.parametrization.sigma_data)
    if card.backbone == "dit":
        from mode_ray.models.dit import build_dit

        return build_dit(card)
    from mode_ray.models.diffusers_adapter import build_diffusers

    return build_diffusers(card)


def save_artifact(
    path: str | Path,
    card_file: str,
    card_json: str,
    module: nn.Module,
    metadata: dict[str, str] | None = None,
) -> Path:
    """The one saver of every artifact (experts, gates, the classifier): a directory holding the JSON card
    `card_file` and the module's weights as contiguous CPU tensors in `model.safetensors`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt", **(metadata or {})})
    (path / card_file).write_text(card_json.rstrip("\n") + "\n")
    return path


def save_expert(path: str | Path, card: ExpertCard, denoiser: nn.Module) -> Path:
    """Write `card` and the denoiser's weights to the directory `path`."""
    if card.parameters == 0:
        card = card.model_copy(update={"parameters": sum(p.numel() for p in denoiser.parameters())})
    return save_artifact(path, CARD_FILE, card.model_dump_json(indent=2), denoiser, {"expert": card.name})


def load_card(path: str | Path) -> ExpertCard:
    """Read and validate `expert.json` in the expert directory `path`."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not an expert directory (expected {CARD_FILE} and {WEIGHTS_FILE})")
    try:
        return ExpertCard.model_validate(read_json(path / CARD_FILE, "expert card"))
    except ValidationError as e:
        raise CheckpointError(f"{path / CARD_FILE}: {format_validation_error(e, 'card')}") from None
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None


def check_files(
    path: Path, names: Sequence[str] = (CARD_FILE, WEIGHTS_FILE), within: Path | None = None
) -> None:
    """A CheckpointError unless each of `names` in the directory `path` is a regular file (not a FIFO, device
    or directory: nothing that could block a reader), of a sane size (the card at most MAX_CARD_BYTES, weights
    at most MAX_WEIGHTS_BYTES), and, when `within` is given, lies inside it once links are resolved (a link to
    a file elsewhere is refused, not followed). Only stat is used: no file is opened."""
    root = None if within is None else within.resolve()
    for name in names:
        f = path / name
        try:
            real = f.resolve(strict=True)
            st = real.stat()
        except FileNotFoundError:
            raise CheckpointError(f"{f} is missing (the directory must hold {', '.join(names)})") from None
        except (OSError, RuntimeError) as e:  # a link loop, a name too long, no permission
            raise CheckpointError(f"{f} cannot be read: {getattr(e, 'strerror', None) or e}") from None
        if root is not None and not real.is_relative_to(root):
            raise CheckpointError(f"{f} links to {real}, outside {root}; copy the file in instead")
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{f} is not a regular file")
        limit = MAX_CARD_BYTES if name.endswith(".json") else MAX_WEIGHTS_BYTES
        if st.st_size > limit or st.st_size == 0:
            raise CheckpointError(f"{f} has {st.st_size} bytes; expected 1..{limit}")


def check_expert(path: str | Path, within: Path | None = None) -> ExpertCard:
    """Everything that can be checked of an expert directory without building or loading its model: the files
    (`check_files`), the card, and the safetensors header (tensor names and shapes against the architecture
    the card describes, built on the meta device: no memory, no weights read). The router runs this before it
    deploys; the replica then loads the weights, and a canary pass proves them."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not an expert directory (expected {CARD_FILE} and {WEIGHTS_FILE})")
    check_files(path, within=within)
    card = load_card(path)
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_denoiser(card).state_dict().items()}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a config the architecture rejects
        raise CheckpointError(f"expert {card.name!r}: backbone_config does not build a model: {e}") from None
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"expert {card.name!r}: {path / WEIGHTS_FILE} is not a valid safetensors file ({e})"
        ) from None
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"expert {card.name!r}: {path / WEIGHTS_FILE} missing tensors {missing[:5]}, unexpected tensors {extra[:5]}"
        )
    for k, shape in expected.items():
        if found[k] != shape:
            raise CheckpointError(
                f"expert {card.name!r}: tensor {k!r} in {path / WEIGHTS_FILE} has shape {list(found[k])}, "
                f"expected {list(shape)}"
            )
    return card


def load_state(path: Path, expected: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Load safetensors from `path` and check names and shapes against `expected` (a state_dict)."""
    if not path.is_file():
        pickles = sorted(p.name for p in path.parent.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = (
            f"; found {pickles}: pickle checkpoints are never loaded, convert to safetensors"
            if pickles
            else ""
        )
        raise CheckpointError(f"{what}: {path} is missing{hint}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{what}: {path} is not a valid safetensors file ({e})") from None
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{what}: {path} missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise CheckpointError(
                f"{what}: tensor {k!r} in {path} has shape {list(state[k].shape)}, expected {list(v.shape)}"
            )
    return state


def load_expert(path: str | Path, device: str | torch.device = "cpu") -> Expert:
    """Load an expert directory; a CheckpointError for anything but a valid card and matching safetensors."""
    path = Path(path)
    card = load_card(path)
    denoiser = build_denoiser(card)
    state = load_state(path / WEIGHTS_FILE, denoiser.state_dict(), f"expert {card.name!r}")
    denoiser.load_state_dict(state)
    return Expert(card, denoiser.to(device).eval().requires_grad_(False))

"""Every environment variable mode_ray reads, declared once, typed, with its default."""

from __future__ import annotations

import os
from pathlib import Path


def _path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else default


def cache_dir() -> Path:
    """MODE_RAY_CACHE: where converted data sets are cached (default ~/.cache/mode_ray)."""
    return _path("MODE_RAY_CACHE", Path.home() / ".cache" / "mode_ray")


def admin_token() -> str | None:
    """MODE_RAY_ADMIN_TOKEN: enables the admin API (hot-add/remove) when set; Bearer token it requires."""
    token = os.environ.get("MODE_RAY_ADMIN_TOKEN", "").strip()
    return token or None


def state_dir() -> Path:
    """MODE_RAY_STATE_DIR: where the expert registry is persisted (default ~/.local/state/mode_ray)."""
    return _path("MODE_RAY_STATE_DIR", Path.home() / ".local" / "state" / "mode_ray")


def device() -> str:
    """MODE_RAY_DEVICE: 'cuda' or 'cpu'; default: cuda when available."""
    value = os.environ.get("MODE_RAY_DEVICE")
    if value:
        return value
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def train_storage() -> str:
    """MODE_RAY_TRAIN_STORAGE: Ray Train storage_path for run state and checkpoints (default ./runs/ray_train).
    On several nodes it must be shared: a mounted volume or a URI such as s3://bucket/runs."""
    value = os.environ.get("MODE_RAY_TRAIN_STORAGE")
    return value if value else str((Path("runs") / "ray_train").resolve())

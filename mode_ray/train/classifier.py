"""The project's own evaluation classifier (Inception weights cannot be downloaded): a small CNN whose
penultimate features drive the classifier-FID and whose predictions judge class-conditional samples."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mode_ray.models.card import read_json
from mode_ray.models.checkpoint import load_state, save_artifact


class Classifier(nn.Module):
    """images (B, 1, 28, 28) in [-1, 1] -> logits (B, classes); `features` gives the (B, feature_dim) FID features."""

    def __init__(
        self, classes: int = 10, width: int = 32, feature_dim: int = 128, in_channels: int = 1
    ) -> None:
        super().__init__()
        self.config = {
            "classes": classes,
            "width": width,
            "feature_dim": feature_dim,
            "in_channels": in_channels,
        }
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, w, 14, 14)
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 2w, 7, 7)
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(2 * w * 49, feature_dim),
            nn.ReLU(),  # (B, feature_dim)
        )
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(feature_dim, classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


def save_classifier(path: str | Path, model: Classifier, metrics: dict) -> Path:
    card = json.dumps({"config": model.config, "metrics": metrics}, indent=2)
    return save_artifact(path, "classifier.json", card, model)


def load_classifier(path: str | Path) -> Classifier:
    path = Path(path)
    card = read_json(path / "classifier.json", "classifier card")
    model = Classifier(**card["config"])
    model.load_state_dict(load_state(path / "model.safetensors", model.state_dict(), "classifier"))
    return model.eval().requires_grad_(False)

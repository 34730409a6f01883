"""Captions for labelled digit images: the label in several phrasings plus two attributes measured on the
image (stroke thickness and slant), so a text-conditioned model learns from free text, not from an index.

`CaptionTable` holds every caption a data set can get (label x template x thickness x slant), each encoded
once by the text encoder; training draws one template per example per step and indexes the table, so the
encoder never runs inside the training loop. `UNSEEN` phrasings are held out of training: the evaluation
measures how the model follows prompts it never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mode_ray.models.conditions import DIGIT_NAMES, pooled

THICKNESS = ("thin", "regular", "thick")
SLANT = ("left-slanted", "upright", "right-slanted")

# {name}: "seven"; {digit}: "7"; {thick} / {slant}: the measured attributes
TEMPLATES = (
    "a handwritten {name}",
    "the digit {digit}",
    "{name}",
    "a {thick}, {slant} {digit}",
    "a {thick} handwritten {name}",
    "a {name}, {slant}",
    "digit {name}",
    "a {digit} written with a {thick} pen",
)
DEFAULT_TEMPLATE = TEMPLATES[0]  # what the evaluation asks with unless told otherwise
UNSEEN = (  # never in training: the paraphrase test of the evaluation
    "number {name}",
    "a {digit}",
    "{name}, handwritten",
    "an image of the number {digit}",
    "handwritten digit {name}",
)


def attributes(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the tercile of its ink mass (thickness: 0 thin, 1 regular, 2 thick) and of its slant (the
    second moment xy / yy of the ink: 0 left, 1 upright, 2 right). images: (N, 1, H, W) in [-1, 1]."""
    ink = ((images[:, 0] + 1) / 2).clamp(0, 1)  # (N, H, W)
    mass = ink.sum(dim=(1, 2))  # (N,)
    h, w = ink.shape[1:]
    ys = torch.arange(h, dtype=ink.dtype)[None, :, None]
    xs = torch.arange(w, dtype=ink.dtype)[None, None, :]
    total = mass.clamp_min(1e-6)
    cy = (ink * ys).sum(dim=(1, 2)) / total
    cx = (ink * xs).sum(dim=(1, 2)) / total
    dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
    # x grows to the right and y downwards: a stroke leaning right has x growing as y shrinks
    slant = -(ink * dx * dy).sum(dim=(1, 2)) / (ink * dy * dy).sum(dim=(1, 2)).clamp_min(1e-6)
    return _terciles(mass), _terciles(slant)


def _terciles(v: torch.Tensor) -> torch.Tensor:
    q = torch.quantile(v.double(), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    return torch.bucketize(v.double(), q)


def caption(template: str, label: int, thick: int = 1, slant: int = 1) -> str:
    return template.format(name=DIGIT_NAMES[label], digit=label, thick=THICKNESS[thick], slant=SLANT[slant])


@dataclass(frozen=True)
class CaptionTable:
    """Every caption of (label, template, thickness, slant), encoded: conds (K, ...) packed; index[l, t, a, s]
    -> row of conds."""

    captions: tuple[str, ...]
    conds: torch.Tensor
    index: torch.Tensor  # (labels, templates, 3, 3) long

    @classmethod
    def build(cls, encode, labels: int = 10, templates: Sequence[str] = TEMPLATES) -> CaptionTable:  # noqa: ANN001
        """`encode(list[str]) -> (K, ...)`: the text encoder's."""
        texts: dict[str, int] = {}
        index = torch.zeros((labels, len(templates), len(THICKNESS), len(SLANT)), dtype=torch.long)
        for lab in range(labels):
            for t, template in enumerate(templates):
                for a in range(len(THICKNESS)):
                    for s in range(len(SLANT)):
                        text = caption(template, lab, a, s)
                        index[lab, t, a, s] = texts.setdefault(text, len(texts))
        captions = tuple(texts)
        conds = torch.cat([encode(list(captions[i : i + 256])) for i in range(0, len(captions), 256)])
        return cls(captions, conds, index)

    def draw(
        self, labels: torch.Tensor, thick: torch.Tensor, slant: torch.Tensor, g: torch.Generator
    ) -> torch.Tensor:
        """One caption per example (a template drawn uniformly): conds (B, ...)."""
        t = torch.randint(self.index.shape[1], labels.shape, generator=g)
        return self.conds[self.index[labels, t, thick, slant]]

    def mean_pooled(self, labels: torch.Tensor, thick: torch.Tensor, slant: torch.Tensor) -> torch.Tensor:
        """(D,): the mean pooled embedding over every caption these examples can get (an expert's prototype)."""
        rows = self.index[labels, :, thick, slant].flatten()  # (N * templates,)
        return pooled(self.conds)[rows].mean(dim=0)

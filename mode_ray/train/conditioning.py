"""What a training job conditions on: one-hot class labels, or captions of the labels (and of attributes
measured on each image) encoded by the text encoder. The loop asks `draw` for each batch's conditions (with
condition dropout to the null condition, all zeros, in both cases) and the card gets `condition` and
`prototype` from here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mode_ray.models.card import Condition
from mode_ray.models.conditions import one_hot
from mode_ray.train.captions import CaptionTable, attributes


@dataclass(frozen=True)
class Conditioner:
    """kind "class_label": cond (B, D = classes); kind "text": packed captions (B, 1 + L, 384), where the
    table, thickness and slant belong to the job's images (aligned with its example index)."""

    kind: str
    class_names: tuple[str, ...]
    tokens: int = 0
    table: CaptionTable | None = None
    thick: torch.Tensor | None = None
    slant: torch.Tensor | None = None
    encoder: str | None = None

    @classmethod
    def build(
        cls,
        kind: str,
        class_names: tuple[str, ...],
        images: torch.Tensor,
        labels: torch.Tensor,
        tokens: int = 16,
    ) -> Conditioner:
        """images: (N, C, H, W) and labels: (N,) of the job's examples."""
        if kind == "class_label":
            return cls(kind, class_names)
        if kind != "text":
            raise ValueError(f"condition must be class_label or text, got {kind!r}")
        if (labels < 0).any():
            raise ValueError("a text condition needs labelled data: its captions are made from the labels")
        from mode_ray.models.text import shared_encoder

        encoder = shared_encoder(tokens, "float32")  # once per caption table: the reference precision
        thick, slant = attributes(images)
        table = CaptionTable.build(encoder.encode, labels=len(class_names))
        return cls(kind, class_names, tokens, table, thick, slant, encoder.name)

    @property
    def dim(self) -> int:
        return len(self.class_names) if self.table is None else self.table.conds.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """One row's condition: (D,) or (1 + L, D)."""
        return tuple(self.table.conds.shape[1:]) if self.table is not None else (self.dim,)

    def draw(
        self, idx: torch.Tensor, labels: torch.Tensor, drop: torch.Tensor, g: torch.Generator
    ) -> torch.Tensor:
        """Conditions of the examples idx (B,) with labels (B,); rows where drop (B,) is True are null."""
        if self.table is None:
            return one_hot(torch.where(drop, -1, labels), self.dim)
        assert self.thick is not None and self.slant is not None
        cond = self.table.draw(labels, self.thick[idx], self.slant[idx], g)
        return torch.where(drop.reshape(-1, *[1] * (cond.dim() - 1)), 0.0, cond)

    def condition(self) -> Condition:
        """The card's condition."""
        if self.table is None:
            return Condition(type="class_label", dim=self.dim, names=list(self.class_names))
        return Condition(
            type="text", dim=self.dim, names=list(self.class_names), tokens=self.tokens, encoder=self.encoder
        )

    def prototype(self, index: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """The mean condition of the examples `index` (into the job's examples) with `labels`: the class
        shares, or the mean pooled embedding of every caption they can get (what the prototype gate reads)."""
        if self.table is None:
            counts = torch.bincount(labels[labels >= 0], minlength=self.dim)
            return (counts.float() / counts.sum().clamp(min=1)).tolist()
        assert self.thick is not None and self.slant is not None
        return self.table.mean_pooled(labels, self.thick[index], self.slant[index]).tolist()

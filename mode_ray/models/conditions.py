"""Condition encoders: prompt -> cond (B, D). The default encodes the data set's class labels one-hot.

The all-zeros row is the null condition (unconditional branch of classifier-free guidance), which is
what experts see during condition dropout.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from mode_ray.models.card import shown

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class ClassLabelEncoder:
    """One-hot class conditions. Accepts `7`, `"7"`, `"seven"`, `"digit 7"`, `"digit seven"` (any case)."""

    def __init__(self, names: Sequence[str] = DIGIT_NAMES, noun: str = "digit") -> None:
        self.names = tuple(n.lower() for n in names)
        self.noun = noun
        self.dim = len(self.names)

    def label(self, prompt: str | int) -> int:
        """The class index of one prompt; a ValueError that lists the accepted forms otherwise."""
        if isinstance(prompt, bool):
            raise ValueError(f"prompt {prompt!r} is not a known class: use a class index or name")
        if isinstance(prompt, int):
            if 0 <= prompt < self.dim:
                return prompt
        else:
            text = re.sub(
                rf"^\s*(a\s+|an\s+)?{re.escape(self.noun)}\s+", "", str(prompt).strip().lower()
            ).strip()
            if text.isdigit() and 0 <= int(text) < self.dim:
                return int(text)
            if text in self.names:
                return self.names.index(text)
        raise ValueError(
            f"prompt {shown(prompt)} is not a known class: use an index 0..{self.dim - 1}, a name such as "
            f"{self.names[min(7, self.dim - 1)]!r}, or '{self.noun} <index|name>'"
        )

    def labels(self, prompts: Sequence[str | int]) -> list[int]:
        return [self.label(p) for p in prompts]

    def encode(self, prompts: Sequence[str | int]) -> torch.Tensor:
        """cond: (B, D) one-hot rows."""
        return one_hot(torch.tensor(self.labels(prompts), dtype=torch.long), self.dim)


def one_hot(labels: torch.Tensor, dim: int) -> torch.Tensor:
    """labels: (B,) int -> (B, dim) float32; a label of -1 gives the null (all-zeros) row."""
    out = torch.zeros(labels.shape[0], dim)
    keep = labels >= 0
    out[keep, labels[keep]] = 1.0
    return out


# ---- text conditions, packed into one tensor --------------------------------------------------------------
# A text condition travels through the mixture as ONE tensor per row batch: (B, 1 + L, D), row 0 the pooled
# sentence embedding (what gates and pooled-only experts read), rows 1..L the token embeddings (what
# cross-attention experts read), zero vectors past the prompt's last token. One tensor keeps every step of the
# mixture unchanged (row slicing, stacking requests, guidance's null copy `zeros_like`), and the all-zeros
# condition stays the null condition. A pooled-only condition is the plain (B, D).


def pack(pooled_emb: torch.Tensor, token_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pooled_emb: (B, D), token_emb: (B, L, D), mask: (B, L) bool -> cond (B, 1 + L, D), tokens past the
    mask zeroed."""
    tokens_kept = token_emb * mask[..., None].to(token_emb.dtype)
    return torch.cat([pooled_emb[:, None], tokens_kept], dim=1)


def pooled(cond: torch.Tensor) -> torch.Tensor:
    """(B, D) of a pooled (B, D) or packed (B, 1 + L, D) condition."""
    return cond[:, 0] if cond.dim() == 3 else cond


def tokens(cond: torch.Tensor) -> torch.Tensor | None:
    """(B, L, D) token embeddings of a packed condition; None for a pooled one."""
    return cond[:, 1:] if cond.dim() == 3 else None


def token_mask(cond: torch.Tensor) -> torch.Tensor | None:
    """(B, L) bool: True where a packed condition has a token (a non-zero embedding); None for a pooled one.
    A null row (all zeros) has no tokens."""
    t = tokens(cond)
    return None if t is None else t.ne(0).any(dim=-1)

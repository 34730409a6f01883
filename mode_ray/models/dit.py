"""A small conditional DiT for EDM experts (Peebles & Xie 2023): one self-contained file, presets in
`DIT_PRESETS`.

Patches of the image are tokens; each block is self-attention and an MLP modulated by adaLN-Zero (shift, scale
and a zero-initialised gate from the conditioning vector `c = noise embedding + linear(pooled cond)`), with an
optional cross-attention sublayer on a packed text condition's token embeddings (PixArt-alpha style). The raw
network `F(c_in x, c_noise, cond)` is wrapped by `EDMPrecond` to give a `Denoiser`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from mode_ray.diffusion import EDMPrecond
from mode_ray.models.conditions import pooled, token_mask, tokens
from mode_ray.models.unet import FourierEmbedding

if TYPE_CHECKING:
    from mode_ray.models.card import ExpertCard


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of one `DiT`; round-trips through `to_dict()` / `DiTConfig(**d)` into the expert card."""

    in_channels: int = 1
    image_size: int = 28  # side of the (square) training image; other sizes work, their positions computed
    patch_size: int = 2  # p: tokens are p x p patches; the image is padded to a multiple of p inside
    width: int = 64  # token width, divisible by heads and by 4 (the 2-D sin-cos positions)
    depth: int = 6  # blocks
    heads: int = 4
    mlp_ratio: float = 4.0  # MLP hidden width / width
    cond_dim: int = 10  # D of cond: (B, D) or (B, 1 + L, D); 0 for an unconditional-only model
    cross_attention: bool = False  # a cross-attention sublayer per block on a packed condition's tokens

    def __post_init__(self) -> None:
        for name, value, low, high in (
            ("in_channels", self.in_channels, 1, 64),
            ("image_size", self.image_size, 1, 4096),
            ("width", self.width, 4, 4096),
            ("depth", self.depth, 1, 64),
            ("heads", self.heads, 1, 64),
            ("cond_dim", self.cond_dim, 0, 4096),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if self.patch_size not in (2, 4) or isinstance(self.patch_size, bool):
            raise ValueError(f"patch_size must be 2 or 4, got {self.patch_size!r}")
        if self.width % self.heads or self.width % 4:
            raise ValueError(
                f"width must divide by heads={self.heads} and by 4 (sin-cos positions), got {self.width}"
            )
        ratio = self.mlp_ratio
        if not isinstance(ratio, int | float) or isinstance(ratio, bool) or not 0.25 <= ratio <= 16:
            raise ValueError(f"mlp_ratio must be a number in [0.25, 16], got {ratio!r}")
        if not isinstance(self.cross_attention, bool):
            raise ValueError(f"cross_attention must be true or false, got {self.cross_attention!r}")
        if self.cross_attention and self.cond_dim == 0:
            raise ValueError("cross_attention needs token embeddings to attend to: set cond_dim > 0, got 0")
        object.__setattr__(self, "mlp_ratio", float(ratio))

    def to_dict(self) -> dict:
        return asdict(self)


DiTPresetName = Literal["xs", "s", "s2", "m"]  # the CLI's choices with --backbone dit
DIT_PRESETS: dict[str, DiTConfig] = {
    # Sized like the UNet preset of the same name (head width 16 throughout; patch 2: 196 tokens at 28x28).
    # Parameters at cond_dim=10; forward cost per 28x28 sample in brackets, counted by
    # torch.utils.flop_counter with the math attention kernel (it does not see the fused CPU kernel).
    "xs": DiTConfig(width=32, depth=2, heads=2, mlp_ratio=2.5),  # 36k (17 MFLOP): tests only
    "s": DiTConfig(width=64, depth=6, heads=4),  # 0.47M (175 MFLOP): one CPU expert
    "s2": DiTConfig(width=80, depth=7, heads=5),  # 0.84M (298 MFLOP): dense = top-2 active params
    "m": DiTConfig(width=112, depth=7, heads=7),  # 1.65M (535 MFLOP): dense = four experts' total
}
assert tuple(DIT_PRESETS) == get_args(DiTPresetName)


def sincos_2d(grid_h: int, grid_w: int, dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Fixed 2-D sin-cos positions (MAE / DiT): half the channels encode the row, half the column.
    Returns (grid_h * grid_w, dim)."""
    quarter = dim // 4
    freqs = torch.exp(-math.log(10_000) * torch.arange(quarter, device=device) / quarter)  # (dim/4,)
    rows = torch.arange(grid_h, device=device).float()[:, None] * freqs  # (gh, dim/4)
    cols = torch.arange(grid_w, device=device).float()[:, None] * freqs  # (gw, dim/4)
    rows = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None].expand(-1, grid_w, -1)  # (gh, gw, dim/2)
    cols = torch.cat([cols.sin(), cols.cos()], dim=1)[None].expand(grid_h, -1, -1)  # (gh, gw, dim/2)
    return torch.cat([rows, cols], dim=2).reshape(grid_h * grid_w, dim)


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """h: (B, N, W), shift and scale: (B, 1, W)."""
    return h * (1 + scale) + shift


class SelfAttention(nn.Module):
    """Multi-head self-attention over the N patch tokens."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, w = h.shape
        qkv = self.qkv(h).reshape(b, n, 3, self.heads, w // self.heads)  # (B, N, 3, heads, W/heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, W/heads) each
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, W/heads)
        return self.out(a.transpose(1, 2).reshape(b, n, w))  # (B, N, W)


class CrossAttention(nn.Module):
    """Pre-norm cross-attention: queries from the image tokens, keys and values from the condition's tokens,
    padding masked out. A row with no tokens (the null condition) gets exactly zero, as if cond were None."""

    def __init__(self, width: int, heads: int, cond_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.q, self.kv = nn.Linear(width, width), nn.Linear(cond_dim, 2 * width)
        self.out = nn.Linear(width, width)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h: (B, N, W), context: (B, L, D), mask: (B, L) bool (True: a token) -> (B, N, W)."""
        b, n, w = h.shape
        has_tokens = mask.any(dim=1)  # (B,)
        # a row without tokens attends to its zero padding, not to nothing (NaN), and is dropped below
        attend = mask | ~has_tokens[:, None]  # (B, L)
        q = (
            self.q(self.norm(h)).reshape(b, n, self.heads, w // self.heads).transpose(1, 2)
        )  # (B, heads, N, w/h)
        kv = self.kv(context).reshape(b, -1, 2, self.heads, w // self.heads)  # (B, L, 2, heads, W/heads)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, L, W/heads) each
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])  # (B, heads, N, W/h)
        a = self.out(a.transpose(1, 2).reshape(b, n, w))  # (B, N, W)
        return torch.where(has_tokens[:, None, None], a, 0.0)  # (B, N, W)


class DiTBlock(nn.Module):
    """adaLN-Zero block: self-attention, [cross-attention], MLP; at initialisation the identity."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        w = cfg.width
        self.norm1 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(w, cfg.heads)
        self.cross = CrossAttention(w, cfg.heads, cfg.cond_dim) if cfg.cross_attention else None
        self.norm2 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        hidden = round(w * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(w, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, w))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 6 * w))
        nn.init.zeros_(self.modulation[-1].weight)  # shift = scale = gate = 0: the "Zero" of adaLN-Zero
        nn.init.zeros_(self.modulation[-1].bias)

    def forward(
        self, h: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """h: (B, N, W), c: (B, W), context: (B, L, D) or None, mask: (B, L) or None -> (B, N, W)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None].chunk(
            6, dim=2
        )  # (B, 1, W)
        h = h + gate1 * self.attn(modulate(self.norm1(h), shift1, scale1))  # (B, N, W)
        if self.cross is not None and context is not None and mask is not None:
            h = h + self.cross(h, context, mask)  # (B, N, W)
        return h + gate2 * self.mlp(modulate(self.norm2(h), shift2, scale2))  # (B, N, W)


class DiT(nn.Module):
    """F(x, c_noise, cond): x (B, C, H, W), c_noise (B,), cond (B, D), (B, 1 + L, D) or None -> (B, C, H, W).

    A pooled condition (or a packed one's pooled row) joins the adaLN conditioning vector; with
    `cross_attention`, a packed condition's token embeddings are attended to as well. H and W are padded up to
    a multiple of the patch size inside and cropped back at the end.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        w, p = cfg.width, cfg.patch_size
        self.grid = -(-cfg.image_size // p)  # patches per side of an image_size image, after padding
        self.register_buffer("pos", sincos_2d(self.grid, self.grid, w), persistent=False)  # (grid^2, W)
        self.patchify = nn.Conv2d(cfg.in_channels, w, p, stride=p)
        self.noise_emb = nn.Sequential(FourierEmbedding(w), nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.cond_emb = nn.Linear(cfg.cond_dim, w, bias=False) if cfg.cond_dim else None  # null row -> 0
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.head = nn.Linear(w, p * p * cfg.in_channels)
        for layer in (self.final_modulation[-1], self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, ch, h_in, w_in = x.shape
        p = self.config.patch_size
        pad_h, pad_w = (-h_in) % p, (-w_in) % p
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))  # (B, C, H', W')
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        pos = self.pos if gh == gw == self.grid else sincos_2d(gh, gw, self.config.width, x.device)  # (N, W)
        h = self.patchify(x).flatten(2).transpose(1, 2)  # (B, N, W), N = gh * gw
        h = h + pos.to(h.dtype)  # (B, N, W)
        c = self.noise_emb(c_noise)  # (B, W)
        context = mask = None
        if self.cond_emb is not None and cond is not None:
            c = c + self.cond_emb(pooled(cond).to(c.dtype))  # (B, W)
            context, mask = tokens(cond), token_mask(cond)  # (B, L, D), (B, L) or None for a pooled cond
            if context is not None:
                context = context.to(h.dtype)
                if context.shape[1] == 0:
                    context = mask = None
        for block in self.blocks:
            h = block(h, c, context, mask)  # (B, N, W)
        shift, scale = self.final_modulation(c)[:, None].chunk(2, dim=2)  # (B, 1, W) each
        out = self.head(modulate(self.final_norm(h), shift, scale))  # (B, N, p * p * C)
        out = out.reshape(b, gh, gw, p, p, ch).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
        out = out.reshape(b, ch, gh * p, gw * p)  # (B, C, H', W')
        return out[..., pad_h // 2 : pad_h // 2 + h_in, pad_w // 2 : pad_w // 2 + w_in]  # (B, C, H, W)


def build_dit(card: ExpertCard) -> nn.Module:
    """The untrained EDM denoiser a `dit` card describes; a CheckpointError naming the expert otherwise."""
    from mode_ray.models.checkpoint import CheckpointError  # checkpoint imports this module lazily

    try:
        config = DiTConfig(**card.backbone_config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"expert {card.name!r}: backbone_config is invalid: {e}") from None
    return EDMPrecond(DiT(config), sigma_data=card.parametrization.sigma_data)

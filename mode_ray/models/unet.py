"""A small conditional UNet for EDM experts: one self-contained file, size presets in `UNET_PRESETS`.

The raw network `F(c_in x, c_noise, cond)` is wrapped by `EDMPrecond` to give a `Denoiser`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from mode_ray.models.conditions import pooled


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of one `UNet`; round-trips through `asdict` / `UNetConfig(**d)` into the expert card."""

    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 64)  # per resolution level; each level after the first halves H, W
    blocks_per_level: int = 1
    attention_levels: tuple[int, ...] = (2,)  # levels with one self-attention block
    emb_dim: int = 128
    cond_dim: int = 10  # D of cond: (B, D); 0 for an unconditional-only model
    groups: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        for name, value, low, high in (
            ("in_channels", self.in_channels, 1, 64),
            ("blocks_per_level", self.blocks_per_level, 1, 8),
            ("emb_dim", self.emb_dim, 1, 4096),
            ("cond_dim", self.cond_dim, 0, 4096),
            ("groups", self.groups, 1, 1024),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if (
            not self.channels
            or len(self.channels) > 6
            or any(not isinstance(c, int) or isinstance(c, bool) or not 1 <= c <= 4096 for c in self.channels)
        ):
            raise ValueError(f"channels must be 1 to 6 integers in [1, 4096], got {list(self.channels)}")
        if any(c % self.groups for c in self.channels):
            raise ValueError(f"every channel count must divide by groups={self.groups}, got {self.channels}")
        if any(not 0 <= a < len(self.channels) for a in self.attention_levels):
            raise ValueError(
                f"attention_levels must index channels {self.channels}, got {self.attention_levels}"
            )

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


PresetName = Literal["xs", "s", "s2", "m", "l"]  # the CLI's choices
UNET_PRESETS: dict[str, UNetConfig] = {
    # Parameter counts at cond_dim=10; forward cost per 28x28 sample in brackets.
    "xs": UNetConfig(channels=(8, 16), attention_levels=(), emb_dim=16, groups=4),  # 38k: tests only
    "s": UNetConfig(channels=(16, 32, 48), emb_dim=64),  # 0.44M (93 MFLOP): one CPU expert
    "s2": UNetConfig(channels=(24, 48, 64), emb_dim=64),  # 0.80M (194 MFLOP): dense = top-2 active params
    "m": UNetConfig(channels=(32, 64, 96), emb_dim=96),  # 1.69M (369 MFLOP): dense = four experts' total
    "l": UNetConfig(
        channels=(128, 256, 256), blocks_per_level=2, attention_levels=(1, 2), emb_dim=512
    ),  # 27M: GPU
}
assert tuple(UNET_PRESETS) == get_args(PresetName)


class FourierEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar noise input c_noise: (B,) -> (B, dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        self.register_buffer(
            "freqs", torch.exp(-math.log(10_000) * torch.arange(half) / half), persistent=False
        )

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise[:, None] * 1000 * self.freqs[None]  # (B, dim/2)
        return torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding as a per-channel scale and shift."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # (B, c_out, 1, 1) each
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(h)


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)  # (B, HW, C) each
        a = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.out(a.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """F(x, c_noise, cond): x (B, C, H, W), c_noise (B,), cond (B, D), (B, 1 + L, D) or None -> (B, C, H, W).

    A packed text condition conditions through its pooled row only (the UNet has no cross-attention).

    H and W must divide by 2 ** (levels - 1) after padding; 28x28 inputs are padded to 32x32 inside.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        e = cfg.emb_dim
        self.noise_emb = nn.Sequential(FourierEmbedding(e), nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.cond_emb = nn.Linear(cfg.cond_dim, e, bias=False) if cfg.cond_dim else None
        self.stem = nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        skips, c = [cfg.channels[0]], cfg.channels[0]
        for level, c_level in enumerate(cfg.channels):
            for _ in range(cfg.blocks_per_level):
                self.down.append(ResBlock(c, c_level, e, cfg.groups))
                c = c_level
                skips.append(c)
                if level in cfg.attention_levels:
                    self.down.append(Attention(c, cfg.groups))
            if level < len(cfg.channels) - 1:
                self.down.append(nn.AvgPool2d(2))
                skips.append(c)
        self.mid = nn.ModuleList(
            [ResBlock(c, c, e, cfg.groups), Attention(c, cfg.groups), ResBlock(c, c, e, cfg.groups)]
        )
        for level in reversed(range(len(cfg.channels))):
            for _ in range(cfg.blocks_per_level + 1):
                self.up.append(ResBlock(c + skips.pop(), cfg.channels[level], e, cfg.groups))
                c = cfg.channels[level]
                if level in cfg.attention_levels:
                    self.up.append(Attention(c, cfg.groups))
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.head = nn.Sequential(
            nn.GroupNorm(cfg.groups, c), nn.SiLU(), nn.Conv2d(c, cfg.in_channels, 3, padding=1)
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        h_in, w_in = x.shape[-2:]
        m = 2 ** (len(self.config.channels) - 1)
        pad_h, pad_w = (-h_in) % m, (-w_in) % m
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))  # (B, C, H', W')
        emb = self.noise_emb(c_noise)  # (B, E)
        if self.cond_emb is not None and cond is not None:
            emb = emb + self.cond_emb(pooled(cond).to(emb.dtype))
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            if not isinstance(layer, Attention):
                skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        out = self.head(h)  # (B, C, H', W')
        return out[..., pad_h // 2 : pad_h // 2 + h_in, pad_w // 2 : pad_w // 2 + w_in]

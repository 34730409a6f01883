"""Counted forward FLOPs of a denoiser (or any module called as model(x, sigma, cond)): the unit in which
training compute is matched and inference compute per image is reported."""

from __future__ import annotations

from collections.abc import Callable

import torch


def forward_flops(
    model: Callable[..., torch.Tensor], shape: tuple[int, ...], cond_shape: tuple[int, ...]
) -> int:
    """FLOPs of one forward pass of one row: x (1, *shape), sigma (1,), cond (1, *cond_shape) or None when
    cond_shape is () (pooled (D,), or (1 + L, D) with token embeddings). Counted by torch's FlopCounterMode
    (matmuls and convolutions; elementwise ops are not counted) with the math attention kernel, which the
    counter sees (it does not see the fused CPU kernel, so a DiT's attention would be free)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.zeros(1, *shape), torch.ones(1), torch.zeros(1, *cond_shape) if cond_shape else None)
    return int(counter.get_total_flops())

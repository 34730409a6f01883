"""A stand-in expert for benchmarks: it answers after a fixed latency that models a GPU forward pass, with a
deterministic cheap output, so a benchmark measures the router and the transport, not CPU convolutions."""

from __future__ import annotations

import time

import torch
from torch import nn


class EmulatedDenoiser(nn.Module):
    """D(x, sigma) = x sigma_data^2 / (sigma^2 + sigma_data^2) (the optimal denoiser of N(0, sigma_data^2)
    data) after sleeping base_ms + per_row_ms * B. Defaults from the H200 figures in
    benchmarks/results/gpu-h200.json: a shipped expert's pass is ~2 ms fixed plus ~0.01 ms per row."""

    def __init__(self, base_ms: float = 2.0, per_row_ms: float = 0.01, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.base_ms, self.per_row_ms, self.sigma_data = base_ms, per_row_ms, sigma_data

    def latency_s(self, rows: int) -> float:
        return (self.base_ms + self.per_row_ms * rows) / 1e3

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        time.sleep(self.latency_s(x.shape[0]))  # the executor thread sleeps: the replica's event loop runs on
        s2 = sigma.to(x.dtype).reshape(-1, 1, 1, 1) ** 2
        return x * self.sigma_data**2 / (s2 + self.sigma_data**2)

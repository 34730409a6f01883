"""Gates: `(x, sigma, cond) -> logits (B, N)` over an ordered list of experts, composable by adding logits.

- `PrototypeGate`: `cos(cond, mu_k) / tau`; a hot-added expert is routable at once from its card.
- `NoiseGate`: 0 inside an expert's sigma interval, -inf outside (eDiff-I / Wan 2.2 switching).
- `LearnedGate`: a small classifier estimating `p(k | x, sigma, cond)` (Decentralized Diffusion Models).
  It abstains for experts it was not trained on (see `LearnedGate`) until it is extended with a row for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mode_ray.models.card import ExpertCard
from mode_ray.models.conditions import pooled


class Gate(nn.Module):
    """Base: `forward(x, sigma, cond, experts) -> logits (B, len(experts))`."""

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None, experts: Sequence[ExpertCard]
    ) -> torch.Tensor:
        raise NotImplementedError


class PrototypeGate(Gate):
    """logit_k = cos(cond, mu_k) / tau; 0 for a null condition or an expert without a prototype. A packed
    text condition is scored by its pooled row."""

    def __init__(self, tau: float = 0.1) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"prototype gate tau must be > 0, got {tau}")
        self.tau = tau

    def forward(self, x, sigma, cond, experts):  # type: ignore[no-untyped-def]
        logits = x.new_zeros(x.shape[0], len(experts))
        if cond is None:
            return logits
        cond = pooled(cond)  # (B, D)
        has = [k for k, card in enumerate(experts) if card.prototype is not None]
        if has:  # one (B, D) x (D, K) product for all experts: this runs on every tick
            mu = torch.tensor([experts[k].prototype for k in has], dtype=cond.dtype, device=cond.device)
            norms = cond.norm(dim=1, keepdim=True) * mu.norm(dim=1)[None]  # (B, K)
            logits[:, has] = (cond @ mu.T) / norms.clamp_min(1e-8) / self.tau  # zero cond -> 0
        return logits


class NoiseGate(Gate):
    """0 where sigma lies in the expert's `sigma_interval` (lo <= sigma < hi), -inf outside; 0 without one."""

    def forward(self, x, sigma, cond, experts):  # type: ignore[no-untyped-def]
        logits = x.new_zeros(x.shape[0], len(experts))
        has = [k for k, card in enumerate(experts) if card.sigma_interval is not None]
        if has:  # all experts' intervals at once: this runs on every tick
            bounds = torch.tensor(
                [experts[k].sigma_interval for k in has], dtype=sigma.dtype, device=sigma.device
            )
            s = sigma[:, None]
            inside = (s >= bounds[None, :, 0]) & (s < bounds[None, :, 1])  # (B, K)
            logits[:, has] = torch.where(inside, 0.0, -math.inf).to(logits.dtype)
        return logits


@dataclass(frozen=True)
class LearnedGateConfig:
    experts: tuple[str, ...]  # the output rows, in order
    in_channels: int = 1
    cond_dim: int = 10
    width: int = 32
    sigma_data: float = 0.5
    # "pool": features averaged over the image (the first gates); "spatial": a 4 x 4 grid of them kept, so the
    # gate sees where the strokes are (at mid noise the digit's layout is what tells the experts apart)
    head: str = "pool"

    def __post_init__(self) -> None:
        if self.head not in ("pool", "spatial"):
            raise ValueError(f"head must be 'pool' or 'spatial', got {self.head!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["experts"] = list(self.experts)
        return d


class LearnedGateNet(nn.Module):
    """A small CNN on the preconditioned x, the noise level and cond -> (B, len(experts)) log-probabilities."""

    def __init__(self, config: LearnedGateConfig) -> None:
        super().__init__()
        self.config = c = config
        w = c.width
        self.features = nn.Sequential(
            nn.Conv2d(c.in_channels, w, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),  # (B, w, H/2, W/2)
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),  # (B, 2w, H/4, W/4)
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.SiLU(),
            *(
                (nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 2w)
                if c.head == "pool"
                else (nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * w, 2 * w))  # (B, 2w)
            ),
        )
        self.noise = nn.Linear(2, 2 * w)
        self.cond = nn.Linear(c.cond_dim, 2 * w, bias=False) if c.cond_dim else None
        self.head = nn.Sequential(
            nn.SiLU(), nn.Linear(2 * w, 2 * w), nn.SiLU(), nn.Linear(2 * w, len(c.experts))
        )

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        s = sigma.to(x.dtype).reshape(-1, 1)  # (B, 1)
        c_in = 1 / (s**2 + self.config.sigma_data**2).sqrt()
        h = self.features(x * c_in[..., None, None])  # (B, 2w)
        h = h + self.noise(torch.cat([s.log() / 4, c_in], dim=1))
        if self.cond is not None and cond is not None:
            h = h + self.cond(pooled(cond).to(h.dtype))
        return self.head(h).log_softmax(dim=1)  # (B, N_trained)


ABSTAIN_MARGIN = 1e3  # below the lowest known log-probability: exp(-1e3) is exactly 0 in float32 and float64


def is_null(cond: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """(B,) bool: rows whose condition is the null condition (cond None, or an all-zeros row)."""
    if cond is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    return ~cond.flatten(1).ne(0).any(dim=1)


class LearnedGate(Gate):
    """The net's log-probabilities `log p(k | x, sigma, cond)` mapped onto the current experts by name.

    For an expert the net was not trained on (hot-added, not yet extended with `mode-ray train gate
    --extend`), the learned gate *abstains*:
    - on null-condition rows (unconditional requests), which only the learned gate can route, the unknown
      expert scores `ABSTAIN_MARGIN` below the lowest known log-probability of the row: it gets no weight
      beside any known expert, so unconditional sampling is exactly what it was before the hot-add; it is
      still routable when nothing else is allowed (pinned alone, or every known expert outside its sigma
      interval);
    - on conditional rows it scores the mean of the row's known log-probabilities, neither boosting nor
      sinking it: the prototype and noise gates decide.
    Experts the net knows but that are not in `experts` are left out (softmax renormalises over the rest).
    When the net knows none of `experts`, it abstains everywhere (all zeros).
    """

    def __init__(self, net: LearnedGateNet) -> None:
        super().__init__()
        self.net = net

    @property
    def experts(self) -> tuple[str, ...]:
        return self.net.config.experts

    def forward(self, x, sigma, cond, experts):  # type: ignore[no-untyped-def]
        rows = [self.experts.index(c.name) if c.name in self.experts else -1 for c in experts]
        known = [k for k, r in enumerate(rows) if r >= 0]
        logits = x.new_zeros(x.shape[0], len(experts))
        if not known:
            return logits
        scores = self.net(x, sigma, cond)[:, [rows[k] for k in known]]  # (B, N_known) log-probabilities
        logits[:, known] = scores.to(logits.dtype)
        if len(known) < len(experts):
            null = is_null(cond, x.shape[0], x.device)[:, None]  # (B, 1)
            abstain = torch.where(
                null,
                scores.min(dim=1, keepdim=True).values - ABSTAIN_MARGIN,
                scores.mean(dim=1, keepdim=True),
            )  # (B, 1)
            unknown = [k for k, r in enumerate(rows) if r < 0]
            logits[:, unknown] = abstain.to(logits.dtype).expand(-1, len(unknown))
        return logits


class SumGate(Gate):
    """Composition: the sum of its gates' logits."""

    def __init__(self, gates: Sequence[Gate]) -> None:
        super().__init__()
        if not gates:
            raise ValueError("a SumGate needs at least one gate")
        self.gates = nn.ModuleList(gates)

    def forward(self, x, sigma, cond, experts):  # type: ignore[no-untyped-def]
        return sum(g(x, sigma, cond, experts) for g in self.gates)  # type: ignore[return-value]

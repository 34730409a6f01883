"""The in-process Mixture: itself a Denoiser over local experts, built on `plan_step` / `finish_step`.

It is the reference the distributed router is checked against.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from mode_ray.models.checkpoint import Expert
from mode_ray.routing.gates import Gate
from mode_ray.routing.step import StepPlan, allowed_mask, finish_step, plan_step


def validate_experts(experts: Sequence[Expert]) -> None:
    if not experts:
        raise ValueError("a mixture needs at least one expert")
    names = [e.name for e in experts]
    if len(set(names)) != len(names):
        raise ValueError(f"expert names must be unique, got {names}")
    for e in experts[1:]:
        experts[0].card.compatible_with(e.card)


class Mixture(nn.Module):
    """D_mix(x, sigma, cond) = sum_k w_k D_k over the top-k experts of `gate`.

    x: (B, C, H, W); sigma: (B,); cond: (B, D) or None. Returns x0_hat: (B, C, H, W).
    """

    def __init__(
        self,
        experts: Sequence[Expert],
        gate: Gate,
        top_k: int = 2,
        top_p: float | None = None,
        min_weight: float | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        validate_experts(experts)
        self.decoder = (
            decoder  # a latent mixture's decoder (latents -> images), run once per image at the end
        )
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.experts = list(experts)
        self.denoisers = nn.ModuleList([e.denoiser for e in experts])
        self.gate = gate
        self.top_k, self.top_p, self.min_weight = top_k, top_p, min_weight

    @property
    def device(self) -> torch.device:
        """Where the experts live (CPU for parameter-free experts)."""
        tensor = next(itertools.chain(self.parameters(), self.buffers()), None)
        return torch.device("cpu") if tensor is None else tensor.device

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def cards(self) -> list:
        return [e.card for e in self.experts]

    def allowed(self, pin: Sequence[str] = (), exclude: Sequence[str] = ()) -> torch.Tensor | None:
        """(N,) bool mask from pinned / excluded expert names; a ValueError naming an unknown expert."""
        return allowed_mask(self.names, pin, exclude)

    def logits(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The gate's logits over this mixture's experts: (B, N)."""
        return self.gate(x, sigma, cond, self.cards)

    def plan(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: torch.Tensor | None,
        *,
        top_k: int | None = None,
        top_p: float | None = None,
        min_weight: float | None = None,
        guidance_scale: float = 1.0,
        allowed: torch.Tensor | None = None,
    ) -> StepPlan:
        """`plan_step` on this mixture's gate; top_k / top_p / min_weight default to the mixture's."""
        return plan_step(
            self.logits(x, sigma, cond),
            x,
            sigma,
            cond,
            top_k=self.top_k if top_k is None else top_k,
            top_p=self.top_p if top_p is None else top_p,
            min_weight=self.min_weight if min_weight is None else min_weight,
            guidance_scale=guidance_scale,
            allowed=allowed,
        )

    def outputs(self, plan: StepPlan) -> dict[int, torch.Tensor]:
        """Every chosen expert on its rows: expert index -> (R_e, C, H, W). Any plan with x, sigma, cond and
        rows will do (also mode_ray.generation's BatchPlan of many requests)."""
        outputs = {}
        for e, r in plan.rows.items():
            cond = None if plan.cond is None else plan.cond[r]
            outputs[e] = self.denoisers[e](plan.x[r], plan.sigma[r], cond)  # (R_e, C, H, W)
        return outputs

    def evaluate(self, plan: StepPlan) -> torch.Tensor:
        return finish_step(plan, self.outputs(plan))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.evaluate(self.plan(x, sigma, cond))

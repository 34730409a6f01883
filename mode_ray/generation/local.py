"""In-process generation: the mixture's experts run in this process, the reference every served result is
checked against. The loop is the one `RequestState` documents; the router's step engine runs the same."""

from __future__ import annotations

import torch

from mode_ray.generation.bundle import MixtureConfig
from mode_ray.generation.params import GenerateParams
from mode_ray.generation.request import prepare
from mode_ray.generation.result import GenerationResult
from mode_ray.routing.mixture import Mixture


@torch.no_grad()
def generate_local(mixture: Mixture, config: MixtureConfig, params: GenerateParams) -> GenerationResult:
    """Sample with the in-process mixture; the same seed gives identical images."""
    state = prepare(params, config, mixture.cards, mixture.device)
    while not state.done:
        x, sigma = state.query()
        plan = state.plan(mixture.logits(x, sigma, state.cond), x, sigma)
        state.advance(plan, mixture.outputs(plan))
    return state.result()

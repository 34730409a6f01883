"""In-process generation: the mixture's experts run in this process, the reference every served result is
checked against. The loop is the one `RequestState` documents; the router's step engine runs the same."""

from __future__ import annotations

import torch

from mode_ray.generation.batch import advance_batch, plan_batch, stack_queries
from mode_ray.generation.bundle import MixtureConfig
from mode_ray.generation.params import GenerateParams
from mode_ray.generation.request import prepare
from mode_ray.generation.result import GenerationResult
from mode_ray.routing.mixture import Mixture


@torch.no_grad()
def generate_local(mixture: Mixture, config: MixtureConfig, params: GenerateParams) -> GenerationResult:
    """Sample with the in-process mixture (a batch of one request); the same seed gives identical images."""
    state = prepare(params, config, mixture.cards, mixture.device)
    while not state.done:
        q = stack_queries([state])
        plan = plan_batch([state], q, mixture.logits(q.x, q.sigma, q.cond))
        if plan.failed:
            raise ValueError(plan.failed[0])
        advance_batch([state], plan, mixture.outputs(plan))
    if mixture.decoder is None:
        return state.result()
    return state.result(latent=True).decoded(mixture.decoder)

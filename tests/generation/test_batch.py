"""Many requests stepped as one batch give each request exactly what it gets alone; a request that cannot be
routed, or loses experts, affects no other."""

from __future__ import annotations

import torch

from mode_ray.generation import GenerateParams, MixtureConfig, generate_local, prepare
from mode_ray.generation.batch import advance_batch, plan_batch, stack_queries
from mode_ray.models.checkpoint import Expert
from mode_ray.routing import Mixture, NoiseGate, PrototypeGate, SumGate
from tests.routing.helpers import GaussianDenoiser, card

PROTOS = [
    [1.0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 1.0, 1, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 1.0, 1, 1, 1, 1, 1],
]
EXPERTS = [
    Expert(card(f"e{i}", p, (0.0, 5.0) if i == 2 else None), GaussianDenoiser(0.2 * i - 0.2, 0.4 + 0.1 * i))
    for i, p in enumerate(PROTOS)
]
MIX = Mixture(EXPERTS, SumGate([PrototypeGate(0.5), NoiseGate()]), top_k=2)
CONFIG = MixtureConfig(name="t", experts=["e0", "e1", "e2"], steps=5, sampler="heun", guidance_scale=2.0)
PARAMS = [
    GenerateParams(prompt=1, num_images=2, seed=1),
    GenerateParams(prompt=3, num_images=3, seed=2, sampler="dpmpp_2m", steps=7, top_k=1),
    GenerateParams(num_images=1, seed=3, sampler="euler", steps=4),
    GenerateParams(prompt=8, num_images=2, seed=4, guidance_scale=1.0, top_p=0.9, top_k=3),
    GenerateParams(prompt=5, num_images=1, seed=5, min_weight=0.3, exclude_experts=["e1"]),
]


def step_together(states, failed_at=None):  # noqa: ANN001, ANN201
    """Step every state until done, all in one batch per step (as the router's engine does)."""
    lost_all: dict[int, str] = {}
    t = 0
    while True:
        live = [i for i, s in enumerate(states) if not s.done and i not in lost_all]
        if not live:
            return lost_all
        batch = [states[i] for i in live]
        q = stack_queries(batch)
        plan = plan_batch(batch, q, MIX.logits(q.x, q.sigma, q.cond))
        failed = failed_at(t, live) if failed_at else {}
        outputs = {e: o for e, o in MIX.outputs(plan).items()}
        for j, why in {**plan.failed, **advance_batch(batch, plan, outputs, failed)}.items():
            lost_all[live[j]] = why
        t += 1


def test_requests_stepped_together_equal_each_alone() -> None:
    states = [prepare(p, CONFIG, MIX.cards) for p in PARAMS]
    assert step_together(states) == {}
    for p, s in zip(PARAMS, states, strict=True):
        alone = generate_local(MIX, CONFIG, p)
        torch.testing.assert_close(s.result().images, alone.images, rtol=0, atol=1e-6)
        assert s.result().trace == alone.trace


def test_a_request_no_expert_can_take_fails_alone() -> None:
    """Pinned to e2, whose sigma interval ends at 5, it cannot be routed at sigma_max = 80; the others go on."""
    stuck = GenerateParams(prompt=7, num_images=1, seed=9, experts=["e2"])
    states = [prepare(p, CONFIG, MIX.cards) for p in [PARAMS[0], stuck, PARAMS[2]]]
    lost = step_together(states)
    assert list(lost) == [1] and "every logit is -inf" in lost[1]
    torch.testing.assert_close(states[0].result().images, generate_local(MIX, CONFIG, PARAMS[0]).images)


def test_a_failed_expert_is_dropped_for_its_request_only() -> None:
    states = [prepare(p, CONFIG, MIX.cards) for p in PARAMS[:2]]
    # at the first step, expert e0 fails for request 0 only (both guidance branches); request 1 is untouched
    lost = step_together(states, lambda t, live: {0: {0}} if t == 0 else {})
    assert lost == {}
    first = states[0].trace[0]
    assert all("e0" not in row for row in first.experts) and all(d > 0 for d in first.dropped)
    assert states[0].dropped > 0 and all(abs(sum(w) - 1) < 1e-5 for w in first.weights)
    torch.testing.assert_close(states[1].result().images, generate_local(MIX, CONFIG, PARAMS[1]).images)

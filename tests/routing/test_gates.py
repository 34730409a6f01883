"""The learned gate's semantics for experts it does not know (hot-added, not yet extended): it abstains."""

from __future__ import annotations

import pytest
import torch

from mode_ray.routing import LearnedGate, LearnedGateNet, Mixture, PrototypeGate, SumGate
from mode_ray.routing.gates import ABSTAIN_MARGIN, LearnedGateConfig
from mode_ray.routing.step import allowed_mask, plan_step
from tests.routing.helpers import card, gaussian_experts


def gate_and_cards():  # noqa: ANN201
    torch.manual_seed(0)
    net = LearnedGateNet(LearnedGateConfig(("e0", "e1"), in_channels=1, cond_dim=10, width=4)).eval()
    for p in net.parameters():  # a sharp gate: log-probabilities far from uniform
        p.data.normal_(0, 1.0)
    known = [card("e0", torch.eye(10)[0].tolist()), card("e1", torch.eye(10)[1].tolist())]
    return LearnedGate(net), known, card("new", torch.eye(10)[2].tolist())


def batch(b: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 1, 8, 8, generator=g), torch.rand(b, generator=g) * 3 + 0.1


def test_null_rows_give_an_unknown_expert_no_weight_and_leave_the_others_as_they_were() -> None:
    gate, known, new = gate_and_cards()
    x, sigma = batch()
    before = plan_step(gate(x, sigma, None, known), x, sigma, None, top_k=2)
    after = plan_step(gate(x, sigma, None, [*known, new]), x, sigma, None, top_k=3)
    assert torch.equal(after.routing.weights[:, :2], before.routing.weights)  # bit for bit
    assert not (after.routing.indices == 2).any()  # 'new' is never called
    logits = gate(x, sigma, None, [*known, new])
    assert torch.equal(logits[:, 2], logits[:, :2].min(dim=1).values - ABSTAIN_MARGIN)


def test_conditional_rows_score_an_unknown_expert_at_the_mean_of_the_known_ones() -> None:
    gate, known, new = gate_and_cards()
    x, sigma = batch()
    cond = torch.eye(10)[[0, 1, 2, 0, 1, 2]]
    logits = gate(x, sigma, cond, [*known, new])
    torch.testing.assert_close(logits[:, 2], logits[:, :2].mean(dim=1))
    # with the prototype gate beside it, class 2 (which only 'new' holds) goes mostly to 'new'
    both = SumGate([PrototypeGate(0.1), gate])
    plan = plan_step(both(x, sigma, cond, [*known, new]), x, sigma, cond, top_k=3)
    w_new = torch.where(plan.base.indices == 2, plan.base.weights, 0).sum(1)
    assert (w_new[[2, 5]] > 0.5).all()


def test_rows_are_judged_one_by_one_so_stacked_requests_route_as_alone() -> None:
    """The engine stacks unconditional requests (zero rows) with conditional ones into one gate call."""
    gate, known, new = gate_and_cards()
    x, sigma = batch()
    cards = [*known, new]
    cond = torch.eye(10)[[0, 1, 2, 0, 1, 2]]
    cond[3:] = 0  # rows 3.. are unconditional
    stacked = gate(x, sigma, cond, cards)
    torch.testing.assert_close(stacked[:3], gate(x[:3], sigma[:3], cond[:3], cards))
    torch.testing.assert_close(stacked[3:], gate(x[3:], sigma[3:], None, cards))


def test_an_unknown_expert_pinned_alone_is_still_routed() -> None:
    gate, known, new = gate_and_cards()
    x, sigma = batch()
    cards = [*known, new]
    plan = plan_step(
        gate(x, sigma, None, cards),
        x,
        sigma,
        None,
        top_k=2,
        allowed=allowed_mask([c.name for c in cards], ["new"]),
    )
    assert (plan.base.indices[:, 0] == 2).all() and torch.equal(plan.base.weights[:, 0], torch.ones(6))


def test_a_gate_that_knows_none_of_the_experts_abstains_everywhere() -> None:
    gate, _, new = gate_and_cards()
    x, sigma = batch()
    assert torch.equal(gate(x, sigma, None, [new, card("other")]), torch.zeros(6, 2))


def test_experts_the_gate_knows_but_the_mixture_lacks_are_left_out() -> None:
    """Removing an expert renormalises the learned posterior over the rest (softmax is shift-invariant)."""
    gate, known, _ = gate_and_cards()
    x, sigma = batch()
    full = gate.net(x, sigma, None)  # (B, 2) log-probabilities
    only = gate(x, sigma, None, known[1:])
    torch.testing.assert_close(only[:, 0], full[:, 1])


def test_the_in_process_mixture_routes_a_hot_added_copy_by_its_prototype_only() -> None:
    experts = gaussian_experts(3)
    gate, _, _ = gate_and_cards()
    mix = Mixture(experts[:2], SumGate([PrototypeGate(0.1), gate]), top_k=2)
    added = Mixture([*experts[:2], experts[2]], mix.gate, top_k=2)
    x, sigma = batch()
    torch.testing.assert_close(added(x, sigma), mix(x, sigma), rtol=0, atol=0)  # unconditional: unchanged


def test_spatial_gate_keeps_where_the_strokes_are() -> None:
    """A "spatial" gate keeps a 4 x 4 grid of features, so an image and its mirror image score apart; its
    output is still log-probabilities. Old gate cards without `head` load as "pool"; an unknown head is
    refused by name."""
    torch.manual_seed(0)
    cfg = LearnedGateConfig(("e0", "e1", "e2"), in_channels=1, cond_dim=10, width=4, head="spatial")
    net = LearnedGateNet(cfg).eval()
    x = torch.zeros(1, 1, 28, 28)
    x[..., 2:12, 2:12] = 1.0  # a blob top-left
    both = torch.cat([x, x.flip(-1)])
    out = net(both, torch.ones(2), None)
    assert out.shape == (2, 3) and torch.allclose(out.exp().sum(1), torch.ones(2))
    assert (out[0] - out[1]).abs().max() > 1e-4
    assert LearnedGateConfig(("e0",)).head == "pool"
    with pytest.raises(ValueError, match="head must be 'pool' or 'spatial'"):
        LearnedGateConfig(("e0",), head="grid")

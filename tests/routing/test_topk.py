import math

import pytest
import torch

from mode_ray.routing import drop_experts, top_k, top_p
from mode_ray.routing.topk import PAD


def test_weights_sum_to_one_and_pick_the_largest() -> None:
    logits = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    r = top_k(logits, 2)
    torch.testing.assert_close(r.weights.sum(1), torch.ones(64))
    assert torch.equal(r.indices, logits.topk(2, dim=1).indices)
    expected = logits.gather(1, r.indices).softmax(1)  # softmax over the kept logits
    torch.testing.assert_close(r.weights, expected)


def test_k_equal_n_is_the_dense_softmax() -> None:
    logits = torch.randn(8, 4)
    r = top_k(logits, 4)
    dense = torch.zeros(8, 4).scatter(1, r.indices, r.weights)
    torch.testing.assert_close(dense, logits.softmax(1))


def test_k_larger_than_n_is_clamped_and_minus_inf_gets_no_weight() -> None:
    logits = torch.tensor([[0.0, -math.inf, 1.0]])
    r = top_k(logits, 5)
    assert r.indices.shape == (1, 3)
    assert r.indices[0, 2] == PAD and r.weights[0, 2] == 0


def test_top_p_picks_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]])
    r = top_p(probs.log(), 0.75)
    kept = [[int(i) for i in row if i != PAD] for row in r.indices]
    assert kept == [[0, 1], [0]]
    torch.testing.assert_close(r.weights[0, :2], torch.tensor([0.5, 0.3]) / 0.8)
    assert top_p(probs.log(), 1.0).indices[0].tolist() == [0, 1, 2, 3]
    assert top_p(probs.log(), 0.99, k_max=2).indices[0].tolist() == [0, 1]


def test_rows_without_any_expert_are_an_error() -> None:
    with pytest.raises(ValueError, match="no expert can take row"):
        top_k(torch.tensor([[0.0, 0.0], [-math.inf, -math.inf]]), 1)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        top_k(torch.zeros(1, 2), 0)
    with pytest.raises(ValueError, match="top_p must be in"):
        top_p(torch.zeros(1, 2), 1.5)


def test_drop_experts_renormalises_and_reports_the_mass() -> None:
    r = top_k(torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), 2)
    new, dropped = drop_experts(r, {0})
    torch.testing.assert_close(new.weights.sum(1), torch.ones(2))
    assert dropped[0] == pytest.approx(float(r.weights[0, 0])) and dropped[1] == 0
    assert (new.indices[0] == 0).sum() == 0
    with pytest.raises(RuntimeError, match="every chosen expert failed"):
        drop_experts(top_k(torch.tensor([[2.0, 1.0, 0.0]]), 1), {0})


def test_the_weight_floor_drops_light_experts_and_renormalises_like_a_drop() -> None:
    from mode_ray.routing.topk import route, weight_floor

    logits = torch.tensor([[4.0, 0.0, -1.0], [0.2, 0.1, 0.0], [-9.0, 3.0, 3.0]])
    full = route(logits, 3)
    floored = weight_floor(full, 0.05)
    # row 0: 0.98 / 0.018 / 0.0066 -> only the first is kept, with weight 1
    assert floored.indices[0].tolist() == [0, -1, -1] and floored.weights[0].tolist() == [1.0, 0.0, 0.0]
    torch.testing.assert_close(floored.weights[1], full.weights[1])  # nothing below the floor: unchanged
    assert (floored.weights.sum(1) - 1).abs().max() < 1e-6
    same, _ = drop_experts(full, {1, 2})  # the same as dropping those experts, for row 0
    torch.testing.assert_close(floored.weights[0], same.weights[0])
    top = weight_floor(route(torch.tensor([[0.0, 0.0]]), 2), 0.9)  # a floor above every weight keeps the best
    assert top.indices.tolist() == [[0, -1]] and top.weights.tolist() == [[1.0, 0.0]]
    assert route(logits, 3, min_weight=0.05).indices.tolist() == floored.indices.tolist()
    with pytest.raises(ValueError, match=r"min_weight must be in \[0, 1\)"):
        weight_floor(full, 1.0)

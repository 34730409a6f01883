"""The shipped default model: it loads from safetensors, and generates the digit that was asked for."""

import pytest
import torch

from mode_ray.cli import DEFAULT_MODEL
from mode_ray.generation import GenerateParams, generate_local, load_bundle
from mode_ray.models import load_expert
from mode_ray.models.checkpoint import Expert
from mode_ray.routing import Mixture
from mode_ray.train.classifier import load_classifier


@pytest.fixture(scope="module")
def bundle():  # noqa: ANN201
    return load_bundle(DEFAULT_MODEL)


def test_shipped_model_has_experts_a_learned_gate_and_a_classifier(bundle) -> None:  # noqa: ANN001
    assert len(bundle.mixture.experts) >= 4
    assert bundle.config.gate.learned is not None
    files = {p.suffix for p in DEFAULT_MODEL.rglob("*") if p.is_file()}
    assert files <= {".json", ".safetensors"}, files  # nothing that unpickles
    assert sum(p.stat().st_size for p in DEFAULT_MODEL.rglob("*")) < 16 * 2**20


@pytest.mark.parametrize("digit", [2, 7])
def test_generates_the_requested_digit(bundle, digit: int) -> None:  # noqa: ANN001
    judge = load_classifier(DEFAULT_MODEL / "classifier")
    gen = generate_local(
        bundle.mixture, bundle.config, GenerateParams(prompt=digit, num_images=8, seed=digit)
    )
    votes = judge(gen.images * 2 - 1).argmax(1)
    assert (votes == digit).float().mean() >= 0.75, votes.tolist()
    holders = {n for step in gen.trace for row in step.experts for n in row[:1]}
    assert all(str(digit) in n.split("-") for n in holders)  # the top expert holds the digit


def test_unconditional_requests_draw_their_classes_from_the_training_shares(bundle) -> None:  # noqa: ANN001
    """The shipped default: p(x) = sum_c p(c) p(x | c) with p(c) the MNIST training set's class shares;
    each image is judged as the class it drew."""
    from mode_ray.train.data import load_mnist

    labels = load_mnist("train").labels
    shares = (torch.bincount(labels, minlength=10).double() / len(labels)).tolist()
    assert bundle.config.unconditional == "prior"
    assert bundle.config.class_prior == pytest.approx(shares, abs=1e-5)
    gen = generate_local(bundle.mixture, bundle.config, GenerateParams(num_images=8, seed=3))
    assert len(set(gen.labels)) > 1 and min(gen.labels) >= 0
    votes = load_classifier(DEFAULT_MODEL / "classifier")(gen.images * 2 - 1).argmax(1)
    assert (votes == torch.tensor(gen.labels)).float().mean() >= 0.75, (votes.tolist(), gen.labels)


def test_same_seed_same_images(bundle) -> None:  # noqa: ANN001
    p = GenerateParams(prompt="three", num_images=2, seed=11, steps=4)
    a = generate_local(bundle.mixture, bundle.config, p).images
    b = generate_local(bundle.mixture, bundle.config, p).images
    assert torch.equal(a, b)


def test_learned_gate_estimates_the_partition_posterior(bundle) -> None:  # noqa: ANN001
    """Without the condition the gate must find the expert from x at low noise, and fall back to the prior
    (about the largest group's share) at high noise."""
    from mode_ray.train.data import load_mnist
    from mode_ray.train.evaluate import gate_accuracy_by_sigma

    acc = gate_accuracy_by_sigma(bundle, load_mnist("test"), n=1000)
    assert acc["0.002-0.02"] > 0.9 and acc["0.2-2"] > 0.8
    assert acc["20-80"] < 0.5


def hot_added_copy(bundle, prototype: list[float]) -> Mixture:  # noqa: ANN001
    """The shipped mixture plus a copy of its digits-8-9 expert under a new name, as a hot-add leaves it:
    the learned gate was never trained on the copy."""
    source = load_expert(DEFAULT_MODEL / "experts" / "digits-8-9")
    card = source.card.model_copy(update={"name": "copy", "prototype": prototype})
    return Mixture([*bundle.mixture.experts, Expert(card, source.denoiser)], bundle.mixture.gate, 2)


def weights_of(name: str, trace) -> list[float]:  # noqa: ANN001
    return [
        w
        for t in trace
        for row, ws in zip(t.experts, t.weights, strict=True)
        for n, w in zip(row, ws, strict=True)
        if n == name
    ]


def test_a_hot_added_expert_leaves_unconditional_sampling_exactly_as_it_was(bundle) -> None:  # noqa: ANN001
    """Before the fix the copy took 0.59 to 0.75 of the weight of every unconditional step: the learned gate
    scored the unknown expert 0, which as a log-probability is certainty."""
    added = hot_added_copy(bundle, [-0.1] * 10)  # a prototype unlike every class
    p = GenerateParams(num_images=4, seed=1, steps=6, unconditional="null")  # the gate alone routes
    before = generate_local(bundle.mixture, bundle.config, p)
    after = generate_local(added, bundle.config, p)
    assert torch.equal(after.images, before.images)
    assert after.trace == before.trace and not weights_of("copy", after.trace)


def test_a_hot_added_expert_stays_out_of_classes_it_does_not_hold(bundle) -> None:  # noqa: ANN001
    added = hot_added_copy(bundle, [-0.1] * 10)
    weights = []
    for digit in range(10):
        gen = generate_local(
            added, bundle.config, GenerateParams(prompt=digit, num_images=2, seed=digit, steps=4)
        )
        weights += weights_of("copy", gen.trace)
    assert max(weights, default=0.0) < 1e-3


def test_a_hot_added_expert_is_routed_for_the_class_its_prototype_holds(bundle) -> None:  # noqa: ANN001
    added = hot_added_copy(bundle, torch.eye(10)[3].tolist())
    params = GenerateParams(
        prompt=3, num_images=2, seed=0, steps=6, min_weight=0.0
    )  # no floor: see every weight
    gen = generate_local(added, bundle.config, params)
    assert all("copy" in row for t in gen.trace for row in t.experts)  # in the top-2 at every step
    # at the first step a real share of the weight: the learned gate abstains for the copy at the mean of its
    # log-probabilities and the prototype gate favours it (cos 1 against 0.58); how much depends on how sure
    # the learned gate is of digits-2-3-5 given the label (the spatial gate: 0.09 and 0.2 for the two images)
    assert min(weights_of("copy", gen.trace[:1])) > 0.05

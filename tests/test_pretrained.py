"""The shipped default model: it loads from safetensors, and generates the digit that was asked for."""

import pytest
import torch

from mode_ray.cli import DEFAULT_MODEL
from mode_ray.routing import GenerateParams, generate_local, load_bundle
from mode_ray.train.classifier import load_classifier

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL / "mixture.json").exists(), reason="no shipped model yet")


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
        bundle.mixture, bundle.config, bundle.encoder, GenerateParams(prompt=digit, num_images=8, seed=digit)
    )
    votes = judge(gen.images * 2 - 1).argmax(1)
    assert (votes == digit).float().mean() >= 0.75, votes.tolist()
    holders = {n for step in gen.trace for row in step.experts for n in row[:1]}
    assert all(str(digit) in n.split("-") for n in holders)  # the top expert holds the digit


def test_same_seed_same_images(bundle) -> None:  # noqa: ANN001
    p = GenerateParams(prompt="three", num_images=2, seed=11, steps=4)
    a = generate_local(bundle.mixture, bundle.config, bundle.encoder, p).images
    b = generate_local(bundle.mixture, bundle.config, bundle.encoder, p).images
    assert torch.equal(a, b)


def test_learned_gate_estimates_the_partition_posterior(bundle) -> None:  # noqa: ANN001
    """Without the condition the gate must find the expert from x at low noise, and fall back to the prior
    (about the largest group's share) at high noise."""
    from mode_ray.train.data import load_mnist
    from mode_ray.train.evaluate import gate_accuracy_by_sigma

    acc = gate_accuracy_by_sigma(bundle, load_mnist("test"), n=1000)
    assert acc["0.002-0.02"] > 0.9 and acc["0.2-2"] > 0.8
    assert acc["20-80"] < 0.5

"""The shipped dense baselines (mode_ray/pretrained/mnist-dense-{s,s2,m}) of the Pareto chart: one expert each,
safetensors only, trained for the same total FLOPs as the shipped mixture's four experts, and they sample
the digit asked for."""

import json
from pathlib import Path

import pytest
import torch

from mode_ray.cli import DEFAULT_MODEL, SHIPPED_MODELS, model_dir
from mode_ray.generation import GenerateParams, generate_local, load_bundle
from mode_ray.models.checkpoint import load_card
from mode_ray.train.classifier import load_classifier

DENSE = ("mnist-dense-s", "mnist-dense-s2", "mnist-dense-m")


def _train_flops(model) -> int:  # noqa: ANN001
    names = json.loads((model / "mixture.json").read_text())["experts"]
    return sum(int(load_card(model / "experts" / n).metrics["train_flops"]) for n in names)


@pytest.mark.parametrize("name", DENSE)
def test_a_dense_baseline_matches_the_mixtures_training_compute(name: str) -> None:
    assert name in SHIPPED_MODELS
    path = model_dir(Path(name))
    assert path == DEFAULT_MODEL.parent / name
    files = {p.suffix for p in path.rglob("*") if p.is_file()}
    assert files <= {".json", ".safetensors"}, files  # nothing that unpickles
    bundle = load_bundle(path)
    assert len(bundle.mixture.cards) == 1
    assert bundle.mixture.cards[0].metrics["preset"] == name.removeprefix("mnist-dense-")
    # --match-compute rounds to whole steps of 64 images: within one step of the four experts' total
    assert _train_flops(path) == pytest.approx(_train_flops(DEFAULT_MODEL), rel=2e-3)


@pytest.mark.parametrize("name", DENSE)
def test_a_dense_baseline_draws_the_digit_asked_for(name: str) -> None:
    bundle = load_bundle(DEFAULT_MODEL.parent / name)
    judge = load_classifier(DEFAULT_MODEL / "classifier")
    gen = generate_local(
        bundle.mixture, bundle.config, GenerateParams(prompt=3, num_images=8, seed=0, steps=10)
    )
    votes = judge(gen.images * 2 - 1).argmax(1)
    assert (votes == 3).float().mean() >= 0.75, votes.tolist()
    assert torch.isfinite(gen.images).all()

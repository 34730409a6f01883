"""The generation layer: a request becomes a trajectory in one place, the result round-trips through JSON,
and a mixture directory is validated when it loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mode_ray.cli import DEFAULT_MODEL
from mode_ray.generation import GenerateParams, GenerationResult, generate_local, load_bundle, prepare
from mode_ray.generation.bundle import MixtureConfig
from mode_ray.models.card import ExpertCard
from mode_ray.models.checkpoint import CheckpointError, load_card
from tests.routing.helpers import card

CONFIG = MixtureConfig(name="t", experts=["e0", "e1"], steps=3, sampler="euler")
CARDS = [card("e0"), card("e1")]


def test_prepare_starts_the_seeded_trajectory_with_the_mixtures_defaults() -> None:
    state = prepare(GenerateParams(prompt=3, num_images=2, seed=7), CONFIG, CARDS)
    again = prepare(GenerateParams(prompt="three", num_images=2, seed=7), CONFIG, CARDS)
    assert torch.equal(state.traj.x, again.traj.x) and state.traj.x.shape == (2, 1, 2, 2)
    assert float(state.traj.x.std()) > 10  # x_T = sigma_max * n, sigma_max = 80
    assert state.traj.steps == 3 and state.req.sampler == "euler" and state.names == ("e0", "e1")
    assert state.cond.tolist() == [torch.eye(10)[3].tolist()] * 2 and state.allowed is None
    assert prepare(GenerateParams(experts=["e1"]), CONFIG, CARDS).allowed.tolist() == [False, True]


@pytest.mark.parametrize(
    ("params", "words"),
    [
        (GenerateParams(experts=["nope"]), "unknown expert(s) ['nope']"),
        (GenerateParams(experts=["e0"], exclude_experts=["e0"]), "leaves no expert"),
        (GenerateParams(prompt="giraffe"), "prompt: prompt 'giraffe' is not a known class"),
        (GenerateParams(class_label=12), "class must be in [0, 9]"),
    ],
)
def test_prepare_names_what_the_request_cannot_have(params: GenerateParams, words: str) -> None:
    with pytest.raises(ValueError) as err:
        prepare(params, CONFIG, CARDS)
    assert words in str(err.value)


def test_an_unconditional_mixture_refuses_a_prompt() -> None:
    config = CONFIG.model_copy(update={"condition": "none"})
    with pytest.raises(ValueError, match="prompt: mixture 't' is unconditional"):
        prepare(GenerateParams(prompt=3), config, CARDS)
    assert prepare(GenerateParams(), config, CARDS).cond is None


def test_the_result_round_trips_through_json() -> None:
    bundle = load_bundle(DEFAULT_MODEL)
    result = generate_local(
        bundle.mixture, bundle.config, GenerateParams(prompt=1, num_images=2, seed=0, steps=2)
    )
    body = json.loads(json.dumps(result.to_json()))  # what the HTTP API sends
    back = GenerationResult.from_json(body)
    assert torch.equal(back.images, result.images) and back.trace == result.trace
    assert (back.labels, back.seed, back.dropped_mass) == ([1, 1], 0, 0.0)
    assert body["png"] and body["shape"] == [2, 1, 28, 28]


def copy_model(tmp_path):  # noqa: ANN001, ANN201
    model = tmp_path / "mnist"
    shutil.copytree(DEFAULT_MODEL, model, ignore=shutil.ignore_patterns("classifier"))
    return model


def test_a_mixture_with_an_empty_sigma_range_is_refused_at_load(tmp_path) -> None:  # noqa: ANN001
    model = copy_model(tmp_path)
    config = json.loads((model / "mixture.json").read_text())
    (model / "mixture.json").write_text(json.dumps({**config, "sigma_min": 5.0, "sigma_max": 1.0}))
    with pytest.raises(CheckpointError, match="sigma_min=5.0, sigma_max=1.0"):
        load_bundle(model)


def test_an_expert_whose_condition_is_not_the_mixtures_is_refused_at_load(tmp_path) -> None:  # noqa: ANN001
    model = copy_model(tmp_path)
    config = json.loads((model / "mixture.json").read_text())
    (model / "mixture.json").write_text(json.dumps({**config, "class_names": ["a", "b"]}))
    with pytest.raises(CheckpointError, match="does not match mixture.json condition 'class_label' with 2"):
        load_bundle(model)


def test_a_diffusers_card_needs_a_ddpm_parametrization() -> None:
    base = load_card(DEFAULT_MODEL / "experts" / "digits-0-6").model_dump()
    with pytest.raises(ValueError, match="parametrization.kind: a 'diffusers_unet2d' backbone needs 'ddpm'"):
        ExpertCard.model_validate({**base, "backbone": "diffusers_unet2d"})

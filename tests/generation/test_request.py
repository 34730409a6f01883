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
from mode_ray.generation.params import draw_labels
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
    (model / "mixture.json").write_text(
        json.dumps({**config, "class_names": ["a", "b"], "class_prior": [0.5, 0.5]})
    )
    with pytest.raises(CheckpointError, match="does not match mixture.json condition 'class_label' with 2"):
        load_bundle(model)


def test_a_diffusers_card_needs_a_ddpm_parametrization() -> None:
    base = load_card(DEFAULT_MODEL / "experts" / "digits-0-6").model_dump()
    with pytest.raises(ValueError, match="parametrization.kind: a 'diffusers_unet2d' backbone needs 'ddpm'"):
        ExpertCard.model_validate({**base, "backbone": "diffusers_unet2d"})


PRIOR = [0.5, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2]
PRIOR_CONFIG = CONFIG.model_copy(update={"class_prior": PRIOR, "unconditional": "prior"})


def test_unconditional_prior_draws_each_images_class_from_the_class_prior() -> None:
    """p(x) = sum_c p(c) p(x | c): each image its own class c ~ p(c), seeded by the request's seed, with
    the one-hot condition of that class; the same seed gives the same classes, whatever the front end."""
    from mode_ray.train.unconditional import chi_square

    state = prepare(GenerateParams(num_images=64, seed=11), PRIOR_CONFIG, CARDS)
    labels = state.req.labels
    assert labels == draw_labels(PRIOR, 64, 11) and set(labels) <= {0, 3, 9} and len(set(labels)) == 3
    assert state.cond.tolist() == [torch.eye(10)[c].tolist() for c in labels]
    assert prepare(GenerateParams(num_images=64, seed=11), PRIOR_CONFIG, CARDS).req.labels == labels
    assert prepare(GenerateParams(num_images=64, seed=12), PRIOR_CONFIG, CARDS).req.labels != labels

    counts = torch.bincount(torch.tensor(draw_labels(PRIOR, 20_000, 0)), minlength=10)
    kept = torch.tensor(PRIOR) > 0
    assert counts[~kept].sum() == 0
    _, p_prior = chi_square(counts[kept], torch.tensor(PRIOR)[kept])
    _, p_uniform = chi_square(counts[kept], torch.full((3,), 1 / 3))
    assert p_prior > 1e-3 and p_uniform < 1e-12  # the drawn shares are the prior's, not uniform ones


def test_the_request_overrides_the_mixtures_unconditional_mode() -> None:
    null = prepare(GenerateParams(num_images=3, seed=1, unconditional="null"), PRIOR_CONFIG, CARDS)
    assert null.req.labels is None and null.cond is None and null.result().labels == [-1, -1, -1]
    null_default = PRIOR_CONFIG.model_copy(update={"unconditional": "null"})
    assert prepare(GenerateParams(num_images=3, seed=1), null_default, CARDS).req.labels is None
    prior = prepare(GenerateParams(num_images=3, seed=1, unconditional="prior"), null_default, CARDS)
    assert prior.result().labels == list(draw_labels(PRIOR, 3, 1))
    assert prepare(GenerateParams(prompt=3, num_images=2), PRIOR_CONFIG, CARDS).req.labels == (3, 3)


@pytest.mark.parametrize(
    ("params", "config", "words"),
    [
        (GenerateParams(prompt=3, unconditional="prior"), PRIOR_CONFIG, "unconditional: only for requests"),
        (GenerateParams(class_label=3, unconditional="null"), PRIOR_CONFIG, "unconditional: only for"),
        (
            GenerateParams(unconditional="prior"),
            CONFIG.model_copy(update={"class_prior": None}),
            "unconditional: mixture 't' has no class_prior",
        ),
        (
            GenerateParams(unconditional="prior"),
            CONFIG.model_copy(update={"condition": "text", "class_prior": None}),
            "it has no class prior",
        ),
    ],
)
def test_unconditional_prior_is_refused_where_there_is_no_prior(params, config, words) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=words):
        prepare(params, config, CARDS)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"unconditional": "prior"}, "needs class_prior"),
        ({"class_prior": [0.5, 0.5]}, r"one share per class \(10\), got 2"),
        ({"class_prior": [-0.1] + [0.1] * 9}, "finite, >= 0"),
        ({"class_prior": [0.0] * 10}, "not all 0"),
        ({"class_prior": [0.1] * 10, "condition": "text"}, "class_label' only"),
        ({"condition": "text", "text_precision": "int8"}, "text_precision"),
    ],
)
def test_a_bad_class_prior_or_text_precision_is_refused_by_the_config(fields: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        MixtureConfig(name="t", experts=["e0"], **fields)
    shares = MixtureConfig(name="t", experts=["e0"], class_prior=[2.0] * 10).class_prior
    assert shares == [0.1] * 10  # normalised on load


def test_a_split_request_keeps_each_slices_drawn_classes() -> None:
    from mode_ray.generation.result import merge_results

    state = prepare(GenerateParams(num_images=5, seed=4, steps=1), PRIOR_CONFIG, CARDS)
    parts = state.split(2)
    assert [p.req.labels for p in parts] == [
        state.req.labels[:2],
        state.req.labels[2:4],
        state.req.labels[4:],
    ]
    assert all(torch.equal(p.cond, state.cond[i * 2 : i * 2 + p.rows]) for i, p in enumerate(parts))
    assert merge_results([p.result() for p in parts]).labels == list(state.req.labels)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"prompt": True}, "prompt must not be a boolean"),
        ({"class": False}, "class must not be a boolean"),
        ({"num_images": True}, "num_images must not be a boolean"),
        ({"seed": False}, "seed must not be a boolean"),
        ({"guidance_scale": True}, "guidance_scale must not be a boolean"),
    ],
)
def test_json_booleans_are_not_numbers(fields, words) -> None:  # noqa: ANN001
    """JSON true / false would otherwise become 1 / 0 (class 1, seed 0, one image): refused, naming the field."""
    with pytest.raises(ValueError, match=words):
        GenerateParams.model_validate(fields)

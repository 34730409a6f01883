"""Free-text prompts end to end in process: encoded once per request, routed by the prototype gate on the
pooled embedding, guided with the exact null condition, stacked with other requests unchanged."""

from __future__ import annotations

import pytest
import torch

from mode_ray.generation import GenerateParams, generate_local, load_bundle
from mode_ray.generation.batch import stack_cond
from mode_ray.generation.params import resolve
from tests.tiny import TEXT_TOKENS, build_tiny_text_mixture


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):  # noqa: ANN001, ANN201
    return load_bundle(build_tiny_text_mixture(tmp_path_factory.mktemp("text")))


def test_a_prompt_is_encoded_once_into_a_packed_condition(bundle) -> None:  # noqa: ANN001
    req = resolve(GenerateParams(prompt="a handwritten seven", num_images=3), bundle.config)
    assert req.cond.shape == (3, 1 + TEXT_TOKENS, 384) and req.labels is None
    assert torch.equal(req.cond[0], req.cond[2])  # one encoding, repeated per image
    assert resolve(GenerateParams(num_images=2), bundle.config).cond is None
    with pytest.raises(ValueError, match="class: mixture 'tiny-text' takes free-text prompts"):
        resolve(GenerateParams.model_validate({"class": 3}), bundle.config)


def test_the_prototype_gate_routes_by_meaning(bundle) -> None:  # noqa: ANN001
    """t0 holds the even digits, t1 the odd ones (captions 'a handwritten <name>'): the gate's first choice
    for a prompt is the expert of its digit, at every step."""
    for prompt, expert in (("a handwritten four", "t0"), ("a handwritten nine", "t1")):
        result = generate_local(
            bundle.mixture, bundle.config, GenerateParams(prompt=prompt, num_images=1, seed=1)
        )
        assert {step.experts[0][0] for step in result.trace} == {expert}


def test_guidance_and_batching_stay_exact_with_text(bundle) -> None:  # noqa: ANN001
    """guidance 1 (no null copy) differs from guidance 2; a conditional and an unconditional request
    stacked together give each the rows it has alone (null rows are all zeros)."""
    base = {"prompt": "the digit 2", "num_images": 2, "seed": 5}
    g1 = generate_local(bundle.mixture, bundle.config, GenerateParams(**base, guidance_scale=1.0)).images
    g2 = generate_local(bundle.mixture, bundle.config, GenerateParams(**base, guidance_scale=2.0)).images
    assert (g1 - g2).abs().max() > 1e-3 and torch.isfinite(g2).all()
    cond = resolve(GenerateParams(**base), bundle.config).cond
    stacked = stack_cond([cond, None], [2, 3])
    assert stacked.shape == (5, 1 + TEXT_TOKENS, 384)
    assert torch.equal(stacked[:2], cond) and not stacked[2:].any()

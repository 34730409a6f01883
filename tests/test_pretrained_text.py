"""The shipped text-prompted model (mode_ray/pretrained/mnist-text): safetensors only, a DiT beside UNets,
and free-text prompts, seen in training and never seen, give the digit asked for."""

import pytest
import torch

from mode_ray.cli import DEFAULT_MODEL
from mode_ray.generation import GenerateParams, generate_local, load_bundle
from mode_ray.train.classifier import load_classifier

TEXT_MODEL = DEFAULT_MODEL.parent / "mnist-text"


@pytest.fixture(scope="module")
def bundle():  # noqa: ANN201
    return load_bundle(TEXT_MODEL)


def test_it_is_a_text_mixture_of_two_architectures(bundle) -> None:  # noqa: ANN001
    assert bundle.config.condition == "text" and bundle.config.text_tokens == 16
    assert {c.backbone for c in bundle.mixture.cards} == {"unet", "dit"}
    assert all(
        c.condition.encoder == "all-MiniLM-L6-v2" and len(c.prototype) == 384 for c in bundle.mixture.cards
    )
    files = {p.suffix for p in TEXT_MODEL.rglob("*") if p.is_file()}
    assert files <= {".json", ".safetensors"}, files  # nothing that unpickles
    assert sum(p.stat().st_size for p in TEXT_MODEL.rglob("*")) < 16 * 2**20


@pytest.mark.parametrize(
    ("prompt", "digit"), [("a handwritten seven", 7), ("the digit 2", 2), ("number four", 4), ("a 9", 9)]
)
def test_prompts_give_the_digit(bundle, prompt: str, digit: int) -> None:  # noqa: ANN001
    """Two phrasings from training and two paraphrases it never saw ("number four", "a 9")."""
    judge = load_classifier(DEFAULT_MODEL / "classifier")
    gen = generate_local(
        bundle.mixture, bundle.config, GenerateParams(prompt=prompt, num_images=8, seed=digit)
    )
    votes = judge(gen.images * 2 - 1).argmax(1)
    assert (votes == digit).float().mean() >= 0.75, votes.tolist()
    assert torch.isfinite(gen.images).all()

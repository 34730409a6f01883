"""The text condition encoder (all-MiniLM-L6-v2 from its pinned PyPI package) and packed text conditions."""

from __future__ import annotations

import pytest
import torch

from mode_ray.models import text
from mode_ray.models.conditions import pack, pooled, token_mask, tokens
from mode_ray.models.text import TextEncoder, TextEncoderError, shared_encoder


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return shared_encoder(16)


def test_pooled_embedding_equals_sentence_transformers(encoder: TextEncoder) -> None:
    """The packaged model through sentence-transformers (the reference implementation) gives the same
    normalised mean-pooled embedding as ours (transformers' BertModel on the same safetensors)."""
    from sentence_transformers import SentenceTransformer

    prompts = ["a handwritten seven", "the digit 3", "a thick, right-slanted 0 with a long tail"]
    reference = SentenceTransformer(str(text.model_dir()), device="cpu").encode(
        prompts, convert_to_tensor=True
    )
    ours = pooled(encoder.encode(prompts))
    assert ours.shape == (3, 384)
    assert (ours - reference.cpu()).abs().max() <= 1e-5
    assert torch.allclose(ours.norm(dim=1), torch.ones(3), atol=1e-5)


def test_packed_layout_tokens_mask_and_the_null_prompt(encoder: TextEncoder) -> None:
    cond = encoder.encode(["seven", "", "   ", "a handwritten digit seven"])
    assert cond.shape == (4, 17, 384) and cond.dtype == torch.float32
    mask = token_mask(cond)
    # "seven" is [CLS] seven [SEP] ("handwritten" is two word pieces); blank prompts are the null condition
    assert mask.sum(1).tolist() == [3, 0, 0, 7]
    assert not cond[1].any() and not cond[2].any()
    assert (tokens(cond)[~mask] == 0).all()


def test_each_prompt_is_encoded_as_alone(encoder: TextEncoder) -> None:
    """Padding a batch to its longest prompt changes nothing: a prompt's condition does not depend on the
    other prompts of the request (so the router's per-request encoding equals the in-process one)."""
    prompts = ["one", "a very thin, left-slanted handwritten number four, drawn quickly"]
    together = encoder.encode(prompts)
    alone = torch.cat([encoder.encode([p]) for p in prompts])
    assert (together - alone).abs().max() <= 1e-5


def test_long_prompts_are_cut_and_tokens_fill_l(encoder: TextEncoder) -> None:
    cond = encoder.encode(["seven " * 400])  # 800+ word pieces: cut at the encoder's 256
    assert token_mask(cond).sum().item() == 16 and torch.isfinite(cond).all()
    assert TextEncoder(tokens=0).encode(["seven"]).shape == (1, 384)
    with pytest.raises(ValueError, match="tokens must be in"):
        TextEncoder(tokens=1000)


def test_weights_that_do_not_match_the_pinned_hash_are_refused(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(text, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(TextEncoderError, match="SHA-256"):
        TextEncoder()


def test_pack_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(2, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    m = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    cond = pack(p, t, m)
    assert cond.shape == (2, 6, 8)
    assert torch.equal(pooled(cond), p) and torch.equal(token_mask(cond), m)
    assert torch.equal(tokens(cond)[m], t[m]) and not tokens(cond)[~m].any()
    assert pooled(p) is p and tokens(p) is None and token_mask(p) is None


def test_encode_one_remembers_recent_prompts(encoder: TextEncoder) -> None:
    first = encoder.encode_one("a handwritten five")
    assert torch.equal(first, encoder.encode(["a handwritten five"]))
    first.zero_()  # the caller owns its copy: the remembered one is unchanged
    again = encoder.encode_one("a handwritten five")
    assert torch.equal(again, encoder.encode(["a handwritten five"])) and again.any()
    assert "a handwritten five" in encoder._cache

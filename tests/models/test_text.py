"""The text condition encoder (all-MiniLM-L6-v2 from its pinned PyPI package) and packed text conditions."""

from __future__ import annotations

import pytest
import torch

from mode_ray.models import text
from mode_ray.models.conditions import pack, pooled, token_mask, tokens
from mode_ray.models.text import TextEncoder, TextEncoderError, shared_encoder


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return shared_encoder(16, "float32")


@pytest.fixture(scope="module")
def encoder_bf16() -> TextEncoder:
    return shared_encoder(16, "bfloat16")


PROMPTS = [
    "a handwritten seven",
    "the digit 3",
    "a thick, right-slanted 0 with a long tail",
    "one",
    "an image of the number nine, written quickly with a thin pen on grey paper",
]


def test_pooled_embedding_equals_sentence_transformers(encoder: TextEncoder) -> None:
    """The packaged model through sentence-transformers (the reference implementation) gives the same
    normalised mean-pooled embedding as ours (mode_ray.models.bert in float32 on the same safetensors)."""
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


def test_float32_forward_equals_transformers_bert(encoder: TextEncoder) -> None:
    """Every token's hidden state, padded batch included, equals transformers' BertModel on the same weights:
    the fused projections change the arithmetic's order only."""
    import json

    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    root = text.model_dir()
    reference = BertModel(
        BertConfig.from_dict(json.loads((root / "config.json").read_text())), add_pooling_layer=False
    )
    reference.load_state_dict(load_file(str(root / "model.safetensors")), strict=False)
    reference.eval()
    encodings = encoder.tokenizer.encode_batch(PROMPTS)
    n = max(len(e.ids) for e in encodings)
    ids, mask = (
        torch.zeros((len(PROMPTS), n), dtype=torch.long),
        torch.zeros((len(PROMPTS), n), dtype=torch.long),
    )
    for i, e in enumerate(encodings):
        ids[i, : len(e.ids)], mask[i, : len(e.ids)] = torch.tensor(e.ids), 1
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, n, D)
    ours = encoder.bert(ids, mask)
    real = mask.bool()
    assert ours.shape == expected.shape and ours.dtype == torch.float32
    assert (ours - expected)[real].abs().max() <= 1e-5


def test_bfloat16_weights_stay_close_to_float32(encoder: TextEncoder, encoder_bf16: TextEncoder) -> None:
    """bfloat16 matmul weights (float32 residual stream and norms): what the gates read (the pooled embedding)
    keeps cosine >= 0.9999, each token embedding stays within 3% of its float32 norm; the packing is the same."""
    assert encoder_bf16.precision == "bfloat16" and encoder.precision == "float32"
    assert encoder_bf16.bert.layers[0].w_qkv.dtype == torch.bfloat16
    exact, fast = encoder.encode(PROMPTS + [""]), encoder_bf16.encode(PROMPTS + [""])
    assert fast.dtype == torch.float32 and torch.equal(token_mask(fast), token_mask(exact))
    cosine = torch.nn.functional.cosine_similarity(pooled(fast)[:-1], pooled(exact)[:-1], dim=-1)
    assert cosine.min() >= 0.9999
    keep = token_mask(exact)
    relative = (tokens(fast) - tokens(exact)).norm(dim=-1)[keep] / tokens(exact).norm(dim=-1)[keep]
    assert relative.max() <= 0.03
    assert not fast[-1].any()  # the null condition stays exactly zero


def test_precision_auto_follows_the_device_and_bad_values_are_refused() -> None:
    from mode_ray.models.bert import native_bfloat16

    expected = "bfloat16" if native_bfloat16(torch.device("cpu")) else "float32"
    assert text.resolve_precision("auto", torch.device("cpu")) == expected
    assert text.resolve_precision("float32", torch.device("cpu")) == "float32"
    with pytest.raises(ValueError, match="precision must be auto, float32 or bfloat16, got 'int8'"):
        text.resolve_precision("int8", torch.device("cpu"))  # type: ignore[arg-type]

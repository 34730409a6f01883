"""A BERT encoder's forward pass for inference (Devlin et al. 2019), over a transformers-layout state dict.

Why not transformers' `BertModel`: at the lengths a prompt has (3-30 word pieces, one prompt per request) the
encoder is bound by reading its ~42 MB of matmul weights, not by arithmetic. This forward fuses the query, key
and value projections into one matmul and can keep the matmul weights in bfloat16 (the residual stream, layer
norms, softmax and biases stay float32), which halves the bytes each request reads. In float32 it equals
`BertModel` to ~2e-6 (tests/models/test_text.py); `benchmarks/bench_text_encoder.py` measures both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Precision = Literal["float32", "bfloat16"]


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively (CPU: AVX512-BF16 or AMX; CUDA: sm80+): where it
    does not, bfloat16 weights would be emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's capability probes
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


class BertLayer(nn.Module):
    """One post-norm transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(
        self, state: Mapping[str, torch.Tensor], prefix: str, heads: int, eps: float, dtype: torch.dtype
    ):
        super().__init__()
        self.heads, self.eps = heads, eps
        a = f"{prefix}attention."
        qkv = [f"{a}self.{p}" for p in ("query", "key", "value")]
        self.register_buffer("w_qkv", torch.cat([state[f"{p}.weight"] for p in qkv]).to(dtype))  # (3D, D)
        self.register_buffer("b_qkv", torch.cat([state[f"{p}.bias"] for p in qkv]).float())  # (3D,)
        names = {
            "w_o": f"{a}output.dense.weight",  # (D, D)
            "w_in": f"{prefix}intermediate.dense.weight",  # (F, D)
            "w_out": f"{prefix}output.dense.weight",  # (D, F)
        }
        for name, key in names.items():
            self.register_buffer(name, state[key].to(dtype))
        vectors = {
            "b_o": f"{a}output.dense.bias",
            "ln1_w": f"{a}output.LayerNorm.weight",
            "ln1_b": f"{a}output.LayerNorm.bias",
            "b_in": f"{prefix}intermediate.dense.bias",
            "b_out": f"{prefix}output.dense.bias",
            "ln2_w": f"{prefix}output.LayerNorm.weight",
            "ln2_b": f"{prefix}output.LayerNorm.bias",
        }
        for name, key in vectors.items():
            self.register_buffer(name, state[key].float())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, n, D) float32; mask: (B, 1, 1, n) bool (keys to attend to) or None (all) -> (B, n, D)."""
        B, n, D = x.shape
        qkv = _linear(x, self.w_qkv, self.b_qkv).view(B, n, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, n, D / heads)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, n, D)
        x = F.layer_norm(x + _linear(a, self.w_o, self.b_o), (D,), self.ln1_w, self.ln1_b, self.eps)
        h = F.gelu(_linear(x, self.w_in, self.b_in))  # (B, n, F); BERT's gelu is the exact (erf) one
        return F.layer_norm(x + _linear(h, self.w_out, self.b_out), (D,), self.ln2_w, self.ln2_b, self.eps)


class Bert(nn.Module):
    """input ids (B, n) -> last hidden states (B, n, D), float32 whatever the weights' precision."""

    def __init__(self, state: Mapping[str, torch.Tensor], config: Mapping, precision: Precision = "float32"):
        super().__init__()
        if config.get("hidden_act", "gelu") != "gelu" or config.get(
            "position_embedding_type", "absolute"
        ) != ("absolute"):
            raise ValueError("only BERT with gelu and absolute position embeddings is supported")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]
        self.precision, self.eps = precision, float(config["layer_norm_eps"])
        e = "embeddings."
        self.register_buffer("word", state[f"{e}word_embeddings.weight"].float())  # (vocab, D)
        self.register_buffer("position", state[f"{e}position_embeddings.weight"].float())  # (max_n, D)
        self.register_buffer("token_type", state[f"{e}token_type_embeddings.weight"][0].float())  # (D,)
        self.register_buffer("ln_w", state[f"{e}LayerNorm.weight"].float())
        self.register_buffer("ln_b", state[f"{e}LayerNorm.bias"].float())
        heads = int(config["num_attention_heads"])
        self.layers = nn.ModuleList(
            BertLayer(state, f"encoder.layer.{i}.", heads, self.eps, dtype)
            for i in range(int(config["num_hidden_layers"]))
        )

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids: (B, n) long; mask: (B, n), 1 for a prompt's tokens and 0 for padding -> (B, n, D) float32."""
        n = ids.shape[1]
        x = self.word[ids] + self.position[:n] + self.token_type  # (B, n, D); one segment
        x = F.layer_norm(x, x.shape[-1:], self.ln_w, self.ln_b, self.eps)
        keys = (
            None if bool(mask.all()) else mask.bool()[:, None, None, :]
        )  # (B, 1, 1, n): padding is never attended
        for layer in self.layers:
            x = layer(x, keys)
        return x


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x @ w.T + b with w in its own precision; x and the result float32."""
    if w.dtype == x.dtype:
        return F.linear(x, w, b)
    return F.linear(x.to(w.dtype), w).float() + b

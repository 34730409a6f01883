"""What a free-text prompt costs a request: the text encoder (all-MiniLM-L6-v2) once per request, against the
class-label path, in the router's own `resolve`, for each precision of the encoder's matmul weights.

    python benchmarks/bench_text_encoder.py [--repeats 200]

Writes benchmarks/results/text-encoder.{md,json}. Not a test: run by hand; numbers depend on the machine.
Measures, with 1 and with 2 torch threads: `resolve` of a class-label request on the shipped `mnist` config,
`resolve` of a text request (prompt -> packed (N, 1 + 16, 384) condition) on a text config for a new prompt
(the encoder runs) and for a repeated one (the encoder's cache of recent prompts), and the bare
`TextEncoder.encode` of one prompt, over prompts of 3 to ~30 word pieces; each for the encoder in float32, in
bfloat16 and, as the baseline, with transformers' `BertModel` as the network (what the encoder ran before
mode_ray.models.bert). Variants are timed back to back per prompt, so their ratios come from one moment of the
machine. The encoder runs once per request (the router resolves a request once, then only steps it), so this
is the whole per-request cost.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mode_ray.cli import DEFAULT_MODEL
from mode_ray.generation import GenerateParams
from mode_ray.generation.bundle import MixtureConfig, load_config
from mode_ray.generation.params import resolve
from mode_ray.models.text import TextEncoder, model_dir, resolve_precision, shared_encoder

OUT = Path(__file__).resolve().parent / "results"
PROMPTS = [
    "seven",
    "a handwritten seven",
    "a thick, left-slanted 3",
    "an image of the number four, written quickly with a thin pen",
    "a very neat handwritten digit eight with two round loops, the upper one smaller than the lower, drawn "
    "slowly in dark ink on white paper",
]


def timed_ms(fn, repeats: int) -> dict[str, float]:  # noqa: ANN001
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 3), "p95_ms": round(times[int(0.95 * len(times))], 3)}


class TransformersBert:
    """transformers' BertModel on the same safetensors, called like mode_ray.models.bert.Bert."""

    def __init__(self) -> None:
        from safetensors.torch import load_file
        from transformers import BertConfig, BertModel

        config = BertConfig.from_dict(json.loads((model_dir() / "config.json").read_text()))
        self.model = BertModel(config, add_pooling_layer=False).eval()
        self.model.load_state_dict(load_file(str(model_dir() / "model.safetensors")), strict=False)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    class_config = load_config(DEFAULT_MODEL)
    encoders = {p: TextEncoder(16, precision=p) for p in ("float32", "bfloat16")}
    encoders["transformers"] = TextEncoder(16, precision="float32")
    encoders["transformers"].bert = TransformersBert()
    configs = {  # resolve() reaches the encoder through shared_encoder(L, precision); the baseline has no config
        p: MixtureConfig(name="text", experts=["x"], condition="text", text_tokens=16, text_precision=p)
        for p in ("float32", "bfloat16")
    }
    variants = list(encoders)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        row: dict = {"threads": threads}
        row["resolve_class_label"] = {
            "float32": timed_ms(
                lambda: resolve(GenerateParams(prompt="seven", num_images=4), class_config), args.repeats
            )
        }
        row["resolve_text_repeated_prompt"] = {  # a prompt seen before: from the encoder's cache
            p: timed_ms(
                lambda c=c: resolve(GenerateParams(prompt="a handwritten seven", num_images=4), c),
                args.repeats,
            )
            for p, c in configs.items()
        }
        for prompt in PROMPTS:
            pieces = len(encoders["float32"].tokenizer.encode(prompt).ids)
            row[f"resolve_text_{pieces}_pieces"] = {  # a new prompt: the encoder runs
                p: timed_ms(
                    lambda c=c, prompt=prompt: (
                        resolve(GenerateParams(prompt=prompt, num_images=4), c),
                        _clear_shared(),
                    ),
                    args.repeats,
                )
                for p, c in configs.items()
            }
            row[f"encode_{pieces}_pieces"] = {
                v: timed_ms(lambda e=encoders[v], prompt=prompt: e.encode([prompt]), args.repeats)
                for v in variants
            }
        rows.append(row)
    result = {
        "machine": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "auto_precision_here": resolve_precision("auto", torch.device("cpu")),
        "rows": rows,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "text-encoder.json").write_text(json.dumps(result, indent=2) + "\n")
    columns = [(r["threads"], v) for r in rows for v in variants]
    lines = [
        "# Text encoder cost per request (p50 / p95 ms, one prompt, num_images 4)",
        "",
        f"`auto` precision on this machine: {result['auto_precision_here']}. transformers: BertModel as the "
        "network (float32), the encoder before mode_ray.models.bert.",
        "",
        "| path | " + " | ".join(f"{v}, {t} thread(s)" for t, v in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for k in [k for k in rows[0] if k != "threads"]:
        cells = []
        for t, v in columns:
            m = rows[t - 1][k].get(v)
            cells.append(f"{m['p50_ms']:.2f} / {m['p95_ms']:.2f}" if m else "")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    (OUT / "text-encoder.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _clear_shared() -> None:
    """Forget the prompts the shared encoders remember, so the next resolve runs the encoder."""
    for p in ("float32", "bfloat16"):
        shared_encoder(16, p)._cache.clear()


if __name__ == "__main__":
    main()

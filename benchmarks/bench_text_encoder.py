"""What a free-text prompt costs a request: the text encoder (all-MiniLM-L6-v2) once per request, against the
class-label path, in the router's own `resolve`.

    python benchmarks/bench_text_encoder.py [--repeats 200]

Writes benchmarks/results/text-encoder.{md,json}. Not a test: run by hand; numbers depend on the machine.
Measures, with 1 and with 2 torch threads: `resolve` of a class-label request on the shipped `mnist` config,
`resolve` of a text request (prompt -> packed (N, 1 + 16, 384) condition) on a text config for a new prompt
(the encoder runs) and for a repeated one (the encoder's cache of recent prompts), and the bare
`TextEncoder.encode` of one prompt, over prompts of 3 to ~30 word pieces. The encoder runs once per request
(the router resolves a request once, then only steps it), so this is the whole per-request cost.
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
from mode_ray.models.text import shared_encoder

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    class_config = load_config(DEFAULT_MODEL)
    text_config = MixtureConfig(name="text", experts=["x"], condition="text", text_tokens=16)
    encoder = shared_encoder(16)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        row = {
            "threads": threads,
            "resolve_class_label": timed_ms(
                lambda: resolve(GenerateParams(prompt="seven", num_images=4), class_config), args.repeats
            ),
            "resolve_text_repeated_prompt": timed_ms(  # a prompt seen before: from the encoder's cache
                lambda: resolve(GenerateParams(prompt="a handwritten seven", num_images=4), text_config),
                args.repeats,
            ),
        }
        for p in PROMPTS:
            pieces = len(encoder.tokenizer.encode(p).ids)
            row[f"resolve_text_{pieces}_pieces"] = timed_ms(  # a new prompt: the encoder runs
                lambda p=p: (
                    encoder._cache.clear(),
                    resolve(GenerateParams(prompt=p, num_images=4), text_config),
                ),
                args.repeats,
            )
            row[f"encode_{pieces}_pieces"] = timed_ms(lambda p=p: encoder.encode([p]), args.repeats)
        rows.append(row)
    result = {"machine": platform.processor() or platform.machine(), "repeats": args.repeats, "rows": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / "text-encoder.json").write_text(json.dumps(result, indent=2) + "\n")
    keys = [k for k in rows[0] if k != "threads"]
    lines = [
        "# Text encoder cost per request (p50 / p95 ms, one prompt, num_images 4)",
        "",
        "| path | " + " | ".join(f"{r['threads']} thread(s)" for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for k in keys:
        lines.append(
            f"| {k} | " + " | ".join(f"{r[k]['p50_ms']:.2f} / {r[k]['p95_ms']:.2f}" for r in rows) + " |"
        )
    (OUT / "text-encoder.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

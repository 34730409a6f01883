"""The router's step engine alone: its own Python per tick, without Serve, the wire or other processes.

    .venv/bin/python benchmarks/bench_engine.py [--concurrency 1 16 64] [--baseline /path/to/older/checkout]

`StepEngine` runs in this process against in-process emulated GPU experts: each call awaits
base_ms + per_row_ms x rows (asyncio.sleep, the latency `expert.emulate` models) and answers the same cheap
deterministic output as `EmulatedDenoiser`. What is left of a tick beyond that latency is the router's own
work: gate, plan, combine and sampler steps, bookkeeping, the event loop. It is the upper bound of what one
router replica can drive, whatever the transport (bench_router.py measures the served path, which adds the
wire and the processes sharing the cores).

Each measurement runs in a fresh subprocess with one torch thread; with `--baseline`, the same
measurements also run against an older checkout (its `mode_ray` first on PYTHONPATH), the two interleaved
`--repeats` times, so the ratio of before and after comes from one run. Writes
benchmarks/results/engine.{md,json}. Not a test: run by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results"
PHASES = ("wall", "gate", "plan", "wire", "expert", "combine", "overhead")


class InProcessExpert:
    """An `ExpertClient` that answers after the emulated latency, in this process. Like a replica, it runs one
    forward pass at a time: a call that arrives while one runs waits for it (reported as queue time), so an
    expert is never more than 100% busy (two cohorts' calls do not overlap for free)."""

    def __init__(self, name: str, base_ms: float, per_row_ms: float, sigma_data: float = 0.5) -> None:
        self.name, self.base_ms, self.per_row_ms, self.sigma_data = name, base_ms, per_row_ms, sigma_data
        self._busy = asyncio.Lock()

    async def infer(self, x, sigma, cond, timeout):  # noqa: ANN001, ANN201 - the ExpertClient signature
        from mode_ray.serve.transport import ExpertReply

        t0 = time.perf_counter()
        latency = (self.base_ms + self.per_row_ms * x.shape[0]) / 1e3
        async with self._busy:
            started = time.perf_counter()
            await asyncio.sleep(latency)
        s2 = sigma.to(x.dtype).reshape(-1, 1, 1, 1) ** 2
        out = x * self.sigma_data**2 / (s2 + self.sigma_data**2)
        wire = time.perf_counter() - t0
        return ExpertReply(out, wire_s=wire, forward_s=latency, queue_s=started - t0)

    async def ready(self, timeout: float) -> bool:
        return True


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this process: `args.concurrency` one-image requests at a time."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from bench_router import make_mixture

    from mode_ray.generation import GenerateParams
    from mode_ray.generation.bundle import load_bundle
    from mode_ray.generation.params import resolve
    from mode_ray.serve.config import RouterOptions
    from mode_ray.serve.engine import StepEngine
    from mode_ray.serve.registry import ExpertEntry, Snapshot

    bundle = load_bundle(make_mixture(Path(tempfile.mkdtemp(prefix="mode-ray-engine-")), args.experts))
    config, mixture = bundle.config, bundle.mixture
    entries = tuple(ExpertEntry(name=c.name, version=c.version, card=c, state="ready") for c in mixture.cards)
    snapshot = Snapshot(1, entries, mixture.gate)
    clients = {e.name: InProcessExpert(e.name, args.base_ms, args.per_row_ms) for e in entries}
    c = args.concurrency[0]
    options = RouterOptions(
        offload=args.offload == "on", cohorts=args.cohorts, max_active_requests=max(64, c)
    )
    engine = StepEngine(config, options, lambda e: clients[e.name])
    count = max(args.requests, 2 * c)

    async def run() -> tuple[float, list[dict], dict]:
        limit = asyncio.Semaphore(c)
        timings: list[dict] = []

        async def one(i: int) -> None:
            params = GenerateParams(prompt=i % 10, num_images=1, seed=i, steps=18, sampler="heun")
            async with limit:
                result = await engine.generate(resolve(params, config), snapshot, timing=True)
            timings.extend(result.timing or [])

        await asyncio.gather(*(one(i) for i in range(c)))  # warm-up
        timings.clear()
        before = dict(engine.expert_busy_s), engine.ticks, engine.rows_sent
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        wall = time.perf_counter() - t0
        busy = [(engine.expert_busy_s[k] - before[0].get(k, 0.0)) / wall for k in engine.expert_busy_s]
        counters = {
            "ticks_per_s": (engine.ticks - before[1]) / wall,
            "rows_per_s": (engine.rows_sent - before[2]) / wall,
            "busy_mean": statistics.mean(busy),
        }
        return wall, timings, counters

    wall, timings, counters = asyncio.run(run())
    ticks = {t["tick"]: t for t in timings}.values()
    import mode_ray

    return {
        "mode_ray": mode_ray.__file__,
        "images_per_s": count / wall,
        **counters,
        **{f"{p}_p50_ms": statistics.median(t[f"{p}_ms"] for t in ticks) for p in PHASES},
    }


def measure(tree: Path, args: argparse.Namespace, concurrency: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--worker", "--concurrency", str(concurrency)]
    cmd += ["--experts", str(args.experts), "--requests", str(args.requests), "--offload", args.offload]
    cmd += ["--cohorts", str(args.cohorts)]
    cmd += ["--base-ms", str(args.base_ms), "--per-row-ms", str(args.per_row_ms)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker for {tree} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result.pop("mode_ray")).is_relative_to(tree):
        raise RuntimeError(f"the worker for {tree} imported another mode_ray: is it installed non-editable?")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--requests", type=int, default=32, help="at least this many, and 2x the concurrency")
    ap.add_argument("--offload", default="on", choices=["on", "off"], help="router.offload")
    ap.add_argument("--cohorts", type=int, default=1, help="router.cohorts")
    ap.add_argument("--base-ms", type=float, default=2.0)
    ap.add_argument("--per-row-ms", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=3, help="measurements per tree and concurrency (median)")
    ap.add_argument("--baseline", type=Path, help="an older checkout to measure side by side")
    ap.add_argument("--out", default="engine", help="results file stem under benchmarks/results/")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    trees = {"this tree": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    rows = []
    for c in args.concurrency:
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.repeats):
            for name, tree in trees.items():  # interleaved: a slow minute hits both alike
                runs[name].append(measure(tree, args, c))
        for name, measured in runs.items():
            row = {"tree": name, "concurrency": c}
            row |= {k: round(statistics.median(m[k] for m in measured), 3) for k in measured[0]}
            rows.append(row)
            print(row, flush=True)
    ratios = []
    if args.baseline:
        for c in args.concurrency:
            new, old = (next(r for r in rows if r["tree"] == t and r["concurrency"] == c) for t in trees)
            ratios.append(
                {
                    "concurrency": c,
                    "images_per_s (this / baseline)": round(new["images_per_s"] / old["images_per_s"], 3),
                    "overhead_p50 (this / baseline)": round(
                        new["overhead_p50_ms"] / old["overhead_p50_ms"], 3
                    ),
                }
            )
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, 1 torch thread",
        "experts": f"{args.experts} in-process emulated experts, {args.base_ms} ms + {args.per_row_ms} ms/row",
        "requests": "one image each, heun 18 steps (35 evaluations), guidance 2, top-2, prototype + noise gate",
        "offload": args.offload,
        "cohorts": args.cohorts,
        "repeats": args.repeats,
        "baseline": str(args.baseline) if args.baseline else None,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.out}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=2) + "\n"
    )
    lines = [f"Router step engine alone ({'; '.join(f'{k}: {v}' for k, v in meta.items() if v)})", ""]
    for table in (rows, ratios):
        if table:
            keys = list(table[0])
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in table] + [""]
    (OUT / f"{args.out}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Autoscaling under a load that moves from one expert's classes to another's, then stops, then comes back.

    pip install -e ".[bench]"   # matplotlib, for the plot
    python benchmarks/bench_autoscaling.py [--phase-s 40] [--clients 12]

Writes benchmarks/results/autoscaling.{md,json,png}. Not a test: run by hand; numbers depend on the machine.
The shipped mixture's routing, with its experts emulated as GPU experts (a fixed latency per call, see
`expert.emulate`: 30 ms + 0.1 ms per row, a larger model than the MNIST ones, so that the experts and not the
router's Python on 2 shared cores bound a tick) and scale to zero allowed (min 0, max 3 replicas each).
Phases: (A) `--clients` clients loop on requests for digits 0 and 6 (expert digits-0-6's classes), (B) the same
clients on digits 8 and 9 (digits-8-9's), (C) nothing, (D) one request for digit 0: a cold start.
Every 0.5 s the replicas of each expert are counted; the plot shows them over time beside images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from local_serve import start_ray_serve

from mode_ray.cli import DEFAULT_MODEL

OUT = Path(__file__).resolve().parent / "results"
EXPERT = {
    "num_cpus": 0.1,
    "emulate": {"base_ms": 30.0, "per_row_ms": 0.1},
    "min_replicas": 0,
    "initial_replicas": 1,
    "max_replicas": 3,
    "target_load": 1.0,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 5.0,
    "downscale_to_zero_delay_s": 8.0,
    "look_back_period_s": 3.0,
    "metrics_interval_s": 0.5,
}


def replica_counts(apps: list[str]) -> dict[str, int]:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]
    return {app: sum(n.startswith(f"SERVE_REPLICA::{app}#") for n in names) for app in apps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase-s", type=float, default=40.0, help="seconds of each load phase")
    ap.add_argument("--idle-s", type=float, default=30.0, help="seconds without load before the cold start")
    ap.add_argument("--clients", type=int, default=12)
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('the plot needs matplotlib: pip install -e ".[bench]"') from None
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = Path(__file__).resolve().parents[1]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    work = Path(tempfile.mkdtemp(prefix="mode-ray-autoscaling-"))
    model = work / "mnist"
    shutil.copytree(DEFAULT_MODEL, model)

    import ray
    from ray import serve

    from mode_ray.serve.app import build_app
    from mode_ray.serve.config import APP_NAME, AppArgs

    http_port, grpc_port = start_ray_serve()
    url = f"http://127.0.0.1:{http_port}"
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64))
    a = AppArgs(
        model_dir=model,
        state_dir=work / "state",
        grpc_target=f"127.0.0.1:{grpc_port}",
        expert=EXPERT,
        router={"num_cpus": 0.25, "cohorts": 2},
    )
    experts = json.loads((model / "mixture.json").read_text())["experts"]
    apps = [f"expert-{e}" for e in experts]
    samples: list[dict] = []
    done: list[tuple[float, int]] = []  # (time, images) of every completed request
    failures: list[str] = []
    t_start = time.perf_counter()
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            samples.append({"t": round(time.perf_counter() - t_start, 2), **replica_counts(apps)})
            stop_sampling.wait(0.5)

    def request(digits: list[int], i: int) -> dict:
        body = {"prompt": digits[i % len(digits)], "num_images": 1, "seed": i, "steps": 18, "output": "json"}
        r = client.post(f"{url}/v1/generate", json=body)
        if r.status_code != 200 or r.json()["dropped_mass"] != 0:
            failures.append(r.text[:200])
            return {}
        done.append((time.perf_counter() - t_start, 1))
        return r.json()

    def load(digits: list[int], seconds: float) -> None:
        until = time.perf_counter() + seconds

        def loop(c: int) -> None:
            i = c
            while time.perf_counter() < until:
                request(digits, i)
                i += args.clients

        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(loop, range(args.clients)))

    phases: list[dict] = []
    try:
        serve.run(build_app(a), name=APP_NAME, route_prefix="/")
        t_start = time.perf_counter()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for name, digits in (("A: digits 0, 6", [0, 6]), ("B: digits 8, 9", [8, 9])):
            t0 = time.perf_counter() - t_start
            load(digits, args.phase_s)
            phases.append(
                {"phase": name, "from_s": round(t0, 1), "to_s": round(time.perf_counter() - t_start, 1)}
            )
        t0 = time.perf_counter() - t_start
        time.sleep(args.idle_s)
        phases.append(
            {"phase": "C: idle", "from_s": round(t0, 1), "to_s": round(time.perf_counter() - t_start, 1)}
        )
        at_zero = replica_counts(apps)
        t0 = time.perf_counter()
        cold = request([0], 0)
        cold_s = time.perf_counter() - t0
        phases.append(
            {
                "phase": "D: one request",
                "from_s": round(t0 - t_start, 1),
                "to_s": round(time.perf_counter() - t_start, 1),
            }
        )
        time.sleep(2)
        stop_sampling.set()
        sampler.join()
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    peak = {app: max(s[app] for s in samples) for app in apps}
    summary = {
        "requests completed": len(done),
        "requests failed or with dropped mass": len(failures),
        "peak replicas": peak,
        "replicas after the idle phase": at_zero,
        "cold start: the request's seconds (18 heun steps)": round(cold_s, 2),
        "cold start: the longest call that waited, per expert (s)": cold.get("cold_starts", {}),
    }
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "expert": EXPERT,
        "clients": args.clients,
        "phase_s": args.phase_s,
        "router": {"cohorts": 2},
    }
    OUT.mkdir(exist_ok=True)
    stem = OUT / "autoscaling"
    payload = {
        "meta": meta,
        "summary": summary,
        "phases": phases,
        "samples": samples,
        "failures": failures[:20],
    }
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[2, 1])
    ts = [s["t"] for s in samples]
    for i, app in enumerate(apps):
        ax.step(ts, [s[app] + 0.04 * i for s in samples], where="post", label=app.removeprefix("expert-"))
    for p, colour in zip(phases, ["#dde8f5", "#f5e6dd", "#eeeeee", "#e2f5dd"], strict=False):
        for axis in (ax, bx):
            axis.axvspan(p["from_s"], p["to_s"], color=colour, zorder=0)
        ax.text(p["from_s"] + 0.5, 3.25, p["phase"], fontsize=8, va="bottom")
    ax.set_ylabel("replicas")
    ax.set_ylim(-0.2, 3.6)
    ax.legend(loc="center right", fontsize=8)
    ax.set_title("mode_ray: expert replicas under a load that moves between experts (load-aware autoscaling)")
    width = 2.0
    bins = [i * width for i in range(int(max(ts) / width) + 2)]
    counts = [sum(1 for t, _ in done if b <= t < b + width) / width for b in bins]
    bx.bar(bins, counts, width=width, align="edge", color="#4a7ab5")
    bx.set_ylabel("images/s")
    bx.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)

    lines = ["| phase | from s | to s |", "|---|---|---|"]
    lines += [f"| {p['phase']} | {p['from_s']} | {p['to_s']} |" for p in phases]
    lines += ["", "| result | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", "| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in meta.items()]
    lines += ["", "![replicas over time](autoscaling.png)"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

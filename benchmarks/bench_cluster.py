"""Cluster vs in-process throughput and latency on the shipped model, measured side by side in one run.

    python benchmarks/bench_cluster.py [--requests 32] [--steps 18] [--images 1]

Writes benchmarks/results/cluster.{md,json}. Not a test: run by hand; numbers depend on the machine.
Measures: images/s and p50/p95 latency of (a) the in-process Mixture and (b) the Serve cluster (HTTP ->
router -> experts) at 1 and 16 concurrent requests for each transport (gRPC through the proxy, the Serve
handle, gRPC straight to the replicas' own ports); the step engine's continuous batching on vs off; the
time from hot-add to the first request routed to the new expert.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from local_serve import start_ray_serve

from mode_ray.cli import DEFAULT_MODEL
from mode_ray.generation import GenerateParams, generate_local, load_bundle

OUT = Path(__file__).resolve().parent / "results"


def summarize(name: str, latencies: list[float], wall: float, images: int) -> dict:
    lat = sorted(latencies)
    return {
        "name": name,
        "requests": len(lat),
        "images_per_s": round(images / wall, 3),
        "p50_s": round(statistics.median(lat), 3),
        "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3),
        "wall_s": round(wall, 2),
    }


def run_load(fn, n: int, concurrency: int) -> tuple[list[float], float]:  # noqa: ANN001
    def one(i: int) -> float:
        t0 = time.perf_counter()
        fn(i)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(n)))
    return latencies, time.perf_counter() - t0


def phase_medians(ticks: list[dict]) -> dict[str, float]:
    """p50 over ticks of each phase (ms), and the p50 router overhead per evaluation."""
    keys = [k for k in ticks[0] if k.endswith("_ms")] if ticks else []
    return {k: round(statistics.median(t[k] for t in ticks), 3) for k in keys}


def params(i: int, steps: int, images: int) -> dict:
    return {"prompt": i % 10, "num_images": images, "seed": i, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32, help="requests per configuration")
    ap.add_argument("--steps", type=int, default=18, help="sampler steps (heun)")
    ap.add_argument("--images", type=int, default=1, help="images per request")
    ap.add_argument("--expert-cpus", type=float, default=0.25, help="logical CPUs per expert replica")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["MODE_RAY_ADMIN_TOKEN"] = token = "bench-token"
    root = Path(__file__).resolve().parents[1]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    work = Path(tempfile.mkdtemp(prefix="mode-ray-bench-"))
    model = work / "mnist"
    shutil.copytree(DEFAULT_MODEL, model)
    rows: list[dict] = []

    # ---- in-process reference (same experts, steps, batch) --------------------------------------------
    bundle = load_bundle(model)

    def local(i: int) -> None:
        generate_local(
            bundle.mixture,
            bundle.config,
            GenerateParams(**params(i, args.steps, args.images)),
        )

    for threads in sorted({1, os.cpu_count() or 1}):  # small batches can run faster on one torch thread
        torch.set_num_threads(threads)
        local(0)  # warm-up
        for c in (1, 16):
            lat, wall = run_load(local, args.requests, c)
            rows.append(
                summarize(
                    f"in-process, {c} concurrent, {threads} torch threads",
                    lat,
                    wall,
                    args.requests * args.images,
                )
            )
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()  # the ideal: all requests' images in one batch of the in-process mixture
    generate_local(
        bundle.mixture,
        bundle.config,
        GenerateParams(prompt=3, num_images=16 * args.images, seed=0, steps=args.steps),
    )
    ideal = 16 * args.images / (time.perf_counter() - t0)

    # ---- the cluster -----------------------------------------------------------------------------------
    import ray
    from ray import serve

    from mode_ray.serve.app import build_app
    from mode_ray.serve.config import APP_NAME, AppArgs

    http_port, grpc_port = start_ray_serve()
    url = f"http://127.0.0.1:{http_port}"

    experts_as: list[tuple[float, bool]] = []  # (batch wait, own direct port) the expert apps run with

    def deploy(continuous: bool, transport: str = "grpc", wait: float = 0.002, cohorts: int = 1) -> None:
        shape = (wait, transport == "direct")
        if experts_as and experts_as[-1] != shape:  # the router leaves RUNNING experts alone: redeploy them
            for name in bundle.mixture.names:
                serve.delete(f"expert-{name}")
        experts_as.append(shape)
        a = AppArgs(
            model_dir=model,
            state_dir=work / "state",
            grpc_target=f"127.0.0.1:{grpc_port}",
            expert={"num_cpus": args.expert_cpus, "max_replicas": 1, "batch_wait_timeout_s": wait},
            router={
                "num_cpus": 0.25,
                "continuous_batching": continuous,
                "transport": transport,
                "cohorts": cohorts,
            },
        )
        serve.run(build_app(a), name=APP_NAME, route_prefix="/")

    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64))
    ticks: list[dict] = []  # the per-tick breakdown of every evaluation of the current configuration

    def remote(i: int) -> None:
        body = {**params(i, args.steps, args.images), "output": "json", "timing": True}
        r = client.post(f"{url}/v1/generate", json=body)
        r.raise_for_status()
        ticks.extend(r.json()["timing"])

    def measure(name: str, concurrency: int) -> None:
        ticks.clear()
        lat, wall = run_load(remote, args.requests, concurrency)
        rows.append(summarize(name, lat, wall, args.requests * args.images))
        breakdown[name] = phase_medians(ticks)

    breakdown: dict[str, dict[str, float]] = {}
    try:
        t0 = time.perf_counter()
        deploy(True)
        start_s = time.perf_counter() - t0
        for transport, wait in (("grpc", 0.002), ("handle", 0.002), ("handle", 0.0), ("direct", 0.0)):
            deploy(True, transport, wait)
            remote(0)
            for c in (1, 16):
                measure(f"cluster ({transport}, expert wait {wait * 1e3:g} ms), {c} concurrent", c)
        deploy(True, "handle", 0.0, cohorts=2)
        remote(0)
        for c in (1, 16):
            measure(f"cluster (handle, expert wait 0 ms, 2 cohorts), {c} concurrent", c)
        deploy(False, "grpc", 0.002)
        remote(0)
        measure("cluster (grpc, expert wait 2 ms), 16 concurrent, continuous batching off", 16)

        # hot-add: a copy of an expert under a new name, then the first request pinned to it
        src = model / "experts" / "digits-8-9"
        dst = model / "experts" / "digits-8-9-b"
        shutil.copytree(src, dst)
        card = json.loads((dst / "expert.json").read_text())
        card["name"] = "digits-8-9-b"
        (dst / "expert.json").write_text(json.dumps(card))
        t0 = time.perf_counter()
        r = client.post(
            f"{url}/v1/experts", json={"path": "digits-8-9-b"}, headers={"Authorization": f"Bearer {token}"}
        )
        r.raise_for_status()
        add_s = time.perf_counter() - t0
        r = client.post(
            f"{url}/v1/generate",
            json={
                "prompt": 8,
                "num_images": 1,
                "seed": 0,
                "steps": args.steps,
                "experts": ["digits-8-9-b"],
                "output": "json",
            },
        )
        r.raise_for_status()
        first_s = time.perf_counter() - t0
        assert any("digits-8-9-b" in row for s in r.json()["trace"] for row in s["experts"])
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    by = {r["name"]: r for r in rows}

    def best_local(c: int) -> float:
        return max(r["images_per_s"] for r in rows if r["name"].startswith(f"in-process, {c} concurrent"))

    ratios = {}
    configs = sorted({r["name"].rsplit(", ", 1)[0] for r in rows if r["name"].startswith("cluster (")})
    for config in configs:
        one, sixteen = by.get(f"{config}, 1 concurrent"), by.get(f"{config}, 16 concurrent")
        if one is None or sixteen is None:
            continue
        ratios[f"{config}: vs best in-process, 1 concurrent"] = round(one["images_per_s"] / best_local(1), 3)
        ratios[f"{config}: vs best in-process, 16 concurrent"] = round(
            sixteen["images_per_s"] / best_local(16), 3
        )
        ratios[f"{config}: at 16 vs one in-process batch of 16"] = round(sixteen["images_per_s"] / ideal, 3)
    base = "cluster (grpc, expert wait 2 ms)"
    ratios["continuous batching on vs off, 16 concurrent (grpc)"] = round(
        by[f"{base}, 16 concurrent"]["images_per_s"]
        / by[f"{base}, 16 concurrent, continuous batching off"]["images_per_s"],
        3,
    )
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, no GPU",
        "steps": args.steps,
        "sampler": "heun",
        "images_per_request": args.images,
        "requests": args.requests,
        "guidance_scale": bundle.config.guidance_scale,
        "top_k": bundle.config.top_k,
        "cluster_start_s": round(start_s, 1),
        "hot_add_s": round(add_s, 2),
        "hot_add_to_first_routed_request_s": round(first_s, 2),
        "ideal_in_process_one_batch_of_16_images_per_s": round(ideal, 3),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "cluster.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "ratios": ratios, "breakdown_p50_ms": breakdown}, indent=2)
        + "\n"
    )
    lines = ["| configuration | images/s | p50 s | p95 s |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['images_per_s']} | {r['p50_s']} | {r['p95_s']} |" for r in rows]
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in ratios.items()]
    phases = list(next(iter(breakdown.values())))
    lines += ["", "Per-tick breakdown, p50 over the ticks of each configuration (ms):", ""]
    lines += ["| configuration | " + " | ".join(p.removesuffix("_ms") for p in phases) + " |"]
    lines += ["|---|" + "---|" * len(phases)]
    lines += [f"| {name} | " + " | ".join(str(b[p]) for p in phases) + " |" for name, b in breakdown.items()]
    lines += ["", "| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in meta.items()]
    (OUT / "cluster.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

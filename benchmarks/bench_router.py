"""The router's own ceiling: one router replica driving emulated GPU experts (fixed latency, cheap output;
`ExpertDeployment.emulate`), so the numbers are the router's and the transport's, not CPU convolutions.

    .venv/bin/python benchmarks/bench_router.py [--experts 4 16] [--concurrency 1 16 64] [--transports grpc handle direct]

Per configuration: one-image requests (heun 18 steps = 35 evaluations, guidance 2, top-2), and from the
engine's counters and the per-tick breakdown: ticks/s, rows/s, images/s, each expert's busy fraction
(reported forward time / wall), the router overhead per tick (wall - slowest expert). Writes
benchmarks/results/router.{md,json}. Not a test: run by hand.
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
import psutil
from local_serve import start_ray_serve

from mode_ray.cli import DEFAULT_MODEL
from mode_ray.generation.bundle import GateSpec, MixtureConfig

OUT = Path(__file__).resolve().parent / "results"


def make_mixture(root: Path, n: int) -> Path:
    """n copies of a shipped expert under new names, each holding one or more digits (prototype gate)."""
    model = root / f"emulated-{n}"
    for i in range(n):
        dst = model / "experts" / f"emu-{i}"
        shutil.copytree(DEFAULT_MODEL / "experts" / "digits-0-6", dst)
        card = json.loads((dst / "expert.json").read_text())
        proto = [1.0 if d % n == i % 10 or (n > 10 and d == i % 10) else 0.0 for d in range(10)]
        card.update(name=f"emu-{i}", prototype=[v / max(1.0, sum(proto)) for v in proto])
        (dst / "expert.json").write_text(json.dumps(card))
    config = MixtureConfig(
        name=model.name, experts=[f"emu-{i}" for i in range(n)], gate=GateSpec(learned=None), top_k=2
    )
    (model / "mixture.json").write_text(config.model_dump_json(indent=2))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--transports", nargs="+", default=["grpc", "handle", "direct"])
    ap.add_argument("--cohorts", type=int, nargs="+", default=[1], help="router.cohorts values to compare")
    ap.add_argument(
        "--offload", nargs="+", default=["on"], choices=["on", "off"], help="router.offload values to compare"
    )
    ap.add_argument("--router-replicas", type=int, nargs="+", default=[1], help="router.num_replicas values")
    ap.add_argument("--out", default="router", help="results file stem under benchmarks/results/")
    ap.add_argument("--requests", type=int, default=32, help="at least this many, and 2x the concurrency")
    ap.add_argument("--base-ms", type=float, default=2.0)
    ap.add_argument("--per-row-ms", type=float, default=0.01)
    ap.add_argument(
        "--idle-s",
        type=float,
        default=10.0,
        help="seconds to measure the machine's CPU with no request running",
    )
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = Path(__file__).resolve().parents[1]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    import ray
    from ray import serve

    from mode_ray.serve.app import build_app
    from mode_ray.serve.config import APP_NAME, AppArgs

    work = Path(tempfile.mkdtemp(prefix="mode-ray-router-bench-"))
    http_port, grpc_port = start_ray_serve()
    url = f"http://127.0.0.1:{http_port}"
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=128))
    rows: list[dict] = []
    ticks: list[dict] = []  # the per-tick breakdown of every evaluation of the current configuration

    def one(i: int) -> None:
        body = {"prompt": i % 10, "num_images": 1, "seed": i, "output": "json", "timing": True}
        r = client.post(f"{url}/v1/generate", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"request {i}: {r.status_code} {r.text[:300]}")
        ticks.extend(r.json()["timing"])

    try:
        for n in args.experts:
            model = make_mixture(work, n)
            settings = [
                (t, c, o, r)
                for t in args.transports
                for c in args.cohorts
                for o in args.offload
                for r in args.router_replicas
            ]
            for transport, cohorts, offload, replicas in settings:
                serve.run(
                    build_app(
                        AppArgs(
                            model_dir=model,
                            state_dir=work / f"state-{n}",
                            restore=False,
                            grpc_target=f"127.0.0.1:{grpc_port}",
                            expert={
                                "num_cpus": 0.01,
                                "max_replicas": 1,
                                "emulate": {"base_ms": args.base_ms, "per_row_ms": args.per_row_ms},
                            },
                            router={
                                "num_cpus": 0.5,
                                "transport": transport,
                                "max_active_requests": 128,
                                "cohorts": cohorts,
                                "offload": offload == "on",
                                "num_replicas": replicas,
                            },
                        )
                    ),
                    name=APP_NAME,
                    route_prefix="/",
                )
                router = serve.get_deployment_handle("Router", APP_NAME)
                one(0)
                # what the deployed processes cost with nothing to do (Serve's and Ray's background loops):
                # the cores a many-experts cluster has left for the requests
                idle_cores = psutil.cpu_percent(interval=args.idle_s) / 100 * psutil.cpu_count()
                for c in args.concurrency:
                    ticks.clear()
                    count = max(args.requests, 2 * c)
                    before = router.engine_stats.remote().result()
                    calls_before = router.transport_stats.remote().result()
                    t0 = time.perf_counter()
                    with ThreadPoolExecutor(c) as pool:
                        list(pool.map(one, range(count)))
                    wall = time.perf_counter() - t0
                    after = router.engine_stats.remote().result()
                    calls_after = router.transport_stats.remote().result()
                    span = after["at"] - before["at"]
                    busy = [
                        (after["expert_busy_s"].get(k, 0.0) - before["expert_busy_s"].get(k, 0.0)) / span
                        for k in after["expert_busy_s"]
                    ]
                    unique = {t["tick"]: t for t in ticks}.values()
                    one_engine = replicas == 1  # engine_stats answers from one replica: counters only then

                    def counter(key: str, after=after, before=before, span=span, one_engine=one_engine):  # noqa: ANN001, ANN202
                        return round((after[key] - before[key]) / span, 1) if one_engine else None

                    rows.append(
                        {
                            "experts": n,
                            "transport": transport,
                            "cohorts": cohorts,
                            "offload": offload,
                            "router_replicas": replicas,
                            "concurrency": c,
                            "requests": count,
                            "idle_cores_busy": round(idle_cores, 2),
                            "images_per_s": round(count / wall, 2),
                            "ticks_per_s": counter("ticks"),
                            "rows_per_s": counter("rows"),
                            "busy_mean": round(statistics.mean(busy), 3) if one_engine else None,
                            "busy_min": round(min(busy), 3) if one_engine else None,
                            "overhead_p50_ms": round(statistics.median(t["overhead_ms"] for t in unique), 3),
                            "tick_wall_p50_ms": round(statistics.median(t["wall_ms"] for t in unique), 3),
                            "expert_p50_ms": round(statistics.median(t["expert_ms"] for t in unique), 3),
                            # direct transport: calls that went through the handle (no published port yet)
                            "handle_fallbacks": sum(
                                s["calls"].get("handle", 0)
                                - calls_before.get(app, {}).get("calls", {}).get("handle", 0)
                                for app, s in calls_after.items()
                            ),
                            **{
                                f"{phase}_p50_ms": round(
                                    statistics.median(t[f"{phase}_ms"] for t in unique), 3
                                )
                                for phase in ("gate", "plan", "wire", "combine")
                            },
                        }
                    )
                    print(rows[-1], flush=True)
                serve.delete(APP_NAME)
                for i in range(n):
                    serve.delete(f"expert-emu-{i}")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "emulated_expert": f"{args.base_ms} ms + {args.per_row_ms} ms/row",
        "requests": "one image each, heun 18 steps (35 evaluations), guidance 2, top-2, prototype + noise gate",
    }
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    keys = list(rows[0])
    lines = [f"Emulated GPU experts ({meta['emulated_expert']}); {meta['requests']}; {meta['machine']}", ""]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    (OUT / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

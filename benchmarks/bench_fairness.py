"""Fairness of the step engine: a 1-image request's latency with a maximum-size request in flight, against its
latency alone, for several tick row budgets and lane sizes, in one run on the shipped model.

    python benchmarks/bench_fairness.py [--steps 18] [--repeats 3]

Per configuration (router `tick_rows`, `lane_images`, `max_tick_rows`): the median latency of a 1-image and of
a 4-image (the default) request alone; the images/s of a 64-image request alone (what the configuration costs
a large request); the same small requests' latency while a 256-image x 1000-step request is in flight (the
largest the API admits); then how long after the large request's client disconnects the engine has dropped
it. `64:2:64` is the scheduler without protection of small requests (every tick up to 64 rows, round-robin). Writes
benchmarks/results/fairness.{md,json}. Not a test: run by hand; ratios are what carries between machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from local_serve import start_ray_serve

from mode_ray.cli import DEFAULT_MODEL

OUT = Path(__file__).resolve().parent / "results"


def open_large_request(port: int, body: dict) -> socket.socket:
    """POST /v1/generate on a raw socket, so the benchmark can disconnect mid-request (close the socket)."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    sock.sendall(head + payload)
    return sock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=18, help="sampler steps (heun) of the small requests")
    ap.add_argument("--repeats", type=int, default=3, help="small requests per measurement (median)")
    ap.add_argument("--expert-cpus", type=float, default=0.25, help="logical CPUs per expert replica")
    ap.add_argument(
        "--configs",
        default="8:2:64,64:2:64",
        help="tick_rows:lane_images:max_tick_rows, comma-separated (the first is the shipped default)",
    )
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = Path(__file__).resolve().parents[1]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    work = Path(tempfile.mkdtemp(prefix="mode-ray-fair-"))
    model = work / "mnist"
    shutil.copytree(DEFAULT_MODEL, model)

    from ray import serve

    from mode_ray.serve.app import build_app
    from mode_ray.serve.config import APP_NAME, AppArgs

    http_port, grpc_port = start_ray_serve()
    url = f"http://127.0.0.1:{http_port}"
    client = httpx.Client(timeout=900)

    def deploy(tick_rows: int, lane_images: int, max_tick_rows: int) -> None:
        a = AppArgs(
            model_dir=model,
            state_dir=work / "state",
            grpc_target=f"127.0.0.1:{grpc_port}",
            expert={"num_cpus": args.expert_cpus, "max_replicas": 1},
            router={
                "num_cpus": 0.25,
                "tick_rows": tick_rows,
                "lane_images": lane_images,
                "max_tick_rows": max_tick_rows,
            },
        )
        serve.run(build_app(a), name=APP_NAME, route_prefix="/")

    def stats() -> dict:
        return serve.get_deployment_handle("Router", app_name=APP_NAME).engine_stats.remote().result()

    def small(i: int, images: int = 1) -> float:
        body = {"prompt": i % 10, "num_images": images, "seed": i, "steps": args.steps, "output": "json"}
        t0 = time.perf_counter()
        client.post(f"{url}/v1/generate", json=body).raise_for_status()
        return time.perf_counter() - t0

    rows = []
    try:
        for config in args.configs.split(","):
            tick_rows, lane_images, max_tick_rows = (int(v) for v in config.split(":"))
            deploy(tick_rows, lane_images, max_tick_rows)
            small(0)  # warm-up
            alone = statistics.median(small(i) for i in range(args.repeats))
            alone4 = statistics.median(small(i, 4) for i in range(args.repeats))
            t0 = time.perf_counter()
            body = {"prompt": 3, "num_images": 64, "seed": 0, "steps": args.steps, "output": "json"}
            client.post(f"{url}/v1/generate", json=body).raise_for_status()
            big_alone = 64 / (time.perf_counter() - t0)
            large = {"prompt": 5, "num_images": 256, "steps": 1000, "seed": 1, "deadline_s": 3600}
            sock = open_large_request(http_port, large)
            while stats()["active"] < 1:  # the large request is stepping
                time.sleep(0.05)
            time.sleep(1.0)  # well into its lanes
            beside = statistics.median(small(i) for i in range(1, args.repeats + 1))
            beside4 = statistics.median(small(i, 4) for i in range(1, args.repeats + 1))
            still = stats()["active"]
            sock.close()  # the client goes away
            t0 = time.perf_counter()
            while stats()["active"] > 0:
                time.sleep(0.01)
            cancel_s = time.perf_counter() - t0
            rows.append(
                {
                    "tick_rows": tick_rows,
                    "lane_images": lane_images,
                    "max_tick_rows": max_tick_rows,
                    "small_alone_s": round(alone, 3),
                    "small_beside_max_s": round(beside, 3),
                    "ratio": round(beside / alone, 2),
                    "four_alone_s": round(alone4, 3),
                    "four_beside_max_s": round(beside4, 3),
                    "ratio_four": round(beside4 / alone4, 2),
                    "large_in_flight_throughout": still >= 1,
                    "large_alone_images_per_s": round(big_alone, 2),
                    "disconnect_to_dropped_s": round(cancel_s, 3),
                }
            )
            print(rows[-1], flush=True)
    finally:
        client.close()
        serve.shutdown()

    OUT.mkdir(exist_ok=True)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "steps": args.steps,
    }
    (OUT / "fairness.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"Fairness, shipped model, heun {args.steps} steps, latency medians of {args.repeats} sequential "
        f"requests, {os.cpu_count()} CPUs; the max request: 256 images x 1000 steps, in flight throughout",
        "",
        "| tick_rows:lane_images:max_tick_rows | 1 image alone (s) | beside the max request (s) | ratio | "
        "4 images alone (s) | beside (s) | ratio | 64 images alone (img/s) | disconnect -> dropped (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tick_rows']}:{r['lane_images']}:{r['max_tick_rows']} | {r['small_alone_s']} | "
            f"{r['small_beside_max_s']} | {r['ratio']} | {r['four_alone_s']} | {r['four_beside_max_s']} | "
            f"{r['ratio_four']} | {r['large_alone_images_per_s']} | {r['disconnect_to_dropped_s']} |"
        )
    (OUT / "fairness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

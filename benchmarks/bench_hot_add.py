"""Hot-add timings on the shipped model: into a warm replica against starting a new one, side by side.

    python benchmarks/bench_hot_add.py [--rounds 3]

Writes benchmarks/results/hot-add.{md,json}. Not a test: run by hand; numbers depend on the machine.
Each round adds a copy of an expert under a new name three ways, then removes it:
  warm  POST /v1/experts {"path"}: takes the free warm application (warm_pool 1), loads the weights there;
  cold  the same with an explicit "deployment" (the default's values): a new Serve application and replica;
  CLI   `mode-ray experts add` in a fresh process (what a user types), warm.
For each: the seconds from the POST (or the command) to the reply, and to the first request pinned to the new
expert answering; for warm adds also how long the pool took to refill (a replica start, in the background).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from local_serve import start_ray_serve

from mode_ray.cli import DEFAULT_MODEL

OUT = Path(__file__).resolve().parent / "results"
EXPERT = {"num_cpus": 0.25, "max_replicas": 1}


def copy_expert(model: Path, name: str) -> None:
    src, dst = model / "experts" / "digits-8-9", model / "experts" / name
    shutil.copytree(src, dst)
    card = json.loads((dst / "expert.json").read_text())
    (dst / "expert.json").write_text(json.dumps({**card, "name": name}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["MODE_RAY_ADMIN_TOKEN"] = token = "bench-token"
    root = Path(__file__).resolve().parents[1]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    work = Path(tempfile.mkdtemp(prefix="mode-ray-hot-add-"))
    model = work / "mnist"
    shutil.copytree(DEFAULT_MODEL, model)

    import ray
    from ray import serve

    from mode_ray.serve.app import build_app
    from mode_ray.serve.config import APP_NAME, AppArgs

    http_port, grpc_port = start_ray_serve()
    url = f"http://127.0.0.1:{http_port}"
    auth = {"Authorization": f"Bearer {token}"}
    client = httpx.Client(timeout=600)
    a = AppArgs(
        model_dir=model,
        state_dir=work / "state",
        grpc_target=f"127.0.0.1:{grpc_port}",
        warm_pool=1,
        expert=EXPERT,
        router={"num_cpus": 0.25},
    )

    def free() -> list[str]:
        return client.get(f"{url}/v1/experts").json()["warm_pool"]["free"]

    def wait_free() -> float:
        t0 = time.perf_counter()
        while not free():
            time.sleep(0.05)
        return time.perf_counter() - t0

    def first_request(name: str) -> None:
        body = {"prompt": 8, "num_images": 1, "seed": 0, "steps": 4, "experts": [name], "output": "json"}
        r = client.post(f"{url}/v1/generate", json=body)
        r.raise_for_status()
        assert r.json()["trace"][0]["experts"] == [[name]]

    def add(name: str, how: str) -> dict:
        copy_expert(model, name)
        t0 = time.perf_counter()
        if how == "cli":
            cmd = [
                sys.executable,
                "-m",
                "mode_ray.cli",
                "experts",
                "add",
                name,
                "--url",
                url,
                "--token",
                token,
            ]
            subprocess.run(cmd, check=True, capture_output=True)
        else:
            body = {"path": name} if how == "warm" else {"path": name, "deployment": EXPERT}
            client.post(f"{url}/v1/experts", json=body, headers=auth).raise_for_status()
        replied = time.perf_counter() - t0
        first_request(name)
        routed = time.perf_counter() - t0
        app = next(
            e["application"] for e in client.get(f"{url}/v1/experts").json()["experts"] if e["name"] == name
        )
        return {
            "how": how,
            "reply_s": round(replied, 3),
            "first_routed_s": round(routed, 3),
            "application": app,
        }

    rows: list[dict] = []
    try:
        t0 = time.perf_counter()
        serve.run(build_app(a), name=APP_NAME, route_prefix="/")
        start_s = time.perf_counter() - t0
        pool_s = wait_free()
        for i in range(args.rounds):
            for how in ("warm", "cold", "cli"):
                name = f"copy-{how}-{i}"
                row = add(name, how)
                if how != "cold":
                    assert row["application"].startswith("expert-pool-"), row
                    row["pool_refill_s"] = round(wait_free(), 2)
                rows.append(row)
                client.delete(f"{url}/v1/experts/{name}", headers=auth).raise_for_status()
                print(row, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    def med(how: str, key: str) -> float:
        return round(statistics.median(r[key] for r in rows if r["how"] == how and key in r), 3)

    summary = {
        f"{how}: {key}": med(how, key)
        for how in ("warm", "cold", "cli")
        for key in ("reply_s", "first_routed_s", "pool_refill_s")
        if any(key in r for r in rows if r["how"] == how)
    }
    summary["cold / warm, POST to first routed request"] = round(
        med("cold", "first_routed_s") / med("warm", "first_routed_s"), 2
    )
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "rounds": args.rounds,
        "expert": EXPERT,
        "cluster_start_s": round(start_s, 1),
        "first_pool_fill_after_start_s": round(pool_s, 2),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "hot-add.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2) + "\n"
    )
    lines = ["| add | reply s | first routed s | pool refill s | application |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['how']} | {r['reply_s']} | {r['first_routed_s']} | {r.get('pool_refill_s', '')} | {r['application']} |"
        for r in rows
    ]
    lines += ["", "| median | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", "| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in meta.items()]
    (OUT / "hot-add.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

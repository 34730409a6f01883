"""ModelInfer latency of one expert, through the Serve gRPC proxy, straight to the Serve replica's own port
(the router's `direct` transport) and to a plain OIP server (mode_ray.serve.standalone), side by side in one
run; then the same two Serve paths with a zero-latency emulated expert, which leaves the transport alone. Moved here from the tests: timings are measured by
hand, never asserted.

    .venv/bin/python benchmarks/bench_model_infer.py [--calls 200] [--out benchmarks/results/model_infer.md]

Writes a markdown table (median / p90 ms for B = 1 and 32 rows) and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from local_serve import free_port

from mode_ray.diffusion import EDMPrecond
from mode_ray.models import ExpertCard, save_expert
from mode_ray.models.unet import UNET_PRESETS, UNet
from mode_ray.proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from mode_ray.serve.oip import encode_infer_request

ROOT = Path(__file__).resolve().parents[1]


def make_expert(path: Path, preset: str) -> Path:
    torch.manual_seed(0)
    config = UNET_PRESETS[preset]
    card = ExpertCard(name="probe", backbone_config=config.to_dict(), latent_shape=(1, 28, 28))
    return save_expert(path, card, EDMPrecond(UNet(config)))


async def measure(target: str, metadata: tuple, rows: int, calls: int) -> list[float]:
    rng = np.random.default_rng(0)
    inputs = {
        "x": rng.standard_normal((rows, 1, 28, 28)).astype(np.float32),
        "sigma": np.full(rows, 1.0, np.float32),
        "cond": np.eye(10, dtype=np.float32)[rng.integers(0, 10, rows)],
    }
    req = encode_infer_request("probe", inputs, request_id="lat")
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(10):
            await stub.ModelInfer(req, metadata=metadata, timeout=30)
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await stub.ModelInfer(req, metadata=metadata, timeout=30)
            samples.append(time.perf_counter() - t0)
    return sorted(samples)


def row(name: str, rows: int, samples: list[float]) -> str:
    med, p90 = statistics.median(samples) * 1e3, samples[int(0.9 * len(samples))] * 1e3
    return f"| {name} | {rows} | {med:.2f} | {p90:.2f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--preset", default="s", help="UNet preset of the probe expert")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "model_infer.md")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from mode_ray.serve.config import GRPC_SERVICER_FUNCTIONS, ExpertDeployment
    from mode_ray.serve.deploy import deploy_expert
    from mode_ray.serve.direct import published
    from mode_ray.serve.standalone import serve_expert

    lines = [
        f"ModelInfer latency, {args.calls} sequential calls after 10 warm-up, expert preset {args.preset!r}, "
        f"{os.cpu_count()} CPUs (ms)\n",
        "| path | rows | median | p90 |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        expert = make_expert(Path(tmp) / "probe", args.preset)

        async def standalone() -> list[str]:
            server, port = await serve_expert(str(expert), port=0)
            try:
                return [
                    row("plain OIP server (no Ray)", b, await measure(f"127.0.0.1:{port}", (), b, args.calls))
                    for b in (1, 32)
                ]
            finally:
                await server.stop(0)

        lines += asyncio.run(standalone())
        grpc_port = free_port()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        serve.start(grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
        try:
            md = (("application", "expert-probe"),)
            for label, emulate in (("", None), (", emulated 0 ms expert", {"base_ms": 0, "per_row_ms": 0})):
                deploy_expert(
                    expert,
                    ExpertDeployment(num_cpus=1, max_replicas=1, direct_host="127.0.0.1", emulate=emulate),
                )
                for _ in range(100):  # the replica publishes its own port once it holds the expert
                    if published("expert-probe"):
                        break
                    time.sleep(0.1)
                (own,) = published("expert-probe")
                for b in (1, 32):
                    samples = asyncio.run(measure(f"127.0.0.1:{grpc_port}", md, b, args.calls))
                    lines.append(row(f"Serve gRPC proxy -> replica{label}", b, samples))
                    lines.append(
                        row(
                            f"replica's own port (direct){label}",
                            b,
                            asyncio.run(measure(own, (), b, args.calls)),
                        )
                    )
                serve.delete("expert-probe")
        finally:
            serve.shutdown()
            ray.shutdown()
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""GPU check of the engine (no Ray on the device image): the shipped mixture on CUDA equals the CPU result,
and how fast experts and the in-process mixture run on the card. Writes $OUT/gpu.json (or ./gpu.json).

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mode_ray.cli import DEFAULT_MODEL  # noqa: E402
from mode_ray.diffusion import EDMPrecond, edm_loss, sample_training_sigmas  # noqa: E402
from mode_ray.generation import GenerateParams, generate_local, load_bundle  # noqa: E402
from mode_ray.models.unet import UNET_PRESETS, UNet  # noqa: E402


def timed(fn, repeats: int = 5) -> float:  # noqa: ANN001
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    torch.backends.cudnn.allow_tf32 = False  # exactness check first, in true fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    cpu = load_bundle(DEFAULT_MODEL, "cpu")
    gpu = load_bundle(DEFAULT_MODEL, "cuda")
    p = GenerateParams(prompt=7, num_images=16, seed=0)
    a = generate_local(cpu.mixture, cpu.config, p).images
    b = generate_local(gpu.mixture, gpu.config, p).images
    out["cuda_vs_cpu_max_abs_diff_16_images"] = float((a - b).abs().max())

    rows = {}
    for n in (1, 16, 64, 256):
        params = GenerateParams(prompt=3, num_images=n, seed=1)
        s = timed(lambda params=params: generate_local(gpu.mixture, gpu.config, params), 3)
        rows[n] = {"seconds": round(s, 4), "images_per_s": round(n / s, 1)}
    out["in_process_mixture_heun18_top2_cfg"] = rows

    expert = gpu.mixture.denoisers[0]
    fwd = {}
    for dtype in (torch.float32, torch.bfloat16):
        for n in (64, 1024, 8192):
            x, sigma, cond = (
                torch.randn(n, 1, 28, 28, device="cuda"),
                torch.rand(n, device="cuda") + 0.1,
                None,
            )

            def call(x=x, sigma=sigma, cond=cond, dtype=dtype) -> None:
                with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                    expert(x, sigma, cond)

            fwd[f"{str(dtype).removeprefix('torch.')}_rows_{n}"] = round(n / timed(call), 1)
    out["expert_forward_rows_per_s"] = fwd

    torch.backends.cudnn.allow_tf32 = True
    train = {}
    for preset in ("s", "l"):
        model = EDMPrecond(UNet(UNET_PRESETS[preset])).cuda()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x0 = torch.randn(256, 1, 28, 28, device="cuda")
        cond = torch.zeros(256, 10, device="cuda")

        def step(model=model, opt=opt, x0=x0, cond=cond) -> None:
            loss = edm_loss(
                model, x0, sample_training_sigmas(256, device="cuda"), cond, torch.randn_like(x0)
            ).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        s = timed(step, 20)
        train[preset] = {
            "params": sum(p.numel() for p in model.parameters()),
            "steps_per_s_batch256": round(1 / s, 1),
        }
    out["train_step"] = train
    dest = Path(os.environ.get("OUT", ".")) / "gpu.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

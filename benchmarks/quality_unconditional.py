"""Do the mixture's unconditional samples follow the data, and if not, is it the gate, the experts or top-k?

    python benchmarks/quality_unconditional.py [--model mnist] [--num-samples 2000] [--dense mnist-dense-s]
        [--sampler heun --steps 18] [--out DIR]

Writes benchmarks/results/quality/unconditional.{md,json} and gate-reliability.png. Not a test: run by hand.
Samples the shipped mixture unconditionally with its learned gate (top-2 as shipped, and every expert), with
the *empirical posterior* of the training set as the gate (mode_ray.train.unconditional: the exact
p(k | x, sigma) a perfect gate would output), each expert alone, and class-conditionally for the FID ratio;
judges every set with the project's classifier (class shares, chi-square against the data's shares,
ambiguous share, classifier-FID), and measures the learned gate's calibration per sigma bucket. `--dense`
samples a dense baseline the same two ways, to tell a mixture's skew from the null condition's.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mode_ray.cli import DEFAULT_MODEL, model_dir
from mode_ray.generation import load_bundle
from mode_ray.generation.bundle import build_gate
from mode_ray.train.classifier import load_classifier
from mode_ray.train.data import load_mnist
from mode_ray.train.evaluate import prompt_for
from mode_ray.train.unconditional import empirical_gate, gate_calibration, sample, share_report

OUT = Path(__file__).resolve().parent / "results" / "quality"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mnist")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument(
        "--expert-samples", type=int, default=300, help="unconditional samples of each expert alone"
    )
    p.add_argument("--calibration-n", type=int, default=1000, help="0 skips the gate calibration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--configs",
        default="prior,learned-top2,learned-all,posterior-top2,posterior-all,experts,conditional",
    )
    p.add_argument(
        "--gate",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another learned gate (e.g. from `mode-ray train gate --out`), sampled at top-k (and with every expert "
        "when --configs has gates-all)",
    )
    p.add_argument(
        "--dense",
        action="append",
        default=[],
        metavar="DIR",
        help="a dense baseline (e.g. mnist-dense-s), sampled unconditionally and class-conditionally",
    )
    p.add_argument(
        "--sampler", default=None, help="override the mixture's sampler (heun, euler, dpmpp_2m, ...)"
    )
    p.add_argument("--steps", type=int, default=None, help="override the mixture's number of steps")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    configs = a.configs.split(",")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bundle = load_bundle(model_dir(Path(a.model)))
    judge = load_classifier(DEFAULT_MODEL / "classifier")
    train, test = load_mnist("train"), load_mnist("test")
    posterior = empirical_gate(bundle, train)
    learned = bundle.mixture.gate
    names = [c.name for c in bundle.mixture.cards]
    n_exp = len(names)
    reports, started = [], time.time()

    def run(  # noqa: ANN202
        name: str,
        gate,  # noqa: ANN001
        top_k: int | None,
        prompt=None,  # noqa: ANN001
        pin=None,  # noqa: ANN001
        n=a.num_samples,  # noqa: ANN001
        model=bundle,  # noqa: ANN001
        unconditional="null",  # noqa: ANN001
    ):
        model.mixture.gate = gate
        t0 = time.time()
        schedule = {"steps": a.steps, "sampler": a.sampler}
        if prompt == "each":  # class-conditional: n / C images of every class
            per = n // len(train.class_names)
            parts = [
                sample(model, per, prompt=prompt_for(model, c), top_k=top_k, seed=a.seed + c, **schedule)
                for c in range(len(train.class_names))
            ]
            images = torch.cat([x for x, _, _ in parts])
            weight = {
                k: round(sum(w.get(k, 0.0) for _, w, _ in parts) / len(parts), 4)
                for k in [c.name for c in model.mixture.cards]
            }
            spi = sum(s for _, _, s in parts) / len(parts)
        else:
            images, weight, spi = sample(
                model, n, top_k=top_k, seed=a.seed, experts=pin, unconditional=unconditional, **schedule
            )
        r = share_report(name, images, judge, train, test, weight, spi)
        reports.append(r)
        print(
            f"{name}: max gap {100 * r.max_gap:.1f} pt, chi2 {r.chi2} (p {r.p_value}), ambiguous "
            f"{100 * r.ambiguous:.1f}%, FID {r.fid}, {time.time() - t0:.0f}s",
            flush=True,
        )

    if "prior" in configs:
        run(
            f"class prior c ~ p(c), learned gate, top-{bundle.config.top_k}",
            learned,
            None,
            unconditional="prior",
        )
    if "learned-top2" in configs:
        run(f"null condition, learned gate, top-{bundle.config.top_k}", learned, None)
    if "learned-all" in configs:
        run(f"learned gate, top-{n_exp}", learned, n_exp)
    if "posterior-top2" in configs:
        run(f"empirical posterior gate, top-{bundle.config.top_k}", posterior, None)
    if "posterior-all" in configs:
        run(f"empirical posterior gate, top-{n_exp}", posterior, n_exp)
    others = {}
    for spec in a.gate:
        label, _, path = spec.partition("=")
        others[label] = build_gate(bundle.config.gate, bundle.path, Path(path))
        run(f"gate {label}, top-{bundle.config.top_k}", others[label], None)
        if "gates-all" in configs:
            run(f"gate {label}, top-{n_exp}", others[label], n_exp)
    if "conditional" in configs:
        run(f"class-conditional, learned gate, top-{bundle.config.top_k}", learned, None, prompt="each")
    if "experts" in configs:
        for name in names:
            run(f"expert {name} alone", learned, None, pin=[name], n=a.expert_samples)
    for path in a.dense:
        dense = load_bundle(model_dir(Path(path)))
        run(f"dense {Path(path).name}, null condition", dense.mixture.gate, None, model=dense)
        if "prior" in configs:
            run(
                f"dense {Path(path).name}, class prior",
                dense.mixture.gate,
                None,
                model=dense,
                unconditional="prior",
            )
        run(
            f"dense {Path(path).name}, class-conditional",
            dense.mixture.gate,
            None,
            prompt="each",
            model=dense,
        )
    calibration = {}
    if a.calibration_n > 0:
        for label, gate in [("shipped", learned), *others.items()]:
            bundle.mixture.gate = gate
            calibration[label] = gate_calibration(bundle, test, posterior, n=a.calibration_n, seed=a.seed)
    bundle.mixture.gate = learned
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": a.model,
        "num_samples": a.num_samples,
        "sampler": a.sampler or bundle.config.sampler,
        "steps": a.steps or bundle.config.steps,
        "experts": names,
        "torch_threads": torch.get_num_threads(),
        "minutes": round((time.time() - started) / 60, 1),
    }
    (a.out / "unconditional.json").write_text(
        json.dumps(
            {"meta": meta, "samples": [asdict(r) for r in reports], "gate_calibration": calibration}, indent=2
        )
        + "\n"
    )
    (a.out / "unconditional.md").write_text(markdown(reports, calibration, names, meta))
    if calibration:
        plot(calibration, a.out / "gate-reliability.png")
    print(f"wrote {a.out / 'unconditional.md'}")


def markdown(reports, calibration, names, meta) -> str:  # noqa: ANN001
    classes = len(reports[0].data_shares)
    head = ["samples", "n", "max gap (pt)", "chi2 (p)", "ambiguous", "FID", *[f"{c}" for c in range(classes)]]
    lines = [
        "# Unconditional samples against the data",
        "",
        "Class shares (%) judged by the project's classifier; the data row is the training set's. "
        f"{meta['sampler']} {meta['steps']} steps.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        "| data | 60000 | | | | | " + " | ".join(f"{100 * s:.1f}" for s in reports[0].data_shares) + " |",
    ]
    for r in reports:
        lines.append(
            f"| {r.name} | {r.num_samples} | {100 * r.max_gap:.1f} | {r.chi2:.1f} ({r.p_value:.2g}) | "
            f"{100 * r.ambiguous:.1f}% | {r.fid:.2f} | "
            + " | ".join(f"{100 * s:.1f}" for s in r.shares)
            + " |"
        )
    lines += ["", "Mean routing weight per expert:", ""]
    lines += [f"- {r.name}: {r.expert_weight}" for r in reports]
    lines += [
        "",
        "# The learned gate at the null condition, per sigma bucket (held-out test images)",
        "",
        f"Experts {names}. accuracy: argmax = the image's expert; ECE: 10 confidence bins; TV: mean total variation "
        "to the empirical posterior of the training set, whose own accuracy is the best any gate can do.",
        "",
        "| gate | sigma | gate accuracy | posterior accuracy | ECE | TV to posterior | mean gate p(k) | "
        "mean posterior p(k) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, buckets in calibration.items():
        for bucket, c in buckets.items():
            lines.append(
                f"| {label} | {bucket} | {c['accuracy']:.3f} | {c['posterior_accuracy']:.3f} | {c['ece']:.3f} | "
                f"{c['tv_to_posterior']:.3f} | {c['mean_gate']} | {c['mean_posterior']} |"
            )
    lines += ["", *[f"- {k}: {v}" for k, v in meta.items()], ""]
    return "\n".join(lines)


def plot(calibration: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = list(next(iter(calibration.values())))
    fig, axes = plt.subplots(1, len(buckets), figsize=(3.2 * len(buckets), 3.6), sharey=True)
    for ax, bucket in zip(axes, buckets, strict=True):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for label, gate in calibration.items():
            c = gate[bucket]
            conf = [b["confidence"] for b in c["reliability"]]
            acc = [b["accuracy"] for b in c["reliability"]]
            ax.plot(
                conf, acc, marker="o", ms=3, label=f"{label}: acc {c['accuracy']:.2f}, ECE {c['ece']:.3f}"
            )
        best = next(iter(calibration.values()))[bucket]["posterior_accuracy"]
        ax.set_title(f"σ ∈ {bucket} (best acc {best:.2f})", fontsize=9)
        ax.set_xlabel("gate confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6, loc="upper left")
    axes[0].set_ylabel("accuracy (held-out)")
    fig.suptitle("learned gate reliability at the null condition", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

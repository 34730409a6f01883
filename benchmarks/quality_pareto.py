"""Does specialisation beat a dense model at equal compute? FID against inference FLOPs per image, with intervals.

    python benchmarks/quality_pareto.py                      # every configuration, then the chart
    python benchmarks/quality_pareto.py --only dense-s,top-1 # some of them (results are kept per configuration)
    python benchmarks/quality_pareto.py --plot-only          # redraw the chart and the table from kept results
    python benchmarks/quality_pareto.py --settings-from benchmarks/results/quality --test-n 5000 --only top-1 \
        --out benchmarks/results/quality/pareto-n5000        # the same settings, only a larger test set

The protocol (issue 11): every configuration at its own best guidance, chosen on a *validation* set and reported
on a disjoint *test* set. MNIST's test split is cut in two: the first half is the validation reference, the
second half the test reference, and the generated sets of the two phases use different seeds. For each
configuration the script sweeps the guidance scales (times the `--steps` given) on `--val-n` class-balanced
samples, keeps the setting with the lowest validation classifier-FID, then draws `--test-n` samples at that
setting and reports the
classifier-FID with a bootstrap 95% interval (both feature sets resampled) and the classifier accuracy with a
Wilson 95% interval. Inference compute is counted, not estimated: forward GFLOPs per image of every expert
the trace says was evaluated and of the gate, times two where guidance runs the null-condition rows.
Training compute comes from the cards (every dense baseline is trained with --match-compute: the same total
training FLOPs as the mixture's experts).

Configurations: the mixture (default: the shipped `mnist`) at top-1, top-2 without a floor, top-2 with the
weight floor 0.01 (as shipped) and top-p 0.9 (capped at every expert, no floor); each dense baseline
(default: the shipped `mnist-dense-*` one-expert mixtures) as it is; `--extra LABEL=DIR` adds another mixture
(e.g. scripts/train_kmeans8.sh's) under the same routing configurations, named `LABEL-top-1`, ...

The baseline is the dense *frontier*: at a mixture point's GFLOPs, the lowest test FID of any dense point that
costs no more (a step curve, never an interpolation between sizes whose FID does not fall with size);
`--dense-from DIR` adds the dense points another run of the same test protocol kept (e.g. the same models at
other settings), so a cheap mixture point is compared with the cheap dense settings too.

Writes benchmarks/results/quality/pareto/<config>.json, pareto.{md,json} and pareto.png. Not a test: run by hand.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mode_ray.cli import DEFAULT_MODEL, model_dir
from mode_ray.generation import load_bundle
from mode_ray.models.checkpoint import load_card
from mode_ray.train.classifier import load_classifier
from mode_ray.train.data import load_mnist
from mode_ray.train.evaluate import bootstrap_fid, evaluate, wilson_interval

OUT = Path(__file__).resolve().parent / "results" / "quality"
PRETRAINED = DEFAULT_MODEL.parent
DEFAULT_STEPS = 18  # the shipped models' heun steps (what results without a steps sweep used)
MIXTURE_CONFIGS = {  # name -> evaluate() routing overrides; min_weight 0 switches the shipped floor off
    "top-1": {"top_k": 1, "min_weight": 0.0},
    "top-2": {"top_k": 2, "min_weight": 0.0},
    "top-2-floor": {"top_k": 2, "min_weight": 0.01},
    "top-p-0.9": {"top_k": 16, "top_p": 0.9, "min_weight": 0.0},
}


def configurations(
    mixture: Path, dense: list[Path], extra: dict[str, Path] | None = None
) -> dict[str, tuple[Path, dict, str]]:
    """name -> (model directory, evaluate() overrides, kind: "mixture" or "dense"); each `extra` mixture
    (label -> directory) under the routing configurations as `<label>-top-1`, ..."""
    out = {name: (mixture, kw, "mixture") for name, kw in MIXTURE_CONFIGS.items()}
    for label, path in (extra or {}).items():
        out |= {f"{label}-{name}": (path, kw, "mixture") for name, kw in MIXTURE_CONFIGS.items()}
    for d in dense:
        out[d.name.removeprefix("mnist-")] = (d, {}, "dense")
    return out


def training_cost(model: Path) -> dict:
    """Training FLOPs and seconds summed over the experts' cards (the gate's training is not counted in either)."""
    cfg = json.loads((model / "mixture.json").read_text())
    cards = [load_card(model / "experts" / n) for n in cfg["experts"]]
    return {
        "train_flops": sum(int(c.metrics.get("train_flops", 0)) for c in cards),
        "train_seconds": round(sum(float(c.metrics.get("train_seconds", 0)) for c in cards), 1),
        "experts": len(cards),
    }


def run_config(name: str, model: Path, overrides: dict, kind: str, a: argparse.Namespace) -> dict:
    bundle = load_bundle(model)
    judge = load_classifier(DEFAULT_MODEL / "classifier")
    test = load_mnist("test")
    half = len(test) // 2
    val_ref, test_ref = test.images[:half], test.images[half:]
    t0 = time.time()
    sweep = []
    chosen_in = a.settings_from / "pareto" / f"{name}.json" if a.settings_from else None
    if (
        chosen_in is not None
    ):  # the validation phase of an earlier run: its sweep and its choice, as they were
        if not chosen_in.exists():
            raise SystemExit(
                f"--settings-from: {chosen_in} does not exist (run that configuration there first)"
            )
        earlier = json.loads(chosen_in.read_text())
        sweep = earlier["sweep"]
    for g, steps in [] if chosen_in else itertools.product(a.guidance, a.steps):
        r, _, _ = evaluate(
            bundle,
            judge,
            test,
            a.val_n,
            steps=steps,
            guidance_scale=g,
            seed=1,
            reference=val_ref,
            **overrides,
        )
        sweep.append(
            {
                "guidance": g,
                "steps": steps,
                "val_fid": r.fid,
                "val_accuracy": r.accuracy,
                "gflops_per_image": r.gflops_per_image,
            }
        )
        print(
            f"{name} g={g} steps={steps}: val FID {r.fid:.2f} acc {100 * r.accuracy:.1f}% "
            f"{r.gflops_per_image:.2f} GFLOPs"
        )
    best = min(sweep, key=lambda s: s["val_fid"])
    best = {"steps": DEFAULT_STEPS, **best}  # sweeps of runs without a steps sweep ran the default
    r, x, y = evaluate(
        bundle,
        judge,
        test,
        a.test_n,
        steps=best["steps"],
        guidance_scale=best["guidance"],
        seed=2,
        reference=test_ref,
        **overrides,
    )
    with torch.no_grad():
        fid, lo, hi = bootstrap_fid(
            judge.features(x * 2 - 1), judge.features(test_ref), rounds=a.bootstrap, seed=0
        )
        hits = int((judge(x * 2 - 1).argmax(1) == y).sum())
    acc_lo, acc_hi = wilson_interval(hits, len(y))
    result = {
        "name": name,
        "kind": kind,
        "model": model.name,
        "routing": overrides,
        "sweep": sweep,
        "best_guidance": best["guidance"],
        "best_steps": best["steps"],
        "test": {
            **asdict(r),
            "fid": round(fid, 3),
            "fid_low": round(lo, 3),
            "fid_high": round(hi, 3),
            "accuracy_low": round(acc_lo, 4),
            "accuracy_high": round(acc_hi, 4),
        },
        "training": training_cost(model),
        "eval_seconds": round(time.time() - t0, 1),
        "protocol": {
            "val_n": earlier["protocol"]["val_n"] if chosen_in else a.val_n,
            "test_n": a.test_n,
            "bootstrap": a.bootstrap,
            "threads": torch.get_num_threads(),
        },
    }
    print(
        f"{name}: best g={best['guidance']} test FID {fid:.2f} [{lo:.2f}, {hi:.2f}] "
        f"acc {100 * hits / len(y):.1f}% {r.gflops_per_image:.2f} GFLOPs/image"
    )
    return result


def dense_frontier(dense: list[dict], gflops: float) -> dict | None:
    """The best dense point bought with at most `gflops` per image: the lowest test FID among the dense
    results (any size, any guidance and steps evaluated on the test half) that cost no more; None when every
    dense point costs more (no extrapolation). A point below this step curve beats every dense model that is
    as cheap or cheaper."""
    cheaper = [r for r in dense if r["test"]["gflops_per_image"] <= gflops * (1 + 1e-9)]
    return min(cheaper, key=lambda r: r["test"]["fid"]) if cheaper else None


def setting(r: dict) -> str:
    """The chosen guidance, and the steps when they are not the default."""
    steps = r.get("best_steps", DEFAULT_STEPS)
    return f"{r['best_guidance']:g}" + ("" if steps == DEFAULT_STEPS else f", {steps} steps")


def label(r: dict) -> str:
    """A result's name with its chosen setting, e.g. `dense-s g=1.25, 30 steps`."""
    return f"{r['name']} g={r['best_guidance']:g}, {r.get('best_steps', DEFAULT_STEPS)} steps"


def table_row(r: dict, name: str, dense: str, ratio: str) -> str:
    """One result as a row of pareto.md's table."""
    t = r["test"]
    return (
        f"| {name} | {r['kind']} | {t['active_params'] / 1e6:.2f}M / {t['total_params'] / 1e6:.2f}M | "
        f"{t['gflops_per_image']:.2f} | {setting(r)} | {t['fid']:.1f} [{t['fid_low']:.1f}, "
        f"{t['fid_high']:.1f}] | {100 * t['accuracy']:.1f}% [{100 * t['accuracy_low']:.1f}, "
        f"{100 * t['accuracy_high']:.1f}] | {dense} | {ratio} | {r['training']['train_flops']:.2e} | "
        f"{r['training']['train_seconds'] / 60:.0f} |"
    )


def report(results: list[dict], out: Path, baselines: list[dict] | None = None) -> None:
    """pareto.md / .json / .png from this run's `results`; `baselines` are dense results of other runs of
    the same protocol (other settings of the same models, e.g. a coarser grid's) that join the frontier."""
    dense = [r for r in results if r["kind"] == "dense"] + list(baselines or [])
    head = "| config | kind | active / total params | GFLOPs/image | best guidance | FID (95% CI) | accuracy (95% CI) | best dense at <= GFLOPs | ratio | train FLOPs | train min |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    summary = []
    for r in sorted(results, key=lambda r: (r["kind"], r["test"]["gflops_per_image"])):
        t = r["test"]
        best = dense_frontier(dense, t["gflops_per_image"]) if r["kind"] == "mixture" else None
        ratio = None if best is None else t["fid"] / best["test"]["fid"]
        separated = None if best is None else t["fid_high"] < best["test"]["fid_low"]
        dense_better = None if best is None else t["fid_low"] > best["test"]["fid_high"]
        summary.append(
            {
                "name": r["name"],
                "dense_frontier": None if best is None else label(best),
                "ratio_to_dense": ratio,
                "intervals_separate": separated,
                "dense_better_intervals_separate": dense_better,
            }
        )
        dense_s = (
            "-"
            if best is None
            else f"{best['test']['fid']:.1f} [{best['test']['fid_low']:.1f}, {best['test']['fid_high']:.1f}]"
            f" ({label(best)})"
        )
        apart = (
            " (CIs apart: mixture better)"
            if separated
            else " (CIs apart: dense better)"
            if dense_better
            else ""
        )
        ratio_s = "-" if ratio is None else f"{ratio:.2f}{apart}"
        lines.append(table_row(r, r["name"], dense_s, ratio_s))
    for r in sorted(baselines or [], key=lambda r: r["test"]["gflops_per_image"]):
        lines.append(table_row(r, f"{r['name']} (other run)", "-", "-"))
    grid = sorted({(s["guidance"], s.get("steps", DEFAULT_STEPS)) for r in results for s in r["sweep"]})
    one_steps = len({st for _, st in grid}) == 1
    sweep = ["", "Validation sweep (classifier-FID on the validation half; the chosen setting in bold):", ""]
    sweep.append(
        "| config | "
        + " | ".join(f"g={g:g}" + ("" if one_steps else f", {st} steps") for g, st in grid)
        + " |"
    )
    sweep.append("|---|" + "---|" * len(grid))
    for r in results:
        chosen = (r["best_guidance"], r.get("best_steps", DEFAULT_STEPS))
        cells = {}
        for s in r["sweep"]:
            key = (s["guidance"], s.get("steps", DEFAULT_STEPS))
            cells[key] = f"**{s['val_fid']:.1f}**" if key == chosen else f"{s['val_fid']:.1f}"
        sweep.append(f"| {r['name']} | " + " | ".join(cells.get(k, "-") for k in grid) + " |")
    p = results[0]["protocol"]
    notes = (
        f"\n- protocol: guidance and steps chosen on {p['val_n']} samples against the first half of MNIST test, "
        f"reported on {p['test_n']} samples against the second half; {p['bootstrap']} bootstrap rounds; heun\n"
        "- best dense at <= GFLOPs: the lowest test FID of any dense point (any size, at a setting evaluated on "
        "the test half) that costs no more per image; ratio = the row's FID over it\n"
    )
    (out / "pareto.md").write_text("\n".join(lines + sweep) + "\n" + notes)
    (out / "pareto.json").write_text(
        json.dumps({"results": results, "dense_baselines": baselines or [], "summary": summary}, indent=2)
        + "\n"
    )
    plot(results, dense, out / "pareto.png")


def plot(results: list[dict], dense: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10.5, 5))
    dense = sorted(dense, key=lambda r: r["test"]["gflops_per_image"])
    for r in dense:
        t = r["test"]
        ax.errorbar(
            [t["gflops_per_image"]],
            [t["fid"]],
            yerr=[[t["fid"] - t["fid_low"]], [t["fid_high"] - t["fid"]]],
            capsize=3,
            color="tab:gray",
            marker="s",
            linestyle="none",
        )
        ax.annotate(
            label(r),
            (t["gflops_per_image"], t["fid"]),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=7,
            color="tab:gray",
        )
    mixtures = [r for r in results if r["kind"] == "mixture"]
    right = max(r["test"]["gflops_per_image"] for r in dense + mixtures) * 1.1
    xs, ys = [], []  # the frontier: a step down at every dense point that beats all cheaper ones
    for r in dense:
        x, y = r["test"]["gflops_per_image"], r["test"]["fid"]
        if not ys or y < ys[-1]:
            xs += [x] if not ys else [x, x]
            ys += [y] if not ys else [ys[-1], y]
    ax.plot(
        xs + [right],
        ys + [ys[-1]],
        color="tab:gray",
        linestyle="--",
        label="dense frontier (best at <= GFLOPs)",
    )
    for r in mixtures:
        t = r["test"]
        named = r["model"].removeprefix("mnist-") in r["name"]  # an --extra mixture's names carry its label
        name = r["name"] if named else r["model"] + " " + r["name"]
        ax.errorbar(
            [t["gflops_per_image"]],
            [t["fid"]],
            yerr=[[t["fid"] - t["fid_low"]], [t["fid_high"] - t["fid"]]],
            marker="o",
            capsize=3,
            linestyle="none",
            label=label({**r, "name": name}),
        )
    ax.set_xscale("log")
    ax.set_xlabel("inference GFLOPs per image (evaluated experts + gate, x2 with guidance)")
    ax.set_ylabel("classifier-FID, test half (bootstrap 95% CI)")
    ax.set_title("MNIST: mixtures vs dense (gray squares), equal training FLOPs")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def kept(out: Path) -> list[dict]:
    """The per-configuration results a run kept under `out`/pareto/."""
    return [json.loads(f.read_text()) for f in sorted((out / "pareto").glob("*.json"))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixture", type=Path, default=DEFAULT_MODEL)
    p.add_argument(
        "--dense", type=Path, action="append", default=None, help="a dense one-expert mixture directory"
    )
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="another mixture (e.g. runs/mnist-kmeans8), as configurations LABEL-top-1, LABEL-top-2-floor, ...",
    )
    p.add_argument("--only", default=None, help="comma-separated configuration names")
    p.add_argument(
        "--guidance", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 1.5, 2.0, 3.0]
    )
    p.add_argument(
        "--steps",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[DEFAULT_STEPS],
        help="sampler steps to sweep with the guidance scales (heun)",
    )
    p.add_argument("--val-n", type=int, default=300)
    p.add_argument("--test-n", type=int, default=2000)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--dense-from",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="another run's output directory (same protocol): its dense results join the dense frontier",
    )
    p.add_argument(
        "--settings-from",
        type=Path,
        default=None,
        metavar="DIR",
        help="take each configuration's validation sweep and chosen setting from another run's output "
        "directory and only draw the test samples (e.g. a larger --test-n at the same settings)",
    )
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dense = a.dense or sorted(PRETRAINED.glob("mnist-dense-*"))
    extra = {label: Path(path) for label, _, path in (e.partition("=") for e in a.extra)}
    configs = configurations(model_dir(a.mixture), [model_dir(d) for d in dense], extra)
    keep = a.out / "pareto"
    keep.mkdir(parents=True, exist_ok=True)
    if not a.plot_only:
        names = a.only.split(",") if a.only else list(configs)
        unknown = sorted(set(names) - set(configs))
        if unknown:
            raise SystemExit(f"unknown configuration(s) {unknown}; known: {sorted(configs)}")
        for name in names:
            model, overrides, kind = configs[name]
            result = run_config(name, model, overrides, kind, a)
            result["sweep_scales"] = sorted({s["guidance"] for s in result["sweep"]})
            result["sweep_steps"] = sorted({s.get("steps", DEFAULT_STEPS) for s in result["sweep"]})
            (keep / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    results = kept(a.out)
    baselines = [r for d in a.dense_from for r in kept(d) if r["kind"] == "dense"]
    for r in baselines:  # the test half, its seeds and n must match; the validation n may differ
        mine = {k: results[0]["protocol"][k] for k in ("test_n", "bootstrap")}
        if {k: r["protocol"][k] for k in mine} != mine:
            raise SystemExit(
                f"--dense-from {r['name']}: test protocol {r['protocol']} is not this run's {mine}"
            )
    if results:
        report(results, a.out, baselines)
        print((a.out / "pareto.md").read_text())


if __name__ == "__main__":
    main()

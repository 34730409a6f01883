"""Writes the notebooks from the cells below, with their outputs:

    python scripts/make_notebook.py            # write the cells only (no outputs)
    python scripts/make_notebook.py --execute  # run them (cluster.ipynb against a local cluster this starts)
    python scripts/make_notebook.py --execute walkthrough  # only the notebooks named

notebooks/walkthrough.ipynb runs the shipped mixture in-process; notebooks/cluster.ipynb drives a running
cluster with the Python client. Each executed code cell records the sha256 of its source in its metadata, so
tests/test_notebook.py can tell a stale output (its cell changed since it ran) from a current one."""

from pathlib import Path

import nbformat as nbf

CELLS = [
    (
        "md",
        """# mode_ray walkthrough: a Mixture of Diffusion Experts, in one process

The shipped default model is four class-conditional EDM experts, each trained in isolation (Ray Train) on one
group of MNIST digits, plus a learned gate `p(k | x, sigma, cond)`. At every sampler step the gate scores the
experts, the top-k are evaluated, and their `x0_hat` are combined with renormalised weights:
`D_mix = sum_k w_k D_k`. This notebook runs that in-process; `mode-ray serve` runs the very same step on a Ray
Serve cluster with every expert its own deployment (see the README).""",
    ),
    (
        "code",
        """import torch
from IPython.display import Image, display

from mode_ray.cli import DEFAULT_MODEL
from mode_ray.generation import GenerateParams, generate_local, load_bundle
from mode_ray.generation.images import png_bytes

torch.set_num_threads(2)
bundle = load_bundle(DEFAULT_MODEL)
for e in bundle.mixture.experts:
    print(f"{e.name:14s} partition={e.card.data.partition:16s} params={e.card.parameters:,} "
          f"trained {e.card.metrics['train_seconds']:.0f}s")
print("defaults:", bundle.config.sampler, bundle.config.steps, "steps, top_k", bundle.config.top_k,
      "guidance", bundle.config.guidance_scale)""",
    ),
    ("md", "## Class-conditional generation\nThe same seed gives the same images."),
    (
        "code",
        """gen = generate_local(bundle.mixture, bundle.config,
                     GenerateParams(prompt="seven", num_images=16, seed=0))
display(Image(png_bytes(gen.images, nrow=8)))
again = generate_local(bundle.mixture, bundle.config,
                       GenerateParams(prompt="seven", num_images=16, seed=0))
assert torch.equal(gen.images, again.images)""",
    ),
    (
        "md",
        """## The routing trace
Every evaluation records, per image, the chosen experts and their renormalised weights. For a conditional
request the gate sends the step to the expert whose partition holds the digit.""",
    ),
    (
        "code",
        """for step in gen.trace[:: max(1, len(gen.trace) // 5)]:
    print(f"sigma={step.sigma:8.3f}  image 0 -> {list(zip(step.experts[0], step.weights[0]))}")""",
    ),
    (
        "md",
        """## Unconditional generation: the learned gate routes on the noisy image
Under the null condition (`unconditional="null"`) only `x` and `sigma` inform the gate; at high noise it
hedges across experts, and as the image forms it commits.""",
    ),
    (
        "code",
        """uncond = generate_local(bundle.mixture, bundle.config,
                        GenerateParams(num_images=8, seed=1, guidance_scale=1.0, unconditional="null"))
display(Image(png_bytes(uncond.images, nrow=8)))
first, last = uncond.trace[0], uncond.trace[-1]
print("first step:", list(zip(first.experts[0], first.weights[0])))
print("last step: ", list(zip(last.experts[0], last.weights[0])))
display(Image(uncond.routing_png()))  # experts x evaluations, mean weight over the 8 images""",
    ),
    (
        "md",
        """The shipped mixture's default for a request without a prompt is `unconditional="prior"`: each image
draws its class from the training set's class shares (`class_prior` in mixture.json) and is sampled for it,
since p(x) = sum_c p(c) p(x | c). Its samples follow the data's class shares, where the null condition's
are skewed (README, "Unconditional samples").""",
    ),
    (
        "code",
        """prior = generate_local(bundle.mixture, bundle.config, GenerateParams(num_images=8, seed=1))
display(Image(png_bytes(prior.images, nrow=8)))
print("drawn classes:", prior.labels)""",
    ),
    (
        "md",
        """## A hot-added expert and the learned gate
The learned gate was trained on the four shipped experts. For an expert it does not know it *abstains*: on
unconditional rows the newcomer gets no weight (so unconditional sampling is unchanged), on conditional rows
its learned term is neutral and the prototype gate decides. Here a copy of `digits-8-9` is added under a new
name with a prototype that holds digit 3.""",
    ),
    (
        "code",
        """from mode_ray.models import load_expert
from mode_ray.models.checkpoint import Expert
from mode_ray.routing import Mixture

src = load_expert(DEFAULT_MODEL / "experts" / "digits-8-9")
card = src.card.model_copy(update={"name": "newcomer", "prototype": torch.eye(10)[3].tolist()})
added = Mixture([*bundle.mixture.experts, Expert(card, src.denoiser)], bundle.mixture.gate, top_k=2)
p = GenerateParams(num_images=4, seed=1, steps=6, unconditional="null")
same = generate_local(added, bundle.config, p).images.equal(generate_local(bundle.mixture, bundle.config, p).images)
print("unconditional samples unchanged by the hot-add:", same)
three = generate_local(added, bundle.config, GenerateParams(prompt=3, num_images=1, seed=0, steps=6))
for t in three.trace[::3]:
    print(f"sigma {t.sigma:8.3f}", list(zip(t.experts[0], t.weights[0])))""",
    ),
    (
        "md",
        """## Exactness of the mixture maths
With `k = N` the mixture is the dense softmax mixture; pinning one expert gives that expert alone.""",
    ),
    (
        "code",
        """x = torch.randn(4, 1, 28, 28) * 2
sigma = torch.full((4,), 2.0)
cond = bundle.encoder.encode([3, 3, 3, 3])
mix = bundle.mixture
plan = mix.plan(x, sigma, cond, allowed=mix.allowed(pin=["digits-2-3-5"]))
only = mix.evaluate(plan)
direct = mix.experts[mix.names.index("digits-2-3-5")].denoiser(x, sigma, cond)
print("pinned mixture == that expert:", torch.allclose(only, direct, atol=1e-6))""",
    ),
    (
        "md",
        """## Next: the cluster
```bash
mode-ray serve                                   # Ray + Serve, every expert its own deployment
curl -s -X POST localhost:8000/v1/generate -H 'content-type: application/json' \\
     -d '{"prompt": "seven", "num_images": 16, "seed": 0}' -o grid.png
MODE_RAY_ADMIN_TOKEN=... mode-ray experts add <expert-dir>   # hot-add, no redeploy
```""",
    ),
]


CLUSTER_CELLS = [
    (
        "md",
        """# mode_ray on a running cluster

Start one with `make serve` (or `mode-ray serve`, with `MODE_RAY_ADMIN_TOKEN` set for the admin calls), then
run this notebook: generate through the Python client, hot-add an expert without redeploying anything, watch
its share of the routing, remove it. `MODE_RAY_URL` and `MODE_RAY_EXPERT_ROOT` point it elsewhere.""",
    ),
    (
        "code",
        """import json
import os
import shutil
from pathlib import Path

from IPython.display import Image, display

from mode_ray import Client
from mode_ray.cli import DEFAULT_MODEL

URL = os.environ.get("MODE_RAY_URL", "http://127.0.0.1:8000")
EXPERT_ROOT = Path(os.environ.get("MODE_RAY_EXPERT_ROOT", DEFAULT_MODEL / "experts"))  # the cluster's
client = Client(URL)  # the admin token from MODE_RAY_ADMIN_TOKEN
listing = client.experts.list()
print("registry version", listing["registry_version"])
for e in listing["experts"]:
    print(f"  {e['name']:14s} v{e['version']}  {e['state']}")""",
    ),
    ("md", "## Generate\nThe result is the same `GenerationResult` that in-process generation returns."),
    (
        "code",
        """result = client.generate(prompt="seven", num_images=8, seed=0)
display(Image(result.png(nrow=8, scale=2)))
display(Image(result.routing_png()))
print("images", result.raw().shape, "dropped mass", result.dropped_mass, "registry", result.registry_version)""",
    ),
    (
        "md",
        """## Hot-add an expert
A copy of `digits-1-4-7` whose card says it holds only sevens (its prototype). The cluster validates the files,
loads it into a warm replica (or deploys it), proves it with a canary pass and routes to it; nothing else is
redeployed, and requests in flight keep the experts they were admitted with.""",
    ),
    (
        "code",
        """new = EXPERT_ROOT / "sevens"
shutil.rmtree(new, ignore_errors=True)
shutil.copytree(EXPERT_ROOT / "digits-1-4-7", new)
card = json.loads((new / "expert.json").read_text())
card.update(name="sevens", prototype=[1.0 if d == 7 else 0.0 for d in range(10)])
(new / "expert.json").write_text(json.dumps(card))
print(client.experts.add("sevens"))""",
    ),
    (
        "md",
        """## Its share of the routing
Requests for a seven now route to the newcomer, whose prototype matches best; `status()` sums what every router
replica routed over the last few seconds.""",
    ),
    (
        "code",
        """sevens = client.generate(prompt=7, num_images=4, seed=1)
carried = {n for t in sevens.trace for row in t.experts for n in row}
print("experts that carried the sevens:", sorted(carried))
for e in client.status()["experts"]:
    print(f"  {e['name']:14s} replicas {e['replicas']}  routed {e['routed_share']:.0%}")
assert "sevens" in carried""",
    ),
    ("md", "## Remove it\nDrained first: requests that may still use it finish with it."),
    (
        "code",
        """print(client.experts.remove("sevens"))
shutil.rmtree(new)
print([e["name"] for e in client.experts.list()["experts"]])""",
    ),
]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = {"walkthrough": CELLS, "cluster": CLUSTER_CELLS}


def build(cells: list[tuple[str, str]]) -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells
    ]
    return nb


def source_sha(source: str) -> str:
    import hashlib

    return hashlib.sha256(source.encode()).hexdigest()


def execute(nb: nbf.NotebookNode, timeout: int = 600) -> nbf.NotebookNode:
    """Run every cell (in notebooks/), then stamp each code cell with the sha256 of the source it ran."""
    from nbclient import NotebookClient

    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.metadata["mode_ray"] = {"source_sha256": source_sha(cell.source)}
            cell.execution_count = None  # stable diffs
            for out in cell.get("outputs", []):
                if out.get("output_type") == "execute_result":
                    out["execution_count"] = None
    return nb


def local_cluster() -> tuple[str, Path, object]:
    """A local Ray + Serve with a copy of the shipped mixture: (url, its expert root, a stop function)."""
    import os
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from local_serve import serve_shipped_mixture

    os.environ.setdefault("MODE_RAY_ADMIN_TOKEN", "notebook-token")
    return serve_shipped_mixture("mode-ray-notebook-")


def main() -> None:
    import os
    import sys

    run = "--execute" in sys.argv[1:]
    only = [a for a in sys.argv[1:] if not a.startswith("--")] or list(
        NOTEBOOKS
    )  # e.g. `--execute walkthrough`
    stop = None
    if run:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    try:
        for name, cells in NOTEBOOKS.items():
            if name not in only:
                continue
            nb = build(cells)
            if run:
                if name == "cluster":
                    url, root, stop = local_cluster()
                    os.environ["MODE_RAY_URL"], os.environ["MODE_RAY_EXPERT_ROOT"] = url, str(root)
                nb = execute(nb)
            out = ROOT / "notebooks" / f"{name}.ipynb"
            nbf.write(nb, out)
            print(f"wrote {out}")
    finally:
        if stop is not None:
            stop()


if __name__ == "__main__":
    main()

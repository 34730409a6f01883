"""Writes notebooks/walkthrough.ipynb from the cells below (the notebook is executed by tests/test_notebook.py)."""

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
Without a condition only `x` and `sigma` inform the gate; at high noise it hedges across experts, and as the
image forms it commits.""",
    ),
    (
        "code",
        """uncond = generate_local(bundle.mixture, bundle.config,
                        GenerateParams(num_images=8, seed=1, guidance_scale=1.0))
display(Image(png_bytes(uncond.images, nrow=8)))
first, last = uncond.trace[0], uncond.trace[-1]
print("first step:", list(zip(first.experts[0], first.weights[0])))
print("last step: ", list(zip(last.experts[0], last.weights[0])))""",
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
p = GenerateParams(num_images=4, seed=1, steps=6)
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


def main() -> None:
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in CELLS
    ]
    out = Path(__file__).resolve().parent.parent / "notebooks" / "walkthrough.ipynb"
    nbf.write(nb, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""`mode-ray train gate --extend`: a real Ray Train job adds a row for a hot-added expert to the shipped
learned gate, the old rows frozen, and unconditional sampling then routes to the new expert as the extended
gate predicts on held-out data."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch

from mode_ray.cli import DEFAULT_MODEL
from mode_ray.generation import GenerateParams, generate_local, load_bundle
from mode_ray.generation.bundle import load_config, load_gate_net, save_gate
from mode_ray.routing.gates import LearnedGateNet
from mode_ray.train.data import load_mnist
from mode_ray.train.jobs import extend_gate
from mode_ray.train.loops import JobConfig

NEW = "digits-8-9"


@pytest.fixture(scope="module")
def three_expert_mixture(tmp_path_factory):  # noqa: ANN001, ANN201
    """The shipped mixture without digits-8-9, and its gate without that row (softmax over the other three):
    a mixture to which digits-8-9 is then hot-added, unknown to the gate."""
    work = tmp_path_factory.mktemp("m3") / "mnist"
    shutil.copytree(DEFAULT_MODEL, work)
    config = load_config(work)
    keep = [i for i, n in enumerate(config.experts) if n != NEW]
    (work / "mixture.json").write_text(
        config.model_copy(update={"experts": [config.experts[i] for i in keep]}).model_dump_json(indent=2)
    )
    full = load_gate_net(DEFAULT_MODEL / "gate")
    three = LearnedGateNet(replace(full.config, experts=tuple(full.config.experts[i] for i in keep)))
    state = full.state_dict()
    last = f"head.{len(three.head) - 1}"
    three.load_state_dict({k: v[keep] if k.startswith(last) else v for k, v in state.items()})
    save_gate(work / "gate", three, {"note": f"the shipped gate without its {NEW} row"})
    return work


@pytest.mark.slow
def test_extend_adds_a_row_and_unconditional_samples_follow_it(ray_session, three_expert_mixture) -> None:  # noqa: ANN001
    work = three_expert_mixture
    base = load_gate_net(work / "gate")
    job = JobConfig(kind="gate", name="gate", steps=300, batch_size=128, log_every=100)
    path = extend_gate(work, [work / "experts" / NEW], job, workers=1, cpus_per_worker=2)
    assert path == work / "gates" / "1"
    extended = load_gate_net(path)
    assert extended.config.experts == (*base.config.experts, NEW)

    # the old rows and everything below them are frozen: exactly the base gate's weights
    new_state, old_state = extended.state_dict(), base.state_dict()
    for key, old in old_state.items():
        torch.testing.assert_close(
            new_state[key][: old.shape[0]] if "head.3" in key else new_state[key], old, rtol=0, atol=0
        )

    # held-out accuracy over the four experts, measured before (the gate abstains for NEW) and after
    metrics = json.loads((path / "gate.json").read_text())["metrics"]
    before, after = metrics["heldout_accuracy_before"], metrics["heldout_accuracy_after"]
    assert before["0.002-0.02"] < 0.85  # the ~20% of images that are 8 or 9 cannot be named
    assert after["0.002-0.02"] > before["0.002-0.02"] + 0.1

    # what the extended gate predicts for NEW on held-out data at low noise ...
    bundle = load_bundle(work, experts=[work / "experts" / NEW], gate=path)
    k = bundle.mixture.names.index(NEW)
    test = load_mnist("test")
    g = torch.Generator().manual_seed(0)
    x0 = test.images[torch.randperm(len(test), generator=g)[:2000]]
    sigma = torch.full((len(x0),), 0.05)
    with torch.no_grad():
        learned = bundle.mixture.gate.gates[-1]
        predicted = float(
            learned(x0 + sigma[0] * torch.randn(x0.shape, generator=g), sigma, None, bundle.mixture.cards)
            .softmax(1)[:, k]
            .mean()
        )
    assert predicted > 0.1
    # ... is the share of routing weight unconditional samples give NEW at the end of sampling
    n = 128
    gen = generate_local(bundle.mixture, bundle.config, GenerateParams(num_images=n, seed=3, steps=8))
    last = gen.trace[-1]
    share = (
        sum(
            dict(zip(row, ws, strict=True)).get(NEW, 0.0)
            for row, ws in zip(last.experts, last.weights, strict=True)
        )
        / n
    )
    se = math.sqrt(predicted * (1 - predicted) / n)
    assert abs(share - predicted) < 3 * se, (share, predicted)

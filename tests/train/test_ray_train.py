"""A tiny real Ray Train run (2 workers, a few steps) produces a loadable expert and a loadable gate."""

import pytest
import torch

from mode_ray.generation.bundle import load_bundle
from mode_ray.models import load_expert
from mode_ray.train.jobs import train_experts, train_gate
from mode_ray.train.loops import JobConfig


@pytest.mark.slow
def test_two_worker_expert_and_gate_jobs(ray_session, tmp_path) -> None:  # noqa: ANN001
    base = JobConfig(kind="expert", name="x", preset="xs", steps=6, batch_size=8, log_every=3)
    paths = train_experts(
        tmp_path / "mix", "labels:0,1|2,3", base, workers=2, cpus_per_worker=1, parallel=1, only=[0]
    )
    expert = load_expert(paths[0])
    assert expert.card.name == "digits-0-1" and expert.card.data.partition == "labels:0,1"
    assert expert.card.metrics["workers"] == 2 and expert.card.metrics["train_steps"] == 6
    assert expert.card.prototype[0] > 0.4 and expert.card.prototype[2] == 0
    out = expert.denoiser(torch.zeros(1, 1, 28, 28), torch.ones(1), torch.eye(10)[:1])
    assert out.shape == (1, 1, 28, 28) and torch.isfinite(out).all()

    train_experts(
        tmp_path / "mix", "labels:0,1|2,3", base, workers=1, cpus_per_worker=1, parallel=1, only=[1]
    )
    train_gate(
        tmp_path / "mix", JobConfig(kind="gate", name="gate", steps=4, batch_size=8, log_every=2), 1, 1
    )
    bundle = load_bundle(tmp_path / "mix")
    assert bundle.mixture.names == ["digits-0-1", "digits-2-3"]
    prior = bundle.config.class_prior  # the shares of the classes its experts cover, nothing else
    assert bundle.config.unconditional == "prior" and min(prior[:4]) > 0.2 and sum(prior[4:]) == 0
    assert bundle.config.gate.learned == "gate"

    # a spatial gate fitted to the empirical posterior, written beside the mixture: mixture.json untouched
    before = (tmp_path / "mix" / "mixture.json").read_text()
    cfg = JobConfig(
        kind="gate", name="g", steps=3, batch_size=8, gate_head="spatial", gate_targets="posterior"
    )
    out = train_gate(tmp_path / "mix", cfg, 1, 1, out=tmp_path / "gate-posterior")
    assert (tmp_path / "mix" / "mixture.json").read_text() == before
    net = load_bundle(tmp_path / "mix", gate=out).mixture.gate.gates[-1].net
    assert net.config.head == "spatial" and net.config.experts == ("digits-0-1", "digits-2-3")


@pytest.mark.slow
def test_jobs_report_to_the_progress_board_and_end_with_a_summary_line(ray_session, tmp_path) -> None:  # noqa: ANN001
    """Two expert jobs at once report to one board; the driver's bars read it, and each job ends with one
    summary line naming its steps, loss, speed and checkpoint (what `mode-ray train experts` prints)."""
    from mode_ray.train.progress import progress_bars

    lines: list[str] = []
    with progress_bars(lines.append) as board:
        base = JobConfig(kind="expert", name="x", preset="xs", steps=8, batch_size=8, progress=board)
        paths = train_experts(
            tmp_path / "mix", "labels:0,1|2,3", base, workers=1, cpus_per_worker=1, parallel=2
        )
    assert len(lines) == 2 and [p.name for p in paths] == ["digits-0-1", "digits-2-3"]
    for line, path in zip(lines, paths, strict=True):
        assert line.startswith(f"expert {path.name}: 8/8 steps, loss ") and line.endswith(f"-> {path}")
        assert " img/s, " in line

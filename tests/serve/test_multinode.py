"""The expert cluster across machines: a head plus two worker raylets simulated on this machine, experts
pinned to different nodes by custom resources, and a generation that uses experts on both nodes; then the
raylet holding one expert's only replica is killed under load, and a replacement node takes it.

The cluster runs in a subprocess (tests/serve/multinode_driver.py): this pytest process already holds the
session's single `ray.init` (tests/conftest.py), and a process can only be connected to one Ray cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DRIVER = Path(__file__).with_name("multinode_driver.py")
RESULT_PREFIX = "MULTINODE_RESULT "


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.serve
@pytest.mark.slow
def test_experts_on_different_nodes_serve_one_generation_and_survive_a_node_loss() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(
            [sys.executable, str(DRIVER)],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(
            f"driver timed out after 300 s\n--- stdout ---\n{_tail(out)}\n--- stderr ---\n{_tail(err)}"
        )
    report = f"--- stdout ---\n{_tail(proc.stdout)}\n--- stderr ---\n{_tail(proc.stderr)}"
    assert proc.returncode == 0, f"driver exited with {proc.returncode}\n{report}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert len(lines) == 1, f"expected one {RESULT_PREFIX.strip()} line\n{report}"
    result = json.loads(lines[0][len(RESULT_PREFIX) :])

    nodes, placed = result["nodes"], result["expert_nodes"]
    assert len(set(nodes.values())) == 3
    assert placed["a"] == nodes["node_a"] and placed["c"] == nodes["node_a"]
    assert placed["b"] == nodes["node_b"]
    assert placed["a"] != placed["b"]
    assert result["trace_experts"] == ["a", "b"]
    assert result["max_abs_diff"] <= 1e-5
    # the node loss (checked in the driver as it happens; the figures reach the closing notes from here)
    fault = result["fault"]
    print(f"\n[multinode] node loss: {fault}")
    assert [r["status"] for r in fault["requests"]] == [200] * 4
    assert all(r["dropped_mass"] > 0 for r in fault["requests"])
    assert fault["routed_again_after_join_s"] <= 30

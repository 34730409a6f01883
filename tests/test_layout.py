"""The layout's promises: imports point one way, and every metric and environment variable is documented."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mode_ray"
ORDER = ["diffusion", "models", "routing", "generation", "serve", "train"]  # serve and train are peers
README = (ROOT / "README.md").read_text()


def imported_layers(path: Path) -> set[str]:
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "mode_ray" and len(parts) > 1 and parts[1] in ORDER:
                layers.add(parts[1])
    return layers


@pytest.mark.parametrize("layer", ORDER)
def test_imports_point_one_way(layer: str) -> None:
    allowed = set(ORDER[: ORDER.index(layer) + 1])
    if layer == "train":
        allowed.discard("serve")  # train and serve are peers: neither imports the other
    bad = {
        str(p.relative_to(ROOT)): sorted(imported_layers(p) - allowed)
        for p in (PACKAGE / layer).rglob("*.py")
        if imported_layers(p) - allowed
    }
    assert not bad, f"{layer} may import only {sorted(allowed)}: {bad}"


def test_every_metric_is_documented_in_the_readme() -> None:
    from mode_ray.serve.metrics import METRICS

    missing = [name for name in METRICS if f"`{name}`" not in README]
    assert not missing, missing


def test_every_environment_variable_is_documented_in_the_readme() -> None:
    names = set(re.findall(r"MODE_RAY_[A-Z_]+", (PACKAGE / "env.py").read_text()))
    assert names and not [n for n in sorted(names) if n not in README]

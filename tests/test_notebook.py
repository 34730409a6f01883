"""The notebooks are committed with their outputs, and those outputs are current: every code cell's output was
produced by the source it has now (`scripts/make_notebook.py --execute` stamps a sha256 of it), and the cells
are the script's. The walkthrough is executed here again; the cluster notebook in tests/serve."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def make_notebook():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("make_notebook", ROOT / "scripts" / "make_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kinds(nb) -> list[list[str]]:  # noqa: ANN001
    """Per code cell, the kinds of its outputs (stream name or mime types): what a re-run must reproduce."""
    out = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            seen: list[str] = []
            for o in cell.outputs:
                kind = o.get("name") or ",".join(sorted(o.get("data", {})))
                if not (
                    seen and kind == seen[-1] and o.get("output_type") == "stream"
                ):  # a stream may come in parts
                    seen.append(kind)
            out.append(seen)
    return out


@pytest.mark.parametrize("name", ["walkthrough", "cluster"])
def test_committed_outputs_are_current(name: str) -> None:
    mk = make_notebook()
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    expected = [("markdown" if k == "md" else "code", src) for k, src in mk.NOTEBOOKS[name]]
    assert [(c.cell_type, c.source) for c in nb.cells] == expected, (
        f"notebooks/{name}.ipynb differs from scripts/make_notebook.py: run `python scripts/make_notebook.py "
        "--execute`"
    )
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        stamp = cell.metadata.get("mode_ray", {}).get("source_sha256")
        assert stamp == mk.source_sha(cell.source), f"{name} code cell {i}: its output is stale (re-execute)"
        assert cell.outputs, f"{name} code cell {i} has no output"
        assert not [o for o in cell.outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_walkthrough_executes_and_gives_the_committed_kinds_of_output() -> None:
    mk = make_notebook()
    committed = nbformat.read(NOTEBOOKS / "walkthrough.ipynb", as_version=4)
    ran = mk.execute(nbformat.read(NOTEBOOKS / "walkthrough.ipynb", as_version=4))
    assert not [o for c in ran.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert kinds(ran) == kinds(committed)

"""notebooks/cluster.ipynb runs against a cluster this test starts (a copy of the shipped mixture, a warm pool):
generate, hot-add an expert, see it carry sevens, remove it; its outputs are of the committed kinds."""

from __future__ import annotations

import shutil

import nbformat
import pytest

from mode_ray.cli import DEFAULT_MODEL
from tests.serve.conftest import tiny_app
from tests.test_notebook import NOTEBOOKS, kinds, make_notebook


@pytest.mark.serve
@pytest.mark.slow
def test_the_cluster_notebook_drives_a_running_cluster(serve_cluster, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    model = tmp_path / "mnist"
    shutil.copytree(DEFAULT_MODEL, model)
    with tiny_app(serve_cluster, model, warm_pool=1):
        monkeypatch.setenv("MODE_RAY_URL", serve_cluster.http_url)
        monkeypatch.setenv("MODE_RAY_EXPERT_ROOT", str(model / "experts"))
        committed = nbformat.read(NOTEBOOKS / "cluster.ipynb", as_version=4)
        ran = make_notebook().execute(nbformat.read(NOTEBOOKS / "cluster.ipynb", as_version=4))
    errors = [o for c in ran.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    assert kinds(ran) == kinds(committed)
    assert not (model / "experts" / "sevens").exists()  # the notebook cleaned up after itself

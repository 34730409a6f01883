"""Session-wide fixtures: one local Ray instance per test session, shared by Ray Train and Ray Serve tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "test-admin-token"


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """Ray with 2 CPUs, no dashboard, token auth explicitly disabled (Ray 2.60 turns it on when unset)."""
    import ray

    saved = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "PYTHONPATH", "MODE_RAY_ADMIN_TOKEN")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Ray worker processes (Train workers, Serve proxies and replicas) must import mode_ray.
    paths = [str(REPO_ROOT), *filter(None, (saved["PYTHONPATH"] or "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    os.environ["MODE_RAY_ADMIN_TOKEN"] = ADMIN_TOKEN  # replicas inherit it: the admin API is on in tests
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

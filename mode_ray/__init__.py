"""mode_ray: a Mixture of Diffusion Experts served on Ray. `from mode_ray import Client` (or `AsyncClient`) talks
to a running cluster (`mode_ray.client`); the subpackages hold the model, the routing and the serving stack."""

from __future__ import annotations

from typing import Any

__all__ = ["AsyncClient", "Client"]


def __getattr__(name: str) -> Any:  # lazy: importing mode_ray (as every submodule does) stays cheap
    if name in __all__:
        from mode_ray import client

        return getattr(client, name)
    raise AttributeError(f"module 'mode_ray' has no attribute {name!r}")

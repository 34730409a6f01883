"""The Python client of a running cluster (HTTP); what `mode-ray generate --url`, `mode-ray experts` and
`mode-ray gate` use. Results are the same `GenerationResult` that in-process generation returns."""

from __future__ import annotations

from typing import Any

import httpx

from mode_ray.generation import GenerationResult


class ClusterError(RuntimeError):
    """The cluster answered with an error status; the message is the server's."""


def _send(method: str, url: str, **kw: Any) -> Any:
    """One HTTP call; the server's error, or why the cluster could not be reached, as a ClusterError."""
    try:
        response = httpx.request(method, url, **kw)
    except httpx.HTTPError as e:
        raise ClusterError(f"cannot reach the cluster at {url}: {e}") from None
    return _check(response)


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            body = response.json()
            detail = body.get("detail") or body.get("error") or body
        except ValueError:
            detail = response.text
        raise ClusterError(f"HTTP {response.status_code}: {detail}")
    return response.json()


def _auth(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def generate(url: str, params: dict, timeout: float = 600.0) -> GenerationResult:
    """POST /v1/generate with `params` (GenerateParams fields) and decode the JSON result."""
    body = _send("POST", f"{url.rstrip('/')}/v1/generate", json={**params, "output": "json"}, timeout=timeout)
    return GenerationResult.from_json(body)


def list_experts(url: str) -> dict:
    return _send("GET", f"{url.rstrip('/')}/v1/experts", timeout=30)


def add_expert(
    url: str, path: str, token: str | None, endpoint: str = "serve", timeout: float = 600.0
) -> dict:
    body = {"path": path, "endpoint": endpoint}
    return _send("POST", f"{url.rstrip('/')}/v1/experts", json=body, headers=_auth(token), timeout=timeout)


def replace_expert(url: str, name: str, path: str, token: str | None, timeout: float = 600.0) -> dict:
    """Deploy a new version of `name` from `path` beside the old one, switch to it, drain and delete the old."""
    body = {"path": path}
    return _send(
        "PUT", f"{url.rstrip('/')}/v1/experts/{name}", json=body, headers=_auth(token), timeout=timeout
    )


def remove_expert(url: str, name: str, token: str | None, timeout: float = 600.0) -> dict:
    return _send("DELETE", f"{url.rstrip('/')}/v1/experts/{name}", headers=_auth(token), timeout=timeout)


def publish_gate(url: str, path: str, token: str | None, timeout: float = 120.0) -> dict:
    """PUT /v1/gate: route new requests with the learned gate in `path` (a new registry version)."""
    return _send(
        "PUT", f"{url.rstrip('/')}/v1/gate", json={"path": path}, headers=_auth(token), timeout=timeout
    )

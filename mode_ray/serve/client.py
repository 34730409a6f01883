"""A small HTTP client for a running cluster (what `mode-ray generate --url` and `mode-ray experts` use)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import torch


@dataclass(frozen=True)
class RemoteResult:
    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    labels: list[int]
    seed: int
    trace: list[dict]
    raw: dict


class ClusterError(RuntimeError):
    """The cluster answered with an error status; the message is the server's."""


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            body = response.json()
            detail = body.get("detail") or body.get("error") or body
        except ValueError:
            detail = response.text
        raise ClusterError(f"HTTP {response.status_code}: {detail}")
    return response.json()


def generate_remote(url: str, params: dict, timeout: float = 600.0) -> RemoteResult:
    body = _check(
        httpx.post(f"{url.rstrip('/')}/v1/generate", json={**params, "output": "json"}, timeout=timeout)
    )
    arr = np.frombuffer(base64.b64decode(body["images"]), dtype="<f4").reshape(body["shape"]).copy()
    return RemoteResult(torch.from_numpy(arr), body["labels"], body["seed"], body["trace"], body)


def list_experts(url: str) -> dict:
    return _check(httpx.get(f"{url.rstrip('/')}/v1/experts", timeout=30))


def _auth(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def add_expert(
    url: str, path: str, token: str | None, endpoint: str = "serve", timeout: float = 600.0
) -> dict:
    return _check(
        httpx.post(
            f"{url.rstrip('/')}/v1/experts",
            json={"path": path, "endpoint": endpoint},
            headers=_auth(token),
            timeout=timeout,
        )
    )


def remove_expert(url: str, name: str, token: str | None, timeout: float = 600.0) -> dict:
    return _check(httpx.delete(f"{url.rstrip('/')}/v1/experts/{name}", headers=_auth(token), timeout=timeout))

"""The Python client of a running cluster: `Client` (sync) and `AsyncClient`, over the HTTP API.

    from mode_ray import Client

    with Client("http://127.0.0.1:8000") as c:
        result = c.generate(prompt=7, num_images=4, seed=0)   # a GenerationResult
        images = result.raw()                                # (N, C, H, W) float32 numpy, in [0, 1]
        for item in c.stream(prompt=3, steps=18):            # Progress after every evaluation, then the result
            ...
        c.experts.list(); c.experts.add("my-expert")          # admin calls need token= (MODE_RAY_ADMIN_TOKEN)

Errors are typed, from HTTP statuses and gRPC status codes alike (`error_from_http`, `error_from_grpc`):
`InvalidRequest` (400/404/409/422; INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS), `Unauthorized` (401/403;
UNAUTHENTICATED, PERMISSION_DENIED), `Overloaded` (503; RESOURCE_EXHAUSTED), `DeadlineExceeded` (504;
DEADLINE_EXCEEDED), all `ClusterError`s, as is a cluster that cannot be reached. Only `Overloaded` is retried,
with exponential backoff (`retries`, `backoff_s`): the request was refused before any work, so a retry is safe.
Results are the same `GenerationResult` that in-process generation returns.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from mode_ray.generation import GenerationResult, Progress

__all__ = [
    "AsyncClient",
    "Client",
    "ClusterError",
    "DeadlineExceeded",
    "InvalidRequest",
    "Overloaded",
    "Unauthorized",
    "error_from_grpc",
    "error_from_http",
]


class ClusterError(RuntimeError):
    """The cluster answered with an error, or could not be reached; the message is the server's."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class InvalidRequest(ClusterError):
    """The request itself is wrong (a field, an unknown expert, a name taken): fix it, do not retry."""


class Unauthorized(ClusterError):
    """The admin API is off, or the token is missing or wrong."""


class Overloaded(ClusterError):
    """The cluster refused the request before doing any work (at capacity, or it could not finish in time)."""


class DeadlineExceeded(ClusterError):
    """The request did not finish within its deadline."""


_HTTP = {400: InvalidRequest, 404: InvalidRequest, 409: InvalidRequest, 422: InvalidRequest}
_HTTP |= {401: Unauthorized, 403: Unauthorized, 503: Overloaded, 504: DeadlineExceeded}
_GRPC = {
    "INVALID_ARGUMENT": InvalidRequest,
    "NOT_FOUND": InvalidRequest,
    "ALREADY_EXISTS": InvalidRequest,
    "UNAUTHENTICATED": Unauthorized,
    "PERMISSION_DENIED": Unauthorized,
    "RESOURCE_EXHAUSTED": Overloaded,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
}


def error_from_http(status: int, detail: str) -> ClusterError:
    return _HTTP.get(status, ClusterError)(f"HTTP {status}: {detail}", status)


def error_from_grpc(error: Any) -> ClusterError:
    """The typed error of a `grpc.RpcError` from the cluster's gRPC API (GenerationService, OIP)."""
    code = error.code().name
    return _GRPC.get(code, ClusterError)(f"gRPC {code}: {error.details()}")


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        detail = body.get("detail") or body.get("error") or body if isinstance(body, dict) else body
    except ValueError:
        detail = response.text
    return detail if isinstance(detail, str) else json.dumps(detail)


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise error_from_http(response.status_code, _detail(response))
    return response


def _body(params: dict[str, Any], **fixed: Any) -> dict[str, Any]:
    """The request body: GenerateParams fields (None left out) and the call's own settings."""
    return {**{k: v for k, v in params.items() if v is not None}, **fixed}


def _parse_event(event: str, data: str) -> Progress | GenerationResult:
    from mode_ray.generation import GenerationResult, Progress

    payload = json.loads(data)
    if event == "progress":
        return Progress(int(payload["step"]), int(payload["total"]), float(payload["sigma"]))
    if event == "result":
        return GenerationResult.from_json(payload)
    if event == "error":  # after progress went out: raised with status None, so never retried
        error = error_from_http(int(payload.get("status", 500)), str(payload.get("detail", "")))
        error.status = None
        raise error
    raise ClusterError(f"unexpected event {event!r} in the generation stream")


class _EventParser:
    """Server-sent events from the lines of a text/event-stream body, one line at a time."""

    def __init__(self) -> None:
        self.event, self.data = "message", []  # type: tuple[str, list[str]]

    def feed(self, line: str) -> tuple[str, str] | None:
        """The (event, data) a blank line completes, else None."""
        if line == "":
            done = (self.event, "\n".join(self.data)) if self.data else None
            self.event, self.data = "message", []
            return done
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].lstrip())
        return None


def _token(token: str | None) -> str | None:
    return token if token is not None else os.environ.get("MODE_RAY_ADMIN_TOKEN")


class _Experts:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> dict:
        """{registry_version, gate, experts: [{name, version, endpoint, state, application, card}], warm_pool}"""
        return self._c._json("GET", "/v1/experts")

    def add(self, path: str, endpoint: str = "serve", deployment: dict | None = None) -> dict:
        body = {"path": path, "endpoint": endpoint, **({"deployment": deployment} if deployment else {})}
        return self._c._json("POST", "/v1/experts", json=body, admin=True)

    def replace(self, name: str, path: str) -> dict:
        return self._c._json("PUT", f"/v1/experts/{name}", json={"path": path}, admin=True)

    def remove(self, name: str) -> dict:
        return self._c._json("DELETE", f"/v1/experts/{name}", admin=True)


class Client:
    """A cluster's HTTP API (`url`); `token`: the admin token (default: env MODE_RAY_ADMIN_TOKEN)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        timeout: float = 600.0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        self.url, self.token = url.rstrip("/"), _token(token)
        self.retries, self.backoff_s = retries, backoff_s
        self._http = httpx.Client(base_url=self.url, timeout=timeout)
        self.experts = _Experts(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _headers(self, admin: bool) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if admin and self.token else {}

    def _send(self, method: str, path: str, admin: bool = False, **kw: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                return _checked(self._http.request(method, path, headers=self._headers(admin), **kw))
            except Overloaded:
                if attempt == self.retries:
                    raise
            except httpx.HTTPError as e:
                raise ClusterError(f"cannot reach the cluster at {self.url}: {e}") from None
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, admin: bool = False, **kw: Any) -> Any:
        return self._send(method, path, admin, **kw).json()

    def generate(self, prompt: str | int | None = None, **params: Any) -> GenerationResult:
        """One generation; `params` are the GenerateParams fields (num_images, seed, steps, sampler,
        guidance_scale, top_k, top_p, experts, exclude_experts, ...) and deadline_s, timing, trace."""
        from mode_ray.generation import GenerationResult

        body = _body({"prompt": prompt, **params}, output="json")
        return GenerationResult.from_json(self._json("POST", "/v1/generate", json=body))

    def stream(self, prompt: str | int | None = None, **params: Any) -> Iterator[Progress | GenerationResult]:
        """Progress after every evaluation, then the GenerationResult (server-sent events)."""
        body = _body({"prompt": prompt, **params})
        for attempt in range(self.retries + 1):
            try:
                with self._http.stream("POST", "/v1/generate/stream", json=body) as response:
                    if response.status_code >= 400:
                        response.read()
                        _checked(response)  # refused before it started: only these are retried
                    parser = _EventParser()
                    for line in response.iter_lines():
                        if (done := parser.feed(line)) is not None:
                            yield _parse_event(*done)
                    return
            except Overloaded as e:
                if attempt == self.retries or e.status is None:
                    raise
            except httpx.HTTPError as e:
                raise ClusterError(f"cannot reach the cluster at {self.url}: {e}") from None
            time.sleep(self.backoff_s * 2**attempt)

    def status(self) -> dict:
        """The cluster at a glance: experts (replicas, rows/s, routed share, call p50) and the router."""
        return self._json("GET", "/v1/status")

    def publish_gate(self, path: str) -> dict:
        return self._json("PUT", "/v1/gate", json={"path": path}, admin=True)


class _AsyncExperts:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def list(self) -> dict:
        return await self._c._json("GET", "/v1/experts")

    async def add(self, path: str, endpoint: str = "serve", deployment: dict | None = None) -> dict:
        body = {"path": path, "endpoint": endpoint, **({"deployment": deployment} if deployment else {})}
        return await self._c._json("POST", "/v1/experts", json=body, admin=True)

    async def replace(self, name: str, path: str) -> dict:
        return await self._c._json("PUT", f"/v1/experts/{name}", json={"path": path}, admin=True)

    async def remove(self, name: str) -> dict:
        return await self._c._json("DELETE", f"/v1/experts/{name}", admin=True)


class AsyncClient:
    """`Client` for asyncio: the same methods, awaited (`stream` is an async iterator)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        timeout: float = 600.0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        self.url, self.token = url.rstrip("/"), _token(token)
        self.retries, self.backoff_s = retries, backoff_s
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout)
        self.experts = _AsyncExperts(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _headers(self, admin: bool) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if admin and self.token else {}

    async def _send(self, method: str, path: str, admin: bool = False, **kw: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                return _checked(await self._http.request(method, path, headers=self._headers(admin), **kw))
            except Overloaded:
                if attempt == self.retries:
                    raise
            except httpx.HTTPError as e:
                raise ClusterError(f"cannot reach the cluster at {self.url}: {e}") from None
            await asyncio.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    async def _json(self, method: str, path: str, admin: bool = False, **kw: Any) -> Any:
        return (await self._send(method, path, admin, **kw)).json()

    async def generate(self, prompt: str | int | None = None, **params: Any) -> GenerationResult:
        from mode_ray.generation import GenerationResult

        body = _body({"prompt": prompt, **params}, output="json")
        return GenerationResult.from_json(await self._json("POST", "/v1/generate", json=body))

    async def stream(
        self, prompt: str | int | None = None, **params: Any
    ) -> AsyncIterator[Progress | GenerationResult]:
        body = _body({"prompt": prompt, **params})
        for attempt in range(self.retries + 1):
            try:
                async with self._http.stream("POST", "/v1/generate/stream", json=body) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        _checked(response)  # refused before it started: only these are retried
                    parser = _EventParser()
                    async for line in response.aiter_lines():
                        if (done := parser.feed(line)) is not None:
                            yield _parse_event(*done)
                    return
            except Overloaded as e:
                if attempt == self.retries or e.status is None:
                    raise
            except httpx.HTTPError as e:
                raise ClusterError(f"cannot reach the cluster at {self.url}: {e}") from None
            await asyncio.sleep(self.backoff_s * 2**attempt)

    async def status(self) -> dict:
        return await self._json("GET", "/v1/status")

    async def publish_gate(self, path: str) -> dict:
        return await self._json("PUT", "/v1/gate", json={"path": path}, admin=True)

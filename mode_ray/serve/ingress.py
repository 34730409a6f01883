"""The ingress deployment: HTTP (FastAPI) and gRPC (`mode_ray.v1.GenerationService`) in one class.

It validates at the edge, maps errors to HTTP 4xx/5xx and gRPC status codes, checks the admin token, and
turns results into PNG grids or raw arrays. All generation work happens in the router.
"""

import hmac
import importlib.resources
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Literal, get_args

import grpc
from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import Field, ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from mode_ray import env
from mode_ray.generation import DEFAULT_NUM_IMAGES, GenerateParams, GenerationResult, Progress
from mode_ray.generation.result import TraceMode
from mode_ray.models.card import shown
from mode_ray.proto.inference import grpc_predict_v2_pb2 as oip
from mode_ray.proto.mode_ray.v1 import generation_pb2 as gen
from mode_ray.serve.errors import DeadlineExceeded, GenerationFailed, Overloaded

MAX_DEADLINE_S = 3600.0
PLAYGROUND = (importlib.resources.files("mode_ray.serve") / "static" / "playground.html").read_text("utf-8")
MAX_ATTEMPTS = 3  # a request whose router replica dies runs again, at most this many times in all
ROUTER_LOST = (RayActorError, ActorUnavailableError)  # the replica died (or is unreachable) under the call
log = logging.getLogger("ray.serve")


class StreamFailed(RuntimeError):
    """Ends a GenerateStream with the status code set on its context (see `Ingress.GenerateStream`)."""


api = FastAPI(title="mode_ray", description="Mixture of Diffusion Experts on Ray Serve", version="0.1.0")


class GenerateBody(GenerateParams):
    output: Literal["png", "json"] = Field(
        "png", description="png: an image/png grid; json: base64 arrays + trace"
    )
    deadline_s: float | None = Field(
        None, gt=0, le=MAX_DEADLINE_S, description="fail the request after this many seconds"
    )
    timing: bool = Field(
        False, description="output json: add the router's time breakdown of every evaluation (ms per phase)"
    )
    trace: TraceMode = Field(
        "auto",
        description="output json: the routing trace, 'full' (per image), 'summary' (per step), 'none', or "
        "'auto' (full up to 16384 image-evaluations, else the summary)",
    )


MAX_ERROR_CHARS = 1000  # an error message never echoes a huge input (nor 200,000 unknown keys)


def _field_errors(e: ValidationError | RequestValidationError) -> str:
    errors = e.errors()
    text = ""
    for i, err in enumerate(errors):
        loc = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        got = f" (got {shown(err['input'])})" if "input" in err and not isinstance(err["input"], dict) else ""
        part = f"{'; ' if text else ''}{loc}: {err['msg']}{got}"
        if len(text) + len(part) > MAX_ERROR_CHARS:
            return f"{text}; ... and {len(errors) - i} more error(s)" if text else part[:MAX_ERROR_CHARS]
        text += part
    return text


@api.exception_handler(RequestValidationError)
async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    message = _field_errors(exc)  # "detail" as every other error; "error" as the first API had it
    return JSONResponse(status_code=422, content={"detail": message, "error": message})


# Errors raised in the router arrive as RayTaskError subclasses of the original type.
HTTP_STATUS = [
    (ValidationError, 422),
    (ValueError, 400),
    (FileExistsError, 409),
    (KeyError, 404),
    (Overloaded, 503),
    (BackPressureError, 503),
    (DeadlineExceeded, 504),
    (TimeoutError, 504),
    (GenerationFailed, 502),
]
GRPC_STATUS = [
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (FileExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (KeyError, grpc.StatusCode.NOT_FOUND),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BackPressureError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (GenerationFailed, grpc.StatusCode.UNAVAILABLE),
]


def _message(e: BaseException) -> str:
    cause = getattr(e, "cause", None)  # RayTaskError carries the original exception
    e = cause if isinstance(cause, BaseException) else e
    if isinstance(e, ValidationError):
        return _field_errors(e)
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, BackPressureError):
        return "the router is at capacity (its Serve queue is full); retry later"
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    if len(text) <= MAX_ERROR_CHARS:
        return text
    return f"{text[: MAX_ERROR_CHARS - 20]}... ({len(text)} chars)"  # never echo a huge input


ADMIN_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
}
MAX_ADMIN_BODY_BYTES = 1 << 20


async def _admin_body(request: Request) -> dict:
    """An admin call's JSON object, read only once the token is checked; 413 / 422 naming the problem."""
    raw = await request.body()
    if len(raw) > MAX_ADMIN_BODY_BYTES:
        raise HTTPException(
            413, detail=f"body: {len(raw)} bytes; an admin body is at most {MAX_ADMIN_BODY_BYTES}"
        )
    try:
        body = json.loads(raw)
    except (
        ValueError,
        RecursionError,
    ) as e:  # JSONDecodeError, UnicodeDecodeError, nesting beyond the parser
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise HTTPException(422, detail=f"body: not a JSON object ({reason})") from None
    if not isinstance(body, dict):
        raise HTTPException(422, detail=f"body: expected a JSON object, got {type(body).__name__}")
    return body


def _classify(e: BaseException, table: list) -> Any:
    cause = getattr(e, "cause", None)
    for exc in (e, cause):
        for kind, status in table:
            if isinstance(exc, kind):
                return status
    return None


@serve.ingress(api)  # at definition, so every process that imports this module sees the class-based routes
class Ingress:
    """Serve deployment class; bound to the router's handle by the app builder."""

    def __init__(self, router: Any, default_deadline_s: float = 300.0) -> None:
        self.router = router
        self.default_deadline_s = default_deadline_s
        self.admin_token = env.admin_token()

    # ---- shared ----------------------------------------------------------------------------------
    def _check_admin(self, authorization: str | None) -> None:
        if self.admin_token is None:
            raise HTTPException(
                403, detail="the admin API is off: set MODE_RAY_ADMIN_TOKEN on the cluster to enable it"
            )
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode(
            "utf-8", "surrogateescape"
        )  # any header bytes compare (and fail) cleanly
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.admin_token.encode()):
            raise HTTPException(
                401,
                detail="missing or wrong admin token (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.router, method).remote(*args)
        except Exception as e:  # noqa: BLE001 - mapped to a status below, re-raised when unknown
            status = _classify(e, HTTP_STATUS)
            if status is None:
                raise HTTPException(500, detail=f"internal error: {_message(e)}") from None
            raise HTTPException(status, detail=_message(e)) from None

    async def _generate(
        self, params: dict, deadline_s: float | None, timing: bool, trace: str
    ) -> GenerationResult:
        """router.generate, run again from scratch on another (or a restarted) router replica when the one
        running it dies, within the request's deadline. The seed is fixed here first, so every attempt gives
        the same images; the result says how many attempts it took."""
        params = {**params, "seed": params.get("seed", random.randrange(2**63))}
        budget = deadline_s or self.default_deadline_s
        started = time.monotonic()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            left = deadline_s if attempt == 1 else budget - (time.monotonic() - started)
            try:
                result = await self.router.generate.remote(params, left, timing, trace)
            except ROUTER_LOST as e:
                if attempt == MAX_ATTEMPTS or budget - (time.monotonic() - started) < 0.5:
                    raise GenerationFailed(
                        f"the router replica running this request died ({attempt} attempts): {type(e).__name__}"
                    ) from None
                log.warning("router replica lost under a request (%s); running it again", type(e).__name__)
                continue
            return replace(result, attempts=attempt)
        raise AssertionError("unreachable")

    async def _stream(
        self, params: dict, deadline_s: float | None, trace: str
    ) -> AsyncIterator[Progress | GenerationResult]:
        """router.generate_stream with the retries of `_generate`: Progress after every evaluation, then the
        result (its `attempts` set). A run again starts its progress over; the images are the same."""
        params = {**params, "seed": params.get("seed", random.randrange(2**63))}
        budget = deadline_s or self.default_deadline_s
        started = time.monotonic()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            left = deadline_s if attempt == 1 else budget - (time.monotonic() - started)
            stream = self.router.options(stream=True).generate_stream.remote(params, left, trace)
            finished = False
            try:
                async for item in stream:
                    yield item if isinstance(item, Progress) else replace(item, attempts=attempt)
                finished = True
                return
            except ROUTER_LOST as e:
                if attempt == MAX_ATTEMPTS or budget - (time.monotonic() - started) < 0.5:
                    raise GenerationFailed(
                        f"the router replica running this request died ({attempt} attempts): {type(e).__name__}"
                    ) from None
                log.warning("router replica lost under a stream (%s); running it again", type(e).__name__)
            finally:
                if not finished:  # the client left (or the call failed): the router drops the request
                    stream.cancel()

    # ---- HTTP ------------------------------------------------------------------------------------
    @api.get("/", response_class=HTMLResponse)
    async def playground(self) -> HTMLResponse:
        """The playground page (plain HTML + JS shipped in the package; everything it loads is this API)."""
        return HTMLResponse(PLAYGROUND)

    @api.api_route("/healthz", methods=["GET", "HEAD"])  # load balancers probe with HEAD
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.post("/v1/generate")
    async def generate_http(self, body: GenerateBody) -> Response:
        params = body.model_dump(
            by_alias=True, exclude={"output", "deadline_s", "timing", "trace"}, exclude_none=True
        )
        trace = body.trace if body.output == "json" else "none"  # a PNG reply carries no trace
        try:
            result = await self._generate(params, body.deadline_s, body.timing, trace)
        except Exception as e:  # noqa: BLE001 - mapped to a status, as _call does
            status = _classify(e, HTTP_STATUS)
            raise HTTPException(status or 500, detail=_message(e)) from None
        if body.output == "json":
            return JSONResponse(result.to_json())
        headers = {
            "X-Generation-Id": result.request_id,  # X-Request-Id is Serve's own (its proxy sets it)
            "X-Seed": str(result.seed),
            "X-Dropped-Mass": str(result.dropped_mass),
            "X-Registry-Version": str(result.registry_version),
            "X-Attempts": str(result.attempts),
        }
        if result.cold_starts:  # e.g. "digits-0-6=3.1": the seconds a call waited for the expert to start
            headers["X-Cold-Starts"] = ",".join(f"{k}={v}" for k, v in result.cold_starts.items())
        return Response(result.png(), media_type="image/png", headers=headers)

    @api.post("/v1/generate/stream")
    async def generate_stream_http(self, body: GenerateBody) -> StreamingResponse:
        """Server-sent events: `progress` ({step, total, sigma}) after every evaluation, then `result` (the
        `output: json` body), or `error` ({status, detail}) if the request fails once it has started. A request
        refused before its first evaluation (bad input, overload) is a plain HTTP error instead."""
        params = body.model_dump(
            by_alias=True, exclude={"output", "deadline_s", "timing", "trace"}, exclude_none=True
        )
        items = self._stream(params, body.deadline_s, body.trace).__aiter__()
        try:
            first = await items.__anext__()
        except Exception as e:  # noqa: BLE001 - refused before it started: a status like /v1/generate's
            status = _classify(e, HTTP_STATUS)
            raise HTTPException(status or 500, detail=_message(e)) from None

        def event(item: Progress | GenerationResult) -> str:
            if isinstance(item, Progress):
                data = {"step": item.step, "total": item.total, "sigma": item.sigma}
                return f"event: progress\ndata: {json.dumps(data)}\n\n"
            return f"event: result\ndata: {json.dumps(item.to_json())}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                yield event(first)
                async for item in items:
                    yield event(item)
            except Exception as e:  # noqa: BLE001 - the status line is sent: report it as an event
                data = {"status": _classify(e, HTTP_STATUS) or 500, "detail": _message(e)}
                yield f"event: error\ndata: {json.dumps(data)}\n\n"
            finally:  # also when the client hangs up: the router drops the request
                await items.aclose()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @api.get("/v1/status")
    async def status_http(self) -> dict:
        return await self._call("status")

    @api.get("/v1/experts")
    async def list_experts_http(self) -> dict:
        return await self._call("list_experts")

    @api.post("/v1/experts", openapi_extra=ADMIN_BODY)
    async def add_expert_http(self, request: Request, authorization: str | None = Header(None)) -> dict:
        self._check_admin(authorization)  # before the body is read: no token, no parsing
        return await self._call("add_expert", await _admin_body(request))

    @api.put("/v1/experts/{name}", openapi_extra=ADMIN_BODY)
    async def replace_expert_http(
        self, name: str, request: Request, authorization: str | None = Header(None)
    ) -> dict:
        self._check_admin(authorization)
        return await self._call("replace_expert", name, await _admin_body(request))

    @api.delete("/v1/experts/{name}")
    async def remove_expert_http(self, name: str, authorization: str | None = Header(None)) -> dict:
        self._check_admin(authorization)
        return await self._call("remove_expert", name)

    @api.put("/v1/gate", openapi_extra=ADMIN_BODY)
    async def publish_gate_http(self, request: Request, authorization: str | None = Header(None)) -> dict:
        self._check_admin(authorization)
        return await self._call("publish_gate", await _admin_body(request))

    # ---- gRPC (mode_ray.v1.GenerationService) --------------------------------------------------------
    def _grpc_params(self, request: Any) -> tuple[dict, float | None]:
        params: dict[str, Any] = {"num_images": request.num_images or DEFAULT_NUM_IMAGES}
        if request.prompt:
            params["prompt"] = request.prompt
        for name in ("class_label", "seed", "guidance_scale", "top_k", "top_p", "min_weight"):
            if request.HasField(name):
                params["class" if name == "class_label" else name] = getattr(request, name)
        if request.steps:
            params["steps"] = request.steps
        if request.sampler:
            params["sampler"] = request.sampler
        if request.unconditional:
            params["unconditional"] = request.unconditional
        if request.experts:
            params["experts"] = list(request.experts)
        if request.exclude_experts:
            params["exclude_experts"] = list(request.exclude_experts)
        if request.output not in ("", "png", "raw"):
            raise ValueError(f"output must be 'png' or 'raw', got {request.output[:40]!r}")
        if request.trace not in ("", *get_args(TraceMode)):
            raise ValueError(f"trace must be one of {list(get_args(TraceMode))}, got {request.trace[:40]!r}")
        deadline = request.deadline_s if request.HasField("deadline_s") else None
        if deadline is not None and not 0 < deadline <= MAX_DEADLINE_S:  # NaN fails too
            raise ValueError(f"deadline_s must be in (0, {MAX_DEADLINE_S:g}] seconds, got {deadline!r}")
        GenerateParams.model_validate(params)  # the same field errors as HTTP, before anything is queued
        return params, deadline

    def _grpc_response(self, r: GenerationResult, output: str) -> Any:
        response = gen.GenerateResponse(
            request_id=r.request_id,
            labels=r.labels,
            seconds=r.seconds,
            seed=r.seed,
            dropped_mass=r.dropped_mass,
            registry_version=r.registry_version or 0,
            trace_mode=r.trace_mode,
            attempts=r.attempts,
            cold_starts=r.cold_starts,
        )
        if output == "raw":
            arr = r.raw()
            response.images = arr.tobytes()
            response.shape.extend(arr.shape)
            if r.latents is not None:
                z = r.raw_latents()
                response.latents = z.tobytes()
                response.latent_shape.extend(z.shape)
        else:
            response.png = r.png()
        for t in r.trace:
            step = response.trace.add(step=t.step, sigma=t.sigma)
            for names, weights, dropped in zip(t.experts, t.weights, t.dropped, strict=True):
                step.rows.add(experts=names, weights=weights, dropped_mass=dropped)
        return response

    async def _grpc_fail(self, context: Any, e: BaseException) -> None:
        status = _classify(e, GRPC_STATUS) or grpc.StatusCode.INTERNAL
        context.set_code(status)
        context.set_details(_message(e))

    # The OIP methods of an expert, asked of this application by mistake: UNIMPLEMENTED with the way there
    # (without them Serve answers INTERNAL with a Ray traceback).
    def _not_an_expert(self, grpc_context: Any, response: Any) -> Any:
        grpc_context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        grpc_context.set_details(
            "this is the generation application (mode_ray.v1.GenerationService); an expert answers OIP with "
            "metadata application=expert-<name> (ListExperts or GET /v1/experts lists them)"
        )
        return response

    async def ModelInfer(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return self._not_an_expert(grpc_context, oip.ModelInferResponse())

    async def ModelMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return self._not_an_expert(grpc_context, oip.ModelMetadataResponse())

    async def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return self._not_an_expert(grpc_context, oip.ModelReadyResponse())

    async def Generate(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - gRPC method name
        try:
            params, deadline = self._grpc_params(request)
            result = await self._generate(params, deadline, False, request.trace or "auto")
            return self._grpc_response(result, request.output)
        except Exception as e:  # noqa: BLE001 - every error becomes a gRPC status
            await self._grpc_fail(grpc_context, e)
            return gen.GenerateResponse()

    async def GenerateStream(self, request: Any, grpc_context: Any = None):  # noqa: N802, ANN201
        try:
            params, deadline = self._grpc_params(request)
            async for item in self._stream(params, deadline, request.trace or "auto"):
                if isinstance(item, Progress):
                    yield gen.GenerateProgress(step=item.step, total_steps=item.total, sigma=item.sigma)
                else:
                    result = self._grpc_response(item, request.output)
                    yield gen.GenerateProgress(
                        step=len(item.trace), total_steps=len(item.trace), result=result
                    )
        except Exception as e:  # noqa: BLE001
            # Serve ships the context to the client with each message; after the last one only an exception
            # carries a status code the handler set (gRPCStatusError), so set it, then raise.
            await self._grpc_fail(grpc_context, e)
            raise StreamFailed(_message(e)) from None

    async def ListExperts(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        listing = await self.router.list_experts.remote()
        response = gen.ListExpertsResponse(registry_version=listing["registry_version"])
        for e in listing["experts"]:
            response.experts.add(
                name=e["name"],
                version=e["version"],
                endpoint=e["endpoint"],
                state=e["state"],
                card_json=json.dumps(e["card"]),
            )
        return response

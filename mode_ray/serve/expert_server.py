"""One expert as a Ray Serve deployment speaking the Open Inference Protocol (KServe v2) over gRPC.

`ExpertServer` is a plain class; `expert_application` turns it into a Serve deployment whose resources,
autoscaling and batching come from `ExpertDeployment`. Each expert is its own Serve application named
`expert_app_name(card.name)`, reached through the Serve gRPC proxy with metadata `("application", <app>)`.

The model contract of `ModelInfer` (the names the router sends):

* `x`      FP32 or FP16 `[B, C, H, W]` with `(C, H, W) == card.latent_shape`
* `sigma`  FP32 `[B]`, every value finite and > 0
* `cond`   FP32 `[B, D]`, optional, `D == card.condition.dim` (only when D > 0): the pooled condition
* `cond_tokens` FP32 `[B, L, D]`, optional, only for a text condition with `L == card.condition.tokens > 0`:
  the prompt's token embeddings, zero vectors past its last token (the mask is where a row is non-zero).
  Given without `cond`, or left out (external clients that know only the pooled condition), the missing part
  is zeros; the expert sees the packed `(B, 1 + L, D)` condition of mode_ray.models.conditions.
* output `x0_hat` `[B, C, H, W]` with the datatype of `x` (always computed in float32)

A wrong model name or version gives NOT_FOUND; a malformed request gives INVALID_ARGUMENT whose details
name the field and the offending value. Concurrent calls to one replica are merged by `@serve.batch` into
one forward pass (rows concatenated, results split back); a call without `cond` contributes all-zero
condition rows, which both backbones treat exactly like `cond=None` (the UNet's condition embedding is a
bias-free Linear; the diffusers adapter maps an all-zero row to the null class, as it does for `None`).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch
from ray import serve

from mode_ray import env
from mode_ray.models.card import ExpertCard
from mode_ray.models.checkpoint import Expert, load_card, load_expert
from mode_ray.models.emulated import EmulatedDenoiser
from mode_ray.proto.inference import grpc_predict_v2_pb2 as pb
from mode_ray.proto.mode_ray.v1 import generation_pb2 as gen
from mode_ray.serve.direct import DirectServer
from mode_ray.serve.errors import ExpertCallError
from mode_ray.serve.metrics import ExpertMetrics
from mode_ray.serve.oip import OipError, datatype_of, decode_infer_request, encode_infer_response

__all__ = ["ExpertCallError", "ExpertServer"]

logger = logging.getLogger("ray.serve")

SERVER_NAME = "mode_ray-expert"
INPUT_X, INPUT_SIGMA, INPUT_COND, INPUT_COND_TOKENS, OUTPUT = "x", "sigma", "cond", "cond_tokens", "x0_hat"


def _package_version() -> str:
    try:
        return importlib.metadata.version("mode-ray")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class _Call:
    """One validated ModelInfer call waiting to be merged with others."""

    x: np.ndarray  # (B, C, H, W) float32
    sigma: np.ndarray  # (B,) float32
    cond: np.ndarray | None  # (B, D) or packed (B, 1 + L, D) float32
    arrived: float = field(default_factory=time.perf_counter)  # when it was validated (perf_counter)

    @property
    def rows(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class _Result:
    x0_hat: np.ndarray  # (B, C, H, W) float32
    batch_calls: int  # calls merged into the forward pass that produced it
    batch_rows: int
    forward_s: float = 0.0  # the merged forward pass
    queue_s: float = 0.0  # from validation to the start of that pass (@serve.batch wait + earlier passes)

    def parameters(self) -> dict[str, float | int]:
        """What the OIP response reports of it (the router's per-tick breakdown reads forward_ms)."""
        return {
            "batch_calls": self.batch_calls,
            "batch_rows": self.batch_rows,
            "forward_ms": round(self.forward_s * 1e3, 4),
            "queue_ms": round(self.queue_s * 1e3, 4),
        }


def _cpu_threads() -> int | None:
    """Torch threads for this replica: its Ray CPU allotment (at least 1); None outside a Ray worker."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    except Exception:  # noqa: BLE001 - not in a Ray worker: leave torch alone
        return None
    return max(1, min(int(cpus), os.cpu_count() or 1))


class ExpertServer:
    """OIP v2 gRPC server of one expert (`expert_dir` with `expert.json` + `model.safetensors`).

    Loaded once per replica; `device=None` takes MODE_RAY_DEVICE, else cuda when torch sees a GPU, else cpu.
    `expert_dir=None` starts without an expert (a warm-pool replica, `WarmExpertServer`): it answers
    ServerLive, and ModelReady false, until `_load` gives it one. `direct_host` (in a Serve replica): also
    serve OIP on a port of its own at that host, published for the router's `direct` transport once the
    replica holds an expert (mode_ray.serve.direct).
    """

    def __init__(
        self,
        expert_dir: str | None,
        max_batch_size: int = 64,
        batch_wait_timeout_s: float = 0.002,
        device: str | None = None,
        emulate: dict[str, float] | None = None,
        chunk_rows: int = 128,
        max_call_rows: int = 2048,
        direct_host: str | None = None,
    ) -> None:
        self._expert: Expert | None = None
        self._direct: DirectServer | None = None
        self.name: str | None = None
        self._chunk_rows, self._max_call_rows = chunk_rows, max_call_rows
        self._batching = (max_batch_size, batch_wait_timeout_s)
        self._emulate = emulate
        threads = _cpu_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        if device is None:
            device = env.device()  # MODE_RAY_DEVICE, else cuda when torch sees a GPU
        if device.startswith("cuda") and not torch.cuda.is_available():
            what = "a warm expert replica" if expert_dir is None else f"expert {load_card(expert_dir).name!r}"
            raise RuntimeError(
                f"{what}: device {device!r} was requested but torch sees no GPU "
                "(give the deployment num_gpus > 0, or leave device unset)"
            )
        self.device = torch.device(device)
        # One forward pass at a time, off the replica's event loop so that calls keep queueing meanwhile.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert")
        self._in_serve = _in_serve_replica()
        self._born = time.monotonic()  # replies carry the replica's age: a call older than it waited for it
        # since start, for the autoscaling stats: forward-pass seconds, seconds calls waited for a pass, rows
        self._busy_s, self._wait_s, self._rows = 0.0, 0.0, 0
        self._reported = (time.monotonic(), 0.0, 0.0, 0)
        if direct_host is not None and self._in_serve:
            # Serve runs a constructor on the replica's event loop, where the methods and @serve.batch run
            self._direct = DirectServer(self, direct_host)
            self._direct_task = asyncio.get_running_loop().create_task(self._start_direct())
        if expert_dir is not None:
            self._load(expert_dir)

    async def _start_direct(self) -> None:
        await self._direct.start()
        if self._expert is not None:
            await asyncio.to_thread(self._direct.publish)

    def _load(self, expert_dir: str) -> None:
        """Load the expert in `expert_dir` (card + safetensors) and set up its batch queue and metrics."""
        started = time.perf_counter()
        expert = load_expert(expert_dir, device=self.device)
        if self._emulate is not None:  # benchmarks: a fixed-latency stand-in with the same card
            expert = Expert(expert.card, EmulatedDenoiser(**self._emulate))
        self.card: ExpertCard = expert.card
        self._cond_dim = self.card.condition.dim
        self._cond_shape = self.card.condition.shape  # (), (D,) or (1 + L, D)
        self._tokens = self.card.condition.tokens
        self._latent_shape = tuple(self.card.latent_shape)
        # @serve.batch wrapped per instance (not on the class): the batch queue of a class-level decorator is
        # shared by every instance in the process, which would mix two experts' calls in local testing mode.
        # Its parameters stay adjustable through the documented setters.
        max_batch_size, batch_wait_timeout_s = self._batching
        if self._in_serve:
            self._infer_batch = serve.batch(
                max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s
            )(self._forward_calls)
        else:  # mode_ray.serve.standalone: serve.batch needs a replica context, so calls run one by one
            self._infer_batch = self._forward_one
        self._metrics = ExpertMetrics(self.card.name, self._in_serve)  # no-ops in mode_ray.serve.standalone
        self.name = self.card.name
        self._expert = expert  # last: the replica reports ready from here on
        if self._direct is not None:
            self._direct.publish()  # a no-op until its server has started (which then publishes)
        logger.info(
            "expert %r v%s loaded from %s on %s in %.2fs (torch threads %d, max_batch_size %d, wait %.4fs)",
            self.name,
            self.card.version,
            expert_dir,
            self.device,
            time.perf_counter() - started,
            torch.get_num_threads(),
            max_batch_size,
            batch_wait_timeout_s,
        )

    def _unloaded(self) -> ExpertCallError | None:
        """UNAVAILABLE while this (warm) replica has no expert yet."""
        if self._expert is not None:
            return None
        return ExpertCallError(
            "this warm expert replica has no expert yet (the router assigns one on hot-add)",
            grpc.StatusCode.UNAVAILABLE,
        )

    # ------------------------------------------------------------------------------------------------------
    # batching parameters and metrics

    def set_batching(
        self, max_batch_size: int | None = None, batch_wait_timeout_s: float | None = None
    ) -> None:
        """Change the @serve.batch parameters of this replica."""
        if max_batch_size is not None:
            self._infer_batch.set_max_batch_size(max_batch_size)
        if batch_wait_timeout_s is not None:
            self._infer_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def batching(self) -> dict[str, float]:
        """The @serve.batch parameters in effect."""
        return {
            "max_batch_size": self._infer_batch._get_max_batch_size(),
            "batch_wait_timeout_s": self._infer_batch._get_batch_wait_timeout_s(),
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics (read by mode_ray.serve.autoscaling.LoadPolicy) since the last
        report: `busy`, forward-pass seconds per wall second (0..1); `load`, that plus the seconds calls
        waited for a pass per wall second (the calls this replica holds on average: above 1 when calls
        queue); `rows_per_s`."""
        now = time.monotonic()
        at, busy, wait, rows = self._reported
        self._reported = (now, self._busy_s, self._wait_s, self._rows)
        dt = max(now - at, 1e-6)
        b = min(1.0, (self._busy_s - busy) / dt)
        return {"busy": b, "load": b + (self._wait_s - wait) / dt, "rows_per_s": (self._rows - rows) / dt}

    def _age_ms(self) -> float:
        return round((time.monotonic() - self._born) * 1e3, 3)

    # ------------------------------------------------------------------------------------------------------
    # health

    def check_health(self) -> None:
        """Called periodically by Serve; raising marks the replica unhealthy (it is then replaced)."""
        if self._expert is None or self._expert.denoiser is None:
            raise RuntimeError("expert model is not loaded")

    def __del__(self) -> None:
        direct = getattr(self, "_direct", None)
        if direct is not None:  # Serve stops this replica: routers stop calling it directly
            direct.unpublish()
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------------------
    # OIP v2 methods (names match grpc_predict_v2.proto; Serve passes `grpc_context` by keyword)

    async def ServerLive(self, request: pb.ServerLiveRequest, grpc_context=None) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, grpc_context=None) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._expert is not None)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, grpc_context=None
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=_package_version())

    async def ModelReady(self, request: pb.ModelReadyRequest, grpc_context=None) -> pb.ModelReadyResponse:
        ready = (
            self._expert is not None
            and request.name == self.name
            and request.version in ("", self.card.version)
        )
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, grpc_context=None
    ) -> pb.ModelMetadataResponse:
        try:
            self._check_model(request.name, request.version, "name")
        except ExpertCallError as e:
            return self._fail(grpc_context, e, pb.ModelMetadataResponse)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        chw = list(self._latent_shape)
        inputs = [
            tensor(name=INPUT_X, datatype="FP32", shape=[-1, *chw]),
            tensor(name=INPUT_SIGMA, datatype="FP32", shape=[-1]),
        ]
        if self._cond_dim > 0:
            inputs.append(tensor(name=INPUT_COND, datatype="FP32", shape=[-1, self._cond_dim]))
        if self._tokens > 0:
            inputs.append(
                tensor(name=INPUT_COND_TOKENS, datatype="FP32", shape=[-1, self._tokens, self._cond_dim])
            )
        return pb.ModelMetadataResponse(
            name=self.name,
            versions=[self.card.version],
            platform=f"pytorch_{self.card.backbone}",
            inputs=inputs,
            outputs=[tensor(name=OUTPUT, datatype="FP32", shape=[-1, *chw])],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, grpc_context=None) -> pb.ModelInferResponse:
        try:
            self._check_model(request.model_name, request.model_version, "model_name")
            call, out_dtype = self._validate(request)
        except ExpertCallError as e:
            return self._fail(grpc_context, e, pb.ModelInferResponse)
        if call.rows == 0:
            result = _Result(np.zeros((0, *self._latent_shape), np.float32), 0, 0)
        else:
            result = await self._run(call)
            try:
                _check_finite(result.x0_hat, call, self.name)
            except ExpertCallError as e:
                return self._fail(grpc_context, e, pb.ModelInferResponse)
        return encode_infer_response(
            self.name,
            self.card.version,
            {OUTPUT: result.x0_hat.astype(out_dtype, copy=False)},
            request.id,
            parameters={**result.parameters(), "age_ms": self._age_ms()},
        )

    async def infer_arrays(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, float | int]]:
        """The router's DeploymentHandle transport: the same inputs, validation and @serve.batch merging as
        ModelInfer, without protobuf; numpy arrays travel through Ray's object store. Returns x0_hat (in x's
        dtype) and the parameters ModelInfer would report. An invalid input raises ExpertCallError."""
        call, out_dtype = self._check_inputs(inputs)
        if call.rows == 0:
            return np.zeros((0, *self._latent_shape), out_dtype), {}
        result = await self._run(call)
        _check_finite(result.x0_hat, call, self.name)
        return result.x0_hat.astype(out_dtype, copy=False), {**result.parameters(), "age_ms": self._age_ms()}

    async def _run(self, call: _Call) -> _Result:
        """A call of up to chunk_rows rows is one item of the @serve.batch queue; a larger one (a direct OIP
        client) goes through it in chunks, one after another, so calls arriving meanwhile join the next chunk's
        forward pass instead of waiting for the whole call."""
        size = self._chunk_rows
        if call.rows <= size:
            return await self._infer_batch(call)
        parts = []
        for a in range(0, call.rows, size):
            cond = None if call.cond is None else call.cond[a : a + size]
            parts.append(await self._infer_batch(_Call(call.x[a : a + size], call.sigma[a : a + size], cond)))
        return _Result(
            np.concatenate([p.x0_hat for p in parts]),
            max(p.batch_calls for p in parts),
            max(p.batch_rows for p in parts),
            sum(p.forward_s for p in parts),
            sum(p.queue_s for p in parts),
        )

    def _who(self) -> str:
        return f"expert {self.name!r}" if self.name is not None else "a warm-pool replica with no expert yet"

    async def __call__(self, request: Any) -> Any:
        """HTTP to this expert's Serve route (`/experts/...`): a 404 with the way to it (without this method
        Serve answers a bare 500). An expert speaks OIP over gRPC only."""
        from starlette.responses import JSONResponse

        return JSONResponse(
            {
                "detail": f"not found: this is the Serve application of {self._who()}, which answers "
                "OIP v2 over gRPC only (inference.GRPCInferenceService, metadata application=<its "
                "application>, see GET /v1/experts); the HTTP API is /v1/generate"
            },
            status_code=404,
        )

    # The generation API asked of an expert by mistake: UNIMPLEMENTED with the way there (without these
    # methods Serve answers INTERNAL with a Ray traceback).
    def _not_generation(self, grpc_context: Any, response: Any) -> Any:
        error = ExpertCallError(
            f"this is {self._who()} (inference.GRPCInferenceService); generation is "
            "mode_ray.v1.GenerationService with metadata application=mode-ray",
            grpc.StatusCode.UNIMPLEMENTED,
        )
        return self._fail(grpc_context, error, lambda: response)

    async def Generate(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return self._not_generation(grpc_context, gen.GenerateResponse())

    async def ListExperts(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return self._not_generation(grpc_context, gen.ListExpertsResponse())

    # ------------------------------------------------------------------------------------------------------
    # validation

    @staticmethod
    def _fail(grpc_context: Any, error: ExpertCallError, response_type: Callable[[], Any]) -> Any:
        if grpc_context is None:
            raise error
        grpc_context.set_code(error.code)
        grpc_context.set_details(error.details)
        return response_type()

    def _check_model(self, name: str, version: str, field: str) -> None:
        if (unloaded := self._unloaded()) is not None:
            raise unloaded
        # An empty name in ModelMetadata means this server's only model; ModelInfer must name it.
        if name != self.name and (name or field == "model_name"):
            raise ExpertCallError(
                f"{field}: unknown model {name!r}; this server serves {self.name!r}",
                grpc.StatusCode.NOT_FOUND,
            )
        if version and version != self.card.version:
            raise ExpertCallError(
                f"model_version: {self.name!r} has no version {version!r}; it has [{self.card.version!r}]",
                grpc.StatusCode.NOT_FOUND,
            )

    def _validate(self, request: pb.ModelInferRequest) -> tuple[_Call, np.dtype]:
        def bad(message: str) -> ExpertCallError:
            return ExpertCallError(message, grpc.StatusCode.INVALID_ARGUMENT)

        for i, out in enumerate(request.outputs):
            if out.name != OUTPUT:
                raise bad(f"outputs[{i}]: unknown output {out.name!r}; the only output is {OUTPUT!r}")
        try:
            inputs = decode_infer_request(request)
        except OipError as e:
            raise bad(str(e)) from None
        return self._check_inputs(inputs)

    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> tuple[_Call, np.dtype]:
        """Validate decoded inputs (from OIP or a DeploymentHandle call); the output dtype is x's."""
        if (unloaded := self._unloaded()) is not None:
            raise unloaded

        def bad(message: str) -> ExpertCallError:
            return ExpertCallError(message, grpc.StatusCode.INVALID_ARGUMENT)

        allowed: tuple[str, ...] = (INPUT_X, INPUT_SIGMA)
        if self._cond_dim > 0:
            allowed += (INPUT_COND, INPUT_COND_TOKENS) if self._tokens > 0 else (INPUT_COND,)
        extra = [name for name in inputs if name not in allowed]
        if extra:
            raise bad(f"inputs: unexpected input {extra[0]!r}; expert {self.name!r} takes {list(allowed)}")

        x = inputs.get(INPUT_X)
        if x is None:
            raise bad(f"inputs: missing input {INPUT_X!r} (FP32 or FP16 [B, {_dims(self._latent_shape)}])")
        if x.dtype not in (np.float32, np.float16):
            raise bad(f"inputs 'x': datatype {_oip_name(x)}, expected FP32 or FP16")
        if x.ndim != 4 or tuple(x.shape[1:]) != self._latent_shape:
            raise bad(f"inputs 'x': shape {list(x.shape)}, expected [B, {_dims(self._latent_shape)}]")
        rows = x.shape[0]
        if rows > self._max_call_rows:
            raise bad(
                f"inputs 'x': {rows} rows in one call; this expert takes at most {self._max_call_rows} "
                "(split the call)"
            )
        finite_x = np.isfinite(x)
        if not finite_x.all():
            where = tuple(int(i) for i in np.argwhere(~finite_x)[0])
            raise bad(f"inputs 'x': x{list(where)} = {float(x[where])!r} is not finite")

        sigma = inputs.get(INPUT_SIGMA)
        if sigma is None:
            raise bad(f"inputs: missing input {INPUT_SIGMA!r} (FP32 [B])")
        if sigma.dtype != np.float32:
            raise bad(f"inputs 'sigma': datatype {_oip_name(sigma)}, expected FP32")
        if sigma.shape != (rows,):
            raise bad(f"inputs 'sigma': shape {list(sigma.shape)}, expected [{rows}] (one per row of 'x')")
        invalid = ~(np.isfinite(sigma) & (sigma > 0))
        if invalid.any():
            i = int(np.argmax(invalid))
            raise bad(f"inputs 'sigma': sigma[{i}] = {float(sigma[i])!r}; every sigma must be finite and > 0")

        cond = _check_cond(inputs.get(INPUT_COND), INPUT_COND, (rows, self._cond_dim), bad)
        if self._tokens > 0:
            token_emb = _check_cond(
                inputs.get(INPUT_COND_TOKENS), INPUT_COND_TOKENS, (rows, self._tokens, self._cond_dim), bad
            )
            if cond is not None or token_emb is not None:  # pack (B, 1 + L, D); a missing part is zeros
                packed = np.zeros((rows, *self._cond_shape), np.float32)
                if cond is not None:
                    packed[:, 0] = cond
                if token_emb is not None:
                    packed[:, 1:] = token_emb
                cond = packed
        return _Call(x.astype(np.float32, copy=False), sigma, cond), x.dtype

    # ------------------------------------------------------------------------------------------------------
    # the merged forward pass

    async def _forward_one(self, call: _Call) -> _Result:
        return (await self._forward_calls([call]))[0]

    async def _forward_calls(self, calls: list[_Call]) -> list[_Result]:
        """@serve.batch target: concatenate the rows of all calls, one forward pass, split back."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        out = await loop.run_in_executor(self._executor, self._forward, calls)
        forward_s = time.perf_counter() - started
        total = out.shape[0]
        self._busy_s += forward_s
        self._wait_s += sum(started - c.arrived for c in calls)
        self._rows += total
        self._metrics.answered_calls_total.inc(len(calls))
        self._metrics.rows_total.inc(total)
        self._metrics.batch_rows.observe(total)
        self._metrics.batch_calls.observe(len(calls))
        bounds = np.cumsum([c.rows for c in calls])[:-1]
        return [
            _Result(part, len(calls), total, forward_s, started - c.arrived)
            for part, c in zip(np.split(out, bounds), calls, strict=True)
        ]

    def _forward(self, calls: list[_Call]) -> np.ndarray:
        """Runs in the executor thread. float32 in and out, (sum of rows, C, H, W)."""
        if len(calls) == 1:
            x, sigma, cond = calls[0].x, calls[0].sigma, calls[0].cond
        else:
            x = np.concatenate([c.x for c in calls])
            sigma = np.concatenate([c.sigma for c in calls])
            if all(c.cond is None for c in calls):
                cond = None
            else:  # all-zero rows for cond-less calls: exactly cond=None for those rows (see module doc)
                cond = np.concatenate(
                    [
                        c.cond if c.cond is not None else np.zeros((c.rows, *self._cond_shape), np.float32)
                        for c in calls
                    ]
                )
        with torch.inference_mode():
            xt = torch.from_numpy(x).to(self.device)
            st = torch.from_numpy(sigma).to(self.device)
            ct = torch.from_numpy(cond).to(self.device) if cond is not None else None
            out = self._expert.denoiser(xt, st, ct)
            if tuple(out.shape) != tuple(xt.shape):
                raise RuntimeError(
                    f"expert {self.name!r}: denoiser gave shape {list(out.shape)} for input {list(xt.shape)}"
                )
            return out.to(device="cpu", dtype=torch.float32).numpy()


ORDINARY = 1e4  # |x| <= ORDINARY * (1 + sigma) and |cond| <= ORDINARY: inputs a denoiser must stay finite on


def _check_finite(x0_hat: np.ndarray, call: _Call, name: str | None) -> None:
    """Never an OK reply carrying NaN or inf. A non-finite x0_hat for extreme inputs (|x| near the float32
    limit) is INVALID_ARGUMENT naming the row; for ordinary ones (x = data + noise of scale sigma) the model
    itself is broken (e.g. NaN weights): INTERNAL. Rows are independent, so only this call's rows count."""
    finite = np.isfinite(x0_hat)
    if finite.all():
        return
    row = int(np.argwhere(~finite)[0][0])
    x_max, sigma = float(np.abs(call.x[row]).max()), float(call.sigma[row])
    c_max = 0.0 if call.cond is None else float(np.abs(call.cond[row]).max())
    where = f"row {row} (max |x| {x_max:.3g}, sigma {sigma:.3g}, max |cond| {c_max:.3g})"
    if x_max > ORDINARY * (1 + sigma) or c_max > ORDINARY:
        raise ExpertCallError(
            f"inputs: {where} gives a non-finite x0_hat: the inputs are beyond the model's numeric range (a "
            f"denoiser's x is data + noise of scale sigma; |x| <= {ORDINARY:g} (1 + sigma) and |cond| <= "
            f"{ORDINARY:g} stay finite)",
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    raise ExpertCallError(
        f"expert {name!r}: the forward pass gave a non-finite x0_hat for ordinary inputs, {where}: the model is "
        "broken (e.g. NaN weights)",
        grpc.StatusCode.INTERNAL,
    )


def _check_cond(
    value: np.ndarray | None, name: str, shape: tuple[int, ...], bad: Callable[[str], ExpertCallError]
) -> np.ndarray | None:
    """A condition input: FP32 of `shape` with every value finite; None when absent."""
    if value is None:
        return None
    if value.dtype != np.float32:
        raise bad(f"inputs {name!r}: datatype {_oip_name(value)}, expected FP32")
    if value.shape != shape:
        raise bad(f"inputs {name!r}: shape {list(value.shape)}, expected {list(shape)}")
    finite = np.isfinite(value)
    if not finite.all():
        where = [int(i) for i in np.argwhere(~finite)[0]]
        raise bad(f"inputs {name!r}: {name}{where} = {float(value[tuple(where)])!r} is not finite")
    return value


def _dims(shape: tuple[int, ...]) -> str:
    return ", ".join(str(d) for d in shape)


def _oip_name(arr: np.ndarray) -> str:
    try:
        return datatype_of(arr.dtype)
    except OipError:
        return str(arr.dtype)


def _in_serve_replica() -> bool:
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except RayServeException:
        return False
    return True

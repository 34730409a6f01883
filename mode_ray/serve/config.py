"""Validated configuration of the serving stack: the `build_app(args)` arguments of the Serve YAML, the CLI's
`serve` flags and the admin API's add-expert body all land here. Replica counts and resources come from
this config, never from decorators."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from mode_ray import env
from mode_ray.models.strict import NoBooleanNumbers
from mode_ray.serve.autoscaling import POLICY as LOAD_POLICY

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "pretrained" / "mnist"
APP_NAME = "mode-ray"
GRPC_SERVICER_FUNCTIONS = [
    "mode_ray.proto.inference.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server",
    "mode_ray.proto.mode_ray.v1.generation_pb2_grpc.add_GenerationServiceServicer_to_server",
]


def expert_app_name(name: str) -> str:
    """The Serve application (and gRPC `application` metadata) of an expert."""
    return f"expert-{name}"


def expert_deployment_name(name: str) -> str:
    """The Serve deployment inside the expert's application."""
    return f"Expert-{name}"


WARM_PREFIX = "expert-pool-"


def is_warm_app(app: str) -> bool:
    """A warm-pool application (mode_ray.serve.warm_pool), free or serving the expert assigned to it."""
    return app.startswith(WARM_PREFIX)


def check_servable_name(name: str) -> None:
    """A ValueError when expert `name` would take a Serve application name the cluster reserves: the warm
    pool's `expert-pool-<id>` and a replacement version's `expert-<name>--v<version>`."""
    if expert_app_name(name).startswith(WARM_PREFIX):
        raise ValueError(
            f"path: the card's name {name!r} starts with 'pool-', which names the warm pool's Serve "
            "applications (expert-pool-<id>); rename the expert"
        )
    if "--" in name:
        raise ValueError(
            f"path: the card's name {name!r} contains '--', which names replacement versions' Serve "
            "applications (expert-<name>--v<version>); rename the expert"
        )


def expert_deployment_of(app: str, name: str) -> str:
    """The deployment inside expert application `app` serving expert `name` (a warm one is named after its
    application, since it was deployed before the expert was known)."""
    return expert_deployment_name(app.removeprefix("expert-") if is_warm_app(app) else name)


def expert_route_prefix(name: str) -> str:
    return f"/experts/{name}"


class EmulatedLatency(NoBooleanNumbers):
    """Benchmarks only: the expert answers after base_ms + per_row_ms * rows with a cheap deterministic
    output (mode_ray.models.emulated), modelling a GPU expert so the router's own ceiling is measured."""

    model_config = ConfigDict(extra="forbid")
    base_ms: float = Field(2.0, ge=0, le=10_000)
    per_row_ms: float = Field(0.01, ge=0, le=1_000)


class ExpertDeployment(NoBooleanNumbers):
    """Resources, autoscaling and batching of one expert deployment."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs per replica; fractions pack small experts on one GPU"
    )
    min_replicas: int = Field(
        1,
        ge=0,
        description="0: scale to zero when idle (after downscale_to_zero_delay_s); a call to it then waits for a "
        "replica to start (bounded by the router's call_timeout_s and the request's deadline) and the reply's "
        "cold_starts says so",
    )
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_load: float = Field(
        1.0,
        gt=0,
        le=64,
        description="autoscaling target (mode_ray.serve.autoscaling): calls a replica holds on average, running "
        "or waiting, measured in time; 1 matches replicas to the calls that overlap, below 1 leaves headroom. "
        "Serve's queue-length estimate still applies when it asks for more",
    )
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0, description="Serve: how long a scale-up decision must hold")
    downscale_delay_s: float = Field(
        600.0, ge=0, description="Serve: how long a scale-down decision must hold"
    )
    downscale_to_zero_delay_s: float | None = Field(
        None,
        ge=0,
        description="Serve: how long before the last replica goes (min_replicas 0); default downscale_delay_s",
    )
    look_back_period_s: float = Field(
        30.0, gt=0, description="Serve: the window the metrics are averaged over"
    )
    metrics_interval_s: float = Field(
        10.0, gt=0, description="Serve: how often replicas report their metrics"
    )
    max_ongoing_requests: int = Field(64, ge=1, description=">= max_batch_size, or Serve never fills a batch")
    max_queued_requests: int = Field(256, ge=-1, description="-1: unbounded")
    max_batch_size: int = Field(64, ge=1, description="@serve.batch: calls merged into one forward pass")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        description="@serve.batch wait for more calls; 0: the router already merges each tick into one call "
        "per expert, and calls that arrive during a forward pass are still merged into the next",
    )
    chunk_rows: int = Field(
        128,
        ge=1,
        description="a call of more rows goes through the batch queue in chunks of this size, so that one large "
        "direct OIP call cannot hold the expert while other calls wait",
    )
    max_call_rows: int = Field(
        2048,
        ge=1,
        description="a call of more rows is refused (INVALID_ARGUMENT), >= the router's max_rows_per_call",
    )
    device: str | None = Field(
        None,
        pattern=r"^(cpu|cuda(:[0-9]{1,2})?)$",
        description="'cpu', 'cuda' or 'cuda:N'; default: MODE_RAY_DEVICE, else cuda when the replica has a GPU",
    )
    graceful_shutdown_timeout_s: float = Field(
        5.0,
        ge=0,
        le=600,
        description="how long a stopping replica may finish its calls (the router drains an expert before it "
        "deletes it, so calls are short; Serve's default of 20 s made every removal take 20 s)",
    )
    emulate: EmulatedLatency | None = Field(None, description="benchmarks: a fixed-latency stand-in expert")
    direct_host: str | None = Field(
        None,
        pattern=r"^(node|[0-9A-Za-z.:\-]{1,253})$",
        description="each replica also serves OIP on a port of its own at this address, for the router's "
        "'direct' transport: 'node' (the Ray node's IP: reachable from every node), an IP, or '0.0.0.0'; "
        "None: off. The router sets 'node' for the experts it deploys when router.transport is 'direct'",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources per replica, e.g. {'accelerator_type:H100': 0.01}",
    )

    @model_validator(mode="after")
    def _replicas(self) -> ExpertDeployment:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        return self

    def deployment_options(self, name: str) -> dict[str, Any]:
        """Keyword arguments for `serve.deployment(...).options(...)`."""
        autoscaling = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
            "metrics_interval_s": self.metrics_interval_s,
            "policy": {
                "policy_function": LOAD_POLICY,
                "policy_kwargs": {"target_load": self.target_load},
            },
        }
        if self.downscale_to_zero_delay_s is not None:
            autoscaling["downscale_to_zero_delay_s"] = self.downscale_to_zero_delay_s
        if self.initial_replicas is not None:
            autoscaling["initial_replicas"] = self.initial_replicas
        return {
            "name": expert_deployment_name(name),
            "autoscaling_config": autoscaling,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "ray_actor_options": {
                "num_cpus": self.num_cpus,
                "num_gpus": self.num_gpus,
                "resources": self.resources,
            },
        }


class RouterOptions(NoBooleanNumbers):
    """The step engine of the router deployment."""

    model_config = ConfigDict(extra="forbid")
    max_active_requests: int = Field(
        64, ge=1, description="requests stepping at once; others wait in the queue"
    )
    max_queued_requests: int = Field(
        256, ge=0, description="beyond this, new requests are refused (HTTP 503)"
    )
    max_rows_per_call: int = Field(512, ge=1, description="rows sent to one expert in one ModelInfer call")
    tick_rows: int = Field(
        8,
        ge=1,
        description="model rows (images x guidance branches) of large requests per tick while a small request "
        "(at most this many rows per evaluation) is active: small requests keep their pace beside large ones. "
        "A tick costs a fixed part plus a part per row; set it near fixed / per-row cost (8 on CPU experts, "
        "~200 on an H200)",
    )
    max_tick_rows: int = Field(
        64,
        ge=1,
        description="model rows of large requests per tick when no small request is active (full batch)",
    )
    lane_images: int = Field(
        2,
        ge=1,
        description="a large request advances in lanes of at most this many images (its unit in a tick)",
    )
    max_request_rows: int = Field(
        1 << 20,
        ge=1,
        description="refuse (HTTP 400) a request of more model rows (images x evaluations x guidance branches); "
        "the default admits 256 images x 1000 Heun steps with guidance",
    )
    continuous_batching: bool = Field(
        True, description="merge the rows of all active requests per expert per tick"
    )
    call_timeout_s: float = Field(
        30.0, gt=0, description="one expert call; retried once, then the expert is dropped"
    )
    default_deadline_s: float = Field(
        300.0, gt=0, description="per-request deadline unless the request sets one"
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs of each router replica (gate + combine + sampler)")
    num_replicas: int = Field(
        1,
        ge=1,
        le=64,
        description="router replicas, each with its own step engine, sharing one registry (an actor); a request "
        "whose replica dies runs again on another",
    )
    cohorts: int = Field(
        1,
        ge=1,
        le=4,
        description="tick loops out of phase: while one cohort of requests awaits its experts, the router "
        "prepares the next (more calls per tick, less expert idle time)",
    )
    offload: bool = Field(
        True,
        description="run the gate, plan and combine in a worker thread (for ticks of more than one lane), off "
        "the event loop that admits requests and sends and receives expert calls",
    )
    fp16_wire: bool = Field(False, description="send x as FP16 to experts (halves bytes; not bit-exact)")
    transport: Literal["grpc", "handle", "direct"] = Field(
        "direct",
        description="how the router reaches experts deployed here: 'grpc' (OIP through the Serve gRPC proxy), "
        "'handle' (Serve DeploymentHandle, numpy over Ray's object store) or 'direct' (OIP straight to each "
        "replica's own port, rows balanced by rows in flight; the handle until a replica publishes its port); "
        "external endpoints are gRPC",
    )


class DecoderOptions(NoBooleanNumbers):
    """Where a latent mixture's decoder runs (ignored for a pixel-space mixture, which has none)."""

    model_config = ConfigDict(extra="forbid")
    placement: Literal["deployment", "router"] = Field(
        "deployment",
        description="'deployment': its own Serve deployment `Decoder` (on a GPU share when num_gpus > 0), "
        "shared by every router replica, merging concurrent requests' latents; 'router': in each router "
        "replica's process, in a worker thread (no extra replica)",
    )
    num_replicas: int = Field(1, ge=1, le=64)
    num_cpus: float = Field(1.0, ge=0, description="CPUs per decoder replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per decoder replica")
    device: str | None = Field(
        None,
        pattern=r"^(cpu|cuda(:[0-9]{1,2})?)$",
        description="'cpu', 'cuda' or 'cuda:N'; default: MODE_RAY_DEVICE, else cuda when the replica has a GPU",
    )
    max_batch_size: int = Field(8, ge=1, description="@serve.batch: concurrent requests decoded together")
    chunk_images: int = Field(16, ge=1, description="images per decoder pass (a VAE's activations are large)")

    def deployment_options(self) -> dict[str, Any]:
        return {
            "name": "Decoder",
            "num_replicas": self.num_replicas,
            "max_ongoing_requests": 4 * self.max_batch_size,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }


class IngressOptions(NoBooleanNumbers):
    """The HTTP + gRPC front deployment (stateless: scale it freely)."""

    model_config = ConfigDict(extra="forbid")
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.1, ge=0)
    max_ongoing_requests: int = Field(1024, ge=1)
    max_queued_requests: int = Field(
        1024, ge=-1, description="requests Serve's proxies queue for a busy ingress, then 503 (-1: unbounded)"
    )


class AppArgs(NoBooleanNumbers):
    """Arguments of `mode_ray.serve.app:build_app` (Serve YAML `args:`) and of `mode-ray serve`."""

    model_config = ConfigDict(extra="forbid")
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="mixture directory the cluster starts with")
    expert_root: Path | None = Field(None, description="hot-added experts must live under this directory")
    state_dir: Path = Field(default_factory=env.state_dir, description="where the registry is persisted")
    grpc_target: str = Field(
        "127.0.0.1:9000", description="the Serve gRPC proxy the router calls experts through"
    )
    expert: ExpertDeployment = Field(default_factory=ExpertDeployment)
    expert_overrides: dict[str, ExpertDeployment] = Field(
        default_factory=dict, description="per-expert deployment settings (placement, GPUs), by expert name"
    )
    router: RouterOptions = Field(default_factory=RouterOptions)
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    decoder: DecoderOptions = Field(default_factory=DecoderOptions)
    restore: bool = Field(True, description="re-deploy the experts recorded in state_dir on start")
    warm_pool: int = Field(
        0,
        ge=0,
        le=16,
        description="idle expert replicas (Serve applications of the default `expert` deployment) kept started: "
        "a hot-add with the default deployment loads its weights into one (about a second) instead of starting "
        "a replica process (seconds to tens of seconds); refilled in the background. Each holds the default "
        "deployment's CPUs/GPUs while it waits",
    )

    def deployment_for(self, name: str) -> ExpertDeployment:
        return self.expert_overrides.get(name, self.expert)

    @model_validator(mode="after")
    def _root(self) -> AppArgs:
        if self.expert_root is None:
            self.expert_root = self.model_dir / "experts"
        if self.router.max_tick_rows < self.router.tick_rows:
            raise ValueError(
                f"router.max_tick_rows ({self.router.max_tick_rows}) must be >= router.tick_rows "
                f"({self.router.tick_rows})"
            )
        for name, d in [
            ("expert", self.expert),
            *((f"expert_overrides.{k}", v) for k, v in self.expert_overrides.items()),
        ]:
            if d.max_call_rows < self.router.max_rows_per_call:
                raise ValueError(
                    f"{name}.max_call_rows ({d.max_call_rows}) must be >= router.max_rows_per_call "
                    f"({self.router.max_rows_per_call}), or the router's own calls are refused"
                )
        return self

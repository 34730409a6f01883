"""Application builders. `build_app(args)` is the `import_path` of the Serve YAML (`mode_ray.serve.app:build_app`)
and what `mode-ray serve` runs: the `mode-ray` application (ingress + router) at route prefix `/`. The
router then deploys one `expert-<name>` application per registered expert. A latent mixture's decoder is a
third deployment of the app (`Decoder`) unless `decoder.placement` is "router"."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from mode_ray.generation.bundle import load_config
from mode_ray.models.card import format_validation_error
from mode_ray.serve.config import AppArgs
from mode_ray.serve.decoder_server import DecoderServer
from mode_ray.serve.ingress import Ingress
from mode_ray.serve.router import Router

ROUTER_HEADROOM = 16  # router calls beyond the engine's capacity: listing, stats, admin


def validate_args(args: dict[str, Any] | AppArgs) -> AppArgs:
    if isinstance(args, AppArgs):
        return args
    try:
        return AppArgs.model_validate(args or {})
    except ValidationError as e:
        raise ValueError(f"invalid mode_ray app args: {format_validation_error(e, 'args')}") from None


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    """Ingress (HTTP + gRPC) -> Router (step engine) [-> Decoder]. Resources come from `args`, never from
    decorators."""
    a = validate_args(args or {})
    decoder = load_config(a.model_dir).decoder
    decoder_app = (
        serve.deployment(DecoderServer)
        .options(**a.decoder.deployment_options())
        .bind(str(a.model_dir / decoder), a.decoder.device, a.decoder.max_batch_size, a.decoder.chunk_images)
        if decoder is not None and a.decoder.placement == "deployment"
        else None
    )
    router = (
        serve.deployment(Router)
        .options(
            name="Router",
            num_replicas=a.router.num_replicas,  # each its own engine; the registry is shared (an actor)
            ray_actor_options={"num_cpus": a.router.num_cpus},
            # the engine's own limit (active + queued) refuses first, with a 503 naming it; the headroom
            # keeps listing, stats and admin calls answering at capacity; beyond it Serve queues a bounded
            # number of calls, then refuses (BackPressureError: 503 / RESOURCE_EXHAUSTED)
            max_ongoing_requests=a.router.max_active_requests
            + a.router.max_queued_requests
            + ROUTER_HEADROOM,
            # Serve counts a call as queued until a replica takes it, which a burst of arrivals is for a
            # moment: as many as the engine can admit, then Serve's 503
            max_queued_requests=a.router.max_active_requests + a.router.max_queued_requests,
            health_check_period_s=10,
        )
        .bind(a.model_dump(mode="json"), decoder_app)
    )
    ingress = serve.deployment(Ingress).options(
        name="Ingress",
        num_replicas=a.ingress.num_replicas,
        ray_actor_options={"num_cpus": a.ingress.num_cpus},
        max_ongoing_requests=a.ingress.max_ongoing_requests,
        max_queued_requests=a.ingress.max_queued_requests,
    )
    return ingress.bind(router, a.router.default_deadline_s)

"""Deploying experts: one Serve application `expert-<name>` per expert, always named, waited for until RUNNING,
with Serve's own error messages surfaced. Also the Serve YAML builder for a single expert."""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from mode_ray.models.card import format_validation_error
from mode_ray.models.checkpoint import load_card
from mode_ray.serve.config import ExpertDeployment, expert_app_name, expert_route_prefix
from mode_ray.serve.errors import AddCancelled
from mode_ray.serve.expert_server import ExpertServer

logger = logging.getLogger("ray.serve")


# Serve's API is not thread-safe in Ray 2.60: building a RequestRouterConfig (deployments, and status replies
# that carry deployment configs) registers and unregisters a module for pickling by value, process-wide. The
# router deploys experts from several threads at once, so every Serve API call here holds this lock; a short
# retry covers Serve's own threads doing the same.
SERVE_API_LOCK = threading.RLock()


def serve_status() -> Any:
    with SERVE_API_LOCK:
        return serve.status()


def expert_application(expert_dir: Path | str, config: ExpertDeployment) -> serve.Application:
    """The Serve application of the expert in `expert_dir` (card read here, weights loaded in the replica)."""
    card = load_card(expert_dir)
    return bound_application(ExpertServer, card.name, config, str(expert_dir))


def server_args(config: ExpertDeployment) -> tuple[Any, ...]:
    """The ExpertServer arguments after the first (expert directory, or registry actor of a warm replica)."""
    emulate = None if config.emulate is None else config.emulate.model_dump()
    return (
        config.max_batch_size,
        config.batch_wait_timeout_s,
        config.device,
        emulate,
        config.chunk_rows,
        config.max_call_rows,
        config.direct_host,
    )


def bound_application(cls: type, name: str, config: ExpertDeployment, first: Any) -> serve.Application:
    """`cls` (ExpertServer or WarmExpertServer) as deployment Expert-<name> with `config`'s options, bound."""
    for attempt in range(5):
        try:
            with SERVE_API_LOCK:
                deployment = serve.deployment(cls).options(**config.deployment_options(name))
                return deployment.bind(first, *server_args(config))
        except ValueError as e:  # Serve itself may be serialising a config in another thread of this process
            if "pickle by value" not in str(e) or attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _app_messages(app: Any) -> str:
    """The application's status message and each deployment's, ANSI colours removed."""
    parts = [app.message] if app.message else []
    for name, dep in app.deployments.items():
        if dep.message:
            parts.append(f"deployment {name} ({dep.status.value}): {dep.message}")
    return _ANSI.sub("", "\n".join(parts)).strip()


_EXCEPTION_LINE = re.compile(r"^\s*([\w.]+(?:Error|Exception|Exit|Interrupt)): (.+)$")


def _root_cause(messages: str) -> str | None:
    """The last `SomeError: text` line of a traceback in Serve's status messages, if there is one."""
    found = [m for m in map(_EXCEPTION_LINE.match, messages.splitlines()) if m]
    return f"{found[-1].group(1).rsplit('.', 1)[-1]}: {found[-1].group(2)}" if found else None


def deploy_expert(
    expert_dir: Path | str,
    config: ExpertDeployment,
    wait_s: float = 120.0,
    *,
    delete_on_failure: bool = True,
    cancelled: threading.Event | None = None,
    app: str | None = None,
) -> str:
    """Deploy (or redeploy) the expert in `expert_dir` as its own Serve application; wait until RUNNING.

    Other applications are left alone (the application is always named: `app`, default expert-<card name>).
    Returns the application name.
    Raises RuntimeError if Serve gives up on it (DEPLOY_FAILED, e.g. the replicas cannot load the checkpoint)
    and TimeoutError if it is not RUNNING after `wait_s` (e.g. no node has the CPUs/GPUs it asks for); both
    carry Serve's status messages. With `delete_on_failure`, an application this call created is deleted
    again on failure; a pre-existing one is never deleted (Serve keeps its old replicas in a failed update).
    """
    card = load_card(expert_dir)
    app_name = app or expert_app_name(card.name)
    prefix = expert_route_prefix(card.name) if app is None else f"/experts/{app_name}"
    target = expert_application(expert_dir, config)
    where = f"expert {card.name!r} (application {app_name!r}, {expert_dir})"
    return run_application(target, app_name, prefix, where, wait_s, delete_on_failure, cancelled)


def run_application(
    target: serve.Application,
    app_name: str,
    prefix: str,
    where: str,
    wait_s: float = 120.0,
    delete_on_failure: bool = True,
    cancelled: threading.Event | None = None,
) -> str:
    """Run `target` as Serve application `app_name` and wait until it is RUNNING (see `deploy_expert`)."""
    existed = app_name in serve_status().applications
    started = time.monotonic()
    with SERVE_API_LOCK:
        serve.run_many(
            [serve.RunTarget(target=target, name=app_name, route_prefix=prefix)],
            wait_for_applications_running=False,
        )
    last = None
    while True:
        last = serve_status().applications.get(app_name)
        state = last.status.value if last is not None else "MISSING"
        if state == "RUNNING":
            logger.info("%s RUNNING after %.1fs", where, time.monotonic() - started)
            return app_name
        elapsed = time.monotonic() - started
        if cancelled is not None and cancelled.is_set():  # a DELETE of this expert while it deploys
            if not existed:
                with SERVE_API_LOCK:
                    serve.delete(app_name)
            raise AddCancelled(f"the add of {where} was cancelled by a DELETE after {elapsed:.1f}s")
        if state in ("DEPLOY_FAILED", "MISSING", "DELETING") or elapsed > wait_s:
            break
        time.sleep(0.1)

    messages = _app_messages(last) if last is not None else "the application disappeared"
    if delete_on_failure and not existed:
        with SERVE_API_LOCK:
            serve.delete(app_name, _blocking=False)
    cause = _root_cause(messages)
    details = f"{cause}\n\nServe status:\n{messages}" if cause else messages or "no status message"
    if state == "DEPLOY_FAILED" or state in ("MISSING", "DELETING"):
        raise RuntimeError(f"{where} failed to deploy ({state} after {elapsed:.1f}s): {details}")
    raise TimeoutError(f"{where} not RUNNING after {wait_s:.0f}s (status {state}): {details}")


class ExpertAppArgs(BaseModel):
    """Arguments of `mode_ray.serve.deploy:build_expert_app` (Serve YAML `args:`)."""

    model_config = ConfigDict(extra="forbid")
    expert_dir: Path = Field(description="expert directory with expert.json and model.safetensors")
    expert: ExpertDeployment = Field(default_factory=ExpertDeployment)


def build_expert_app(args: dict[str, Any]) -> serve.Application:
    """Serve YAML builder: `import_path: mode_ray.serve.deploy:build_expert_app`,
    `args: {expert_dir: ..., expert: {num_cpus: ..., max_batch_size: ...}}`. Name the application
    `expert-<card name>` so that the router's `application` metadata finds it."""
    try:
        parsed = ExpertAppArgs.model_validate(args if args is not None else {})
    except ValidationError as e:
        raise ValueError(f"build_expert_app: {format_validation_error(e, 'args')}") from None
    return expert_application(parsed.expert_dir, parsed.expert)

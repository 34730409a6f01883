"""The expert registry: which experts the router may route to, versioned and persisted atomically.

Each generation captures an immutable `Snapshot` when it is admitted, so requests in flight keep the expert
set and the gate they started with while experts are hot-added or drained and gates are published.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mode_ray.models.card import ExpertCard, format_validation_error
from mode_ray.serve.config import expert_app_name

State = Literal["deploying", "ready", "draining"]
REGISTRY_FILE = "registry.json"


class ExpertEntry(BaseModel):
    """One expert as the router knows it. endpoint: 'serve' (app expert-<name> behind the Serve gRPC proxy) or
    'host:port' of any Open Inference Protocol server (Triton, KServe, another cluster)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    version: str
    card: ExpertCard
    path: str | None = None
    endpoint: str = "serve"
    state: State = "deploying"
    added_at: float = Field(default_factory=time.time)
    app: str | None = Field(
        None, description="its Serve application; None: expert-<name> (a replacement's differs)"
    )

    @property
    def application(self) -> str:
        """The Serve application that serves this version (the gRPC `application` metadata of its OIP)."""
        return self.app or expert_app_name(self.name)


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = 0
    experts: list[ExpertEntry] = Field(default_factory=list)
    gate: str | None = Field(None, description="the published learned gate directory (None: the model's)")
    pool: list[str] = Field(
        default_factory=list, description="warm expert applications that are RUNNING and serve no expert yet"
    )


@dataclass(frozen=True)
class Snapshot:
    """The routable experts at one registry version (state 'ready', in registration order) and the gate
    (a `mode_ray.routing.Gate`) that routes between them."""

    version: int
    entries: tuple[ExpertEntry, ...]
    gate: Any = None

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def cards(self) -> list[ExpertCard]:
        return [e.card for e in self.entries]


class Registry:
    """Thread-safe, persisted to `state_dir/registry.json` with write-to-temp + fsync + rename."""

    def __init__(self, state_dir: Path, set_aside_corrupt: bool = False) -> None:
        """Read `state_dir/registry.json`. A corrupt or unreadable file is an error naming the problem, or,
        with `set_aside_corrupt` (a fresh start), is renamed to `registry.json.corrupt-<time>` for inspection
        and the registry starts empty."""
        self.path = Path(state_dir) / REGISTRY_FILE
        self._lock = threading.Lock()
        self.set_aside: Path | None = None
        try:
            self._data = self._read()
        except RuntimeError:
            if not set_aside_corrupt:
                raise
            self.set_aside = self.path.with_name(f"{REGISTRY_FILE}.corrupt-{int(time.time())}")
            os.replace(self.path, self.set_aside)
            self._data = RegistryFile()

    def _read(self) -> RegistryFile:
        if not self.path.exists():
            return RegistryFile()
        try:
            return RegistryFile.model_validate(json.loads(self.path.read_text()))
        except ValidationError as e:
            problem = format_validation_error(e, "registry")
        except (ValueError, OSError, RecursionError) as e:  # bad JSON or UTF-8, too deep, unreadable
            problem = f"not a readable JSON registry: {e}"
        raise RuntimeError(
            f"registry {self.path} is corrupt ({problem}); start with --fresh (restore: false) to set it aside"
        )

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".registry-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(self._data.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @property
    def version(self) -> int:
        return self._data.version

    def entries(self) -> list[ExpertEntry]:
        with self._lock:
            return [e.model_copy() for e in self._data.experts]

    def get(self, name: str) -> ExpertEntry | None:
        with self._lock:
            return next((e.model_copy() for e in self._data.experts if e.name == name), None)

    @property
    def gate(self) -> str | None:
        return self._data.gate

    def snapshot(self, gate: Any = None) -> Snapshot:
        """The ready experts at the current version, routed by `gate` (the router's live gate object)."""
        with self._lock:
            ready = tuple(e for e in self._data.experts if e.state == "ready")
            return Snapshot(self._data.version, ready, gate)

    def _commit(self, **update: Any) -> int:
        """Replace fields of the registry, bump its version and persist it; returns the new version."""
        self._data = self._data.model_copy(update={**update, "version": self._data.version + 1})
        self._write()
        return self._data.version

    def upsert(self, entry: ExpertEntry) -> int:
        """Add or replace an entry; returns the new registry version."""
        with self._lock:
            others = [e for e in self._data.experts if e.name != entry.name]
            return self._commit(experts=[*others, entry])

    def set_state(self, name: str, state: State) -> int:
        with self._lock:
            return self._commit(
                experts=[
                    e.model_copy(update={"state": state}) if e.name == name else e for e in self._data.experts
                ]
            )

    def remove(self, name: str) -> int:
        with self._lock:
            return self._commit(experts=[e for e in self._data.experts if e.name != name])

    @property
    def pool(self) -> list[str]:
        return list(self._data.pool)

    def assign(self, entry: ExpertEntry) -> ExpertEntry | None:
        """Register `entry` in the first free warm application (one write: the slot leaves the pool as the
        entry names it); None, and nothing written, when the pool is empty."""
        with self._lock:
            if not self._data.pool:
                return None
            slot, *rest = self._data.pool
            entry = entry.model_copy(update={"app": slot})
            others = [e for e in self._data.experts if e.name != entry.name]
            self._commit(experts=[*others, entry], pool=rest)
            return entry

    def set_pool(self, apps: list[str]) -> int:
        """Replace the list of free warm applications; returns the new registry version."""
        with self._lock:
            return self._commit(pool=list(dict.fromkeys(apps)))

    def set_gate(self, path: str | None) -> int:
        """Publish a learned gate directory (None: back to the model's); returns the new registry version."""
        with self._lock:
            return self._commit(gate=path)

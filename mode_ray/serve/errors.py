"""The serving stack's errors, each mapped to one HTTP status and one gRPC status by the ingress."""

from __future__ import annotations

from typing import Any

import grpc


class ExpertCallError(RuntimeError):
    """An expert call that failed: rejected by the expert (`code` is the gRPC status it answers with, e.g.
    INVALID_ARGUMENT naming the field), a transport error or timeout, or a reply without a valid x0_hat."""

    def __init__(self, details: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        super().__init__(details)
        self.code = code
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Ray processes with its code
        return (type(self), (self.details, self.code))


class AddCancelled(FileExistsError):
    """A hot-add cancelled by a DELETE of the same expert before it was published (HTTP 409)."""


class Overloaded(RuntimeError):
    """The engine's queue is full (HTTP 503 / gRPC RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(TimeoutError):
    """A request ran past its deadline (HTTP 504 / gRPC DEADLINE_EXCEEDED)."""


class GenerationFailed(RuntimeError):
    """No chosen expert answered for some row (HTTP 502 / gRPC UNAVAILABLE)."""

"""A pydantic base that refuses JSON/YAML booleans where a field is not a flag.

pydantic's lax mode reads `true` / `false` as 1 / 0 for int and float fields, so `"seed": false` would be seed 0
and `"min_replicas": true` one replica. Every request body and config model derives from `NoBooleanNumbers`
instead, so such input is a field error naming the field; fields whose type admits a bool (a flag, `Any`)
take booleans as before.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationInfo, field_validator


def admits_bool(annotation: Any) -> bool:
    """Whether a field annotated `annotation` may hold a bare bool: bool, Any, object, or a union with one."""
    if annotation in (bool, Any, object):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(admits_bool(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Annotated:
        return admits_bool(typing.get_args(annotation)[0])
    return False


class NoBooleanNumbers(BaseModel):
    """BaseModel whose fields refuse a bool unless their type admits one (subclasses inherit the check)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, v: object, info: ValidationInfo) -> object:
        if isinstance(v, bool):
            field = cls.model_fields[info.field_name]
            if not admits_bool(field.annotation):
                name = field.alias or info.field_name
                raise ValueError(f"{name} must not be a boolean (true / false)")
        return v

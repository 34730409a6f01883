"""Booleans are refused where a field is not a flag, in request bodies, configs and cards alike."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from pydantic import Field, ValidationError

from mode_ray.generation.bundle import MixtureConfig
from mode_ray.models.strict import NoBooleanNumbers, admits_bool
from mode_ray.serve.config import ExpertDeployment, RouterOptions


@pytest.mark.parametrize(
    ("annotation", "admits"),
    [
        (bool, True),
        (bool | None, True),
        (Any, True),
        (int | bool, True),
        (Annotated[bool, Field()], True),
        (int, False),
        (float | None, False),
        (str | int | None, False),
        (Annotated[int, Field(ge=0)], False),
        (list[bool], False),  # the list is checked by its own items' types, not here
    ],
)
def test_admits_bool(annotation, admits) -> None:  # noqa: ANN001
    assert admits_bool(annotation) is admits


class Knobs(NoBooleanNumbers):
    count: int = 1
    ratio: float | None = None
    flag: bool = False
    anything: Any = None


def test_numbers_refuse_booleans_and_flags_take_them() -> None:
    k = Knobs(flag=True, anything=True, count=3, ratio=0.5)
    assert (k.flag, k.anything, k.count, k.ratio) == (True, True, 3, 0.5)
    with pytest.raises(ValidationError, match="count must not be a boolean"):
        Knobs(count=True)
    with pytest.raises(ValidationError, match=r"ratio must not be a boolean \(true / false\)"):
        Knobs(ratio=False)


def test_configs_and_mixture_json_refuse_booleans_for_numbers() -> None:
    with pytest.raises(ValidationError, match="min_replicas must not be a boolean"):
        ExpertDeployment.model_validate({"min_replicas": True})
    assert RouterOptions.model_validate({"offload": True}).offload is True  # a flag stays a flag
    with pytest.raises(ValidationError, match="top_k must not be a boolean"):
        MixtureConfig.model_validate({"name": "m", "experts": ["a"], "top_k": True})

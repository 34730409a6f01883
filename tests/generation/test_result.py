"""The result type: lanes merge back into one request's result; long traces are summarised, not shipped whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mode_ray.generation.result import MAX_FULL_TRACE_ROWS, GenerationResult, StepTrace, merge_results


def result(images: int, evals: int, offset: int = 0) -> GenerationResult:
    trace = [
        StepTrace(
            t,
            80.0 / (t + 1),
            [["a", "b"] if (i + offset) % 2 else ["b"] for i in range(images)],
            [[0.75, 0.25] if (i + offset) % 2 else [1.0] for i in range(images)],
            [0.0] * images,
        )
        for t in range(evals)
    ]
    return GenerationResult(torch.zeros(images, 1, 2, 2), [3] * images, seed=1, trace=trace)


def test_auto_sends_the_full_trace_of_a_small_request_and_a_summary_of_a_large_one() -> None:
    small = result(4, 35)
    assert small.with_trace("auto") is small and small.with_trace("auto").trace_mode == "full"
    images = 256
    evals = MAX_FULL_TRACE_ROWS // images + 1  # just above the limit (a 256 x 1000-step trace is 30x that)
    large = result(images, evals).with_trace("auto")
    assert large.trace_mode == "summary" and len(large.trace) == evals
    step = large.trace[0]
    # half the rows chose b alone (weight 1), half a 0.75 / b 0.25: the mean weight over all 256 rows
    assert step.experts == [["b", "a"]] and step.weights == [[0.625, 0.375]] and step.dropped == [0.0]
    assert (
        len(str(large.to_json()["trace"])) < len(str([t.to_dict() for t in result(images, evals).trace])) / 50
    )
    none = small.with_trace("none")
    assert none.trace == [] and none.trace_mode == "none" and none.to_json()["trace_mode"] == "none"
    assert GenerationResult.from_json(large.to_json()).trace_mode == "summary"


def test_merged_lanes_join_every_evaluation_in_order() -> None:
    parts = [result(2, 3), result(2, 3, offset=1), result(1, 3)]
    merged = merge_results(parts)
    assert merged.images.shape == (5, 1, 2, 2) and merged.labels == [3] * 5
    for t, step in enumerate(merged.trace):
        assert step.experts == [row for p in parts for row in p.trace[t].experts]
        assert step.weights == [row for p in parts for row in p.trace[t].weights]
        assert step.step == t and len(step.dropped) == 5


def test_the_routing_matrix_holds_each_evaluations_weights_and_dropped_mass() -> None:
    from mode_ray.generation import GenerationResult, StepTrace

    trace = [
        StepTrace(0, 80.0, [["a", "b"], ["a"]], [[0.75, 0.25], [1.0]], [0.0, 0.0]),
        StepTrace(1, 10.0, [["b"], ["c", "b"]], [[1.0], [0.2, 0.8]], [0.2, 0.0]),
    ]
    result = GenerationResult(images=torch.zeros(2, 1, 2, 2), labels=[1, 1], seed=0, trace=trace)
    names, weights, dropped = result.routing()
    assert names == ["b", "a", "c"]  # heaviest first
    assert np.allclose(weights, [[0.125, 0.9], [0.875, 0.0], [0.0, 0.1]])
    assert dropped.tolist() == pytest.approx([0.0, 0.1])
    assert result.routing_png()[:8] == b"\x89PNG\r\n\x1a\n"

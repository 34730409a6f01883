"""The Python client (`from mode_ray import Client, AsyncClient`), the server-sent-event stream it reads, the
status endpoint and the CLI commands on top of them, against a running cluster (real Serve, loopback). The
router admits one request at a time here, so a second one is refused (503) and the client's retry shows."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch
from typer.testing import CliRunner

from mode_ray import AsyncClient, Client
from mode_ray.client import (
    ClusterError,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    Unauthorized,
    error_from_grpc,
)
from mode_ray.generation import GenerateParams, GenerationResult, Progress, generate_local, load_bundle
from mode_ray.proto.mode_ray.v1 import generation_pb2 as gen
from mode_ray.proto.mode_ray.v1 import generation_pb2_grpc as gen_grpc
from tests.conftest import ADMIN_TOKEN
from tests.serve.conftest import tiny_app, wait_for
from tests.tiny import build_tiny_mixture

pytestmark = pytest.mark.serve
BODY = {"prompt": 3, "num_images": 2, "seed": 21, "steps": 3}


@pytest.fixture(scope="module")
def cluster(serve_cluster, tmp_path_factory):  # noqa: ANN001, ANN201
    model = build_tiny_mixture(tmp_path_factory.mktemp("client"))
    with tiny_app(serve_cluster, model, max_active_requests=1, max_queued_requests=0):
        yield serve_cluster, model


def expected(model, body: dict) -> torch.Tensor:  # noqa: ANN001
    bundle = load_bundle(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replicas
    try:
        return generate_local(bundle.mixture, bundle.config, GenerateParams(**body)).images
    finally:
        torch.set_num_threads(threads)


def test_generate_returns_the_in_process_images_and_trace(cluster) -> None:  # noqa: ANN001
    sc, model = cluster
    with Client(sc.http_url) as c:
        result = c.generate(**BODY)
    assert isinstance(result, GenerationResult)
    assert result.raw().shape == (2, 1, 28, 28) and result.raw().dtype == "float32"
    assert (result.images - expected(model, BODY)).abs().max() <= 1e-5
    assert len(result.trace) == 5 and result.trace[0].experts  # heun 3 steps: 5 evaluations


def test_stream_yields_every_evaluation_then_the_same_result(cluster) -> None:  # noqa: ANN001
    sc, model = cluster
    with Client(sc.http_url) as c:
        items = list(c.stream(**BODY))
    progress, last = items[:-1], items[-1]
    assert all(isinstance(p, Progress) for p in progress) and isinstance(last, GenerationResult)
    assert len(progress) == 5 and [p.total for p in progress] == [3] * 5
    assert [p.step for p in progress] == sorted(p.step for p in progress)
    assert (last.images - expected(model, BODY)).abs().max() <= 1e-5

    async def astream() -> list:
        async with AsyncClient(sc.http_url) as c:
            return [item async for item in c.stream(**BODY)]

    again = asyncio.run(astream())
    assert len(again) == 6 and (again[-1].images - last.images).abs().max() == 0


def test_errors_are_typed_from_http_and_grpc(cluster) -> None:  # noqa: ANN001
    sc, model = cluster
    with Client(sc.http_url, token="", retries=0) as c:
        with pytest.raises(InvalidRequest, match="num_images") as bad:
            c.generate(prompt=3, num_images=0)
        assert bad.value.status == 422
        with pytest.raises(InvalidRequest, match="nope"):
            c.generate(prompt=3, experts=["nope"])
        with pytest.raises(InvalidRequest, match="num_images"):  # before the stream starts: a plain error
            list(c.stream(prompt=3, num_images=0))
        with pytest.raises(Unauthorized, match="admin token"):
            c.experts.add("d")
        with pytest.raises(DeadlineExceeded):
            c.generate(prompt=3, steps=400, deadline_s=0.3)
    with Client("http://127.0.0.1:9", retries=0) as down, pytest.raises(ClusterError, match="cannot reach"):
        down.generate(prompt=3)
    with grpc.insecure_channel(sc.grpc_target) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as rpc:
            stub.Generate(
                gen.GenerateRequest(prompt="3", num_images=0, steps=-1),
                metadata=(("application", "mode-ray"),),
            )
    assert isinstance(error_from_grpc(rpc.value), InvalidRequest)


def test_only_overload_is_retried_with_backoff(cluster) -> None:  # noqa: ANN001
    """The router takes one request at a time: a second one gets 503. Without retries that is Overloaded; with
    them the client backs off and succeeds once the first is done."""
    sc, model = cluster
    long = {"prompt": 1, "num_images": 1, "seed": 1, "steps": 60}
    # the patient client backs off up to 0.2 * (2**10 - 1) = 205 s in all: far longer than the long request
    with Client(sc.http_url, retries=0) as c, Client(sc.http_url, retries=10, backoff_s=0.2) as patient:
        running, done = threading.Event(), threading.Event()

        def run_long() -> None:
            # patient too: a request the previous test left may still hold the one slot for a moment. Its first
            # progress event proves it is the one running in the router, so the next request must be refused.
            for _ in patient.stream(**long):
                running.set()
            done.set()

        first = threading.Thread(target=run_long)
        first.start()
        assert running.wait(60), "the long request never started"
        with pytest.raises(Overloaded) as refused:
            c.generate(**BODY)
        assert refused.value.status == 503 and not done.is_set()
        result = patient.generate(**BODY)  # retried until the long one left
        first.join()
    assert done.is_set() and (result.images - expected(model, BODY)).abs().max() <= 1e-5


def test_status_and_the_cli(cluster, tmp_path) -> None:  # noqa: ANN001
    from mode_ray.cli import app

    sc, model = cluster
    with Client(sc.http_url) as c:
        c.generate(**BODY)
        status = c.status()
    experts = {e["name"]: e for e in status["experts"]}
    assert sorted(experts) == ["a", "b", "c"] and all(e["replicas"] == 1 for e in experts.values())
    assert status["router"]["replicas"] == 1 and status["router"]["queued"] == 0
    used = [e for e in experts.values() if e["rows_per_s"] > 0]  # rates over the last ~5 s
    assert used and sum(e["routed_share"] for e in used) == pytest.approx(1.0, abs=1e-3)
    assert all(e["call_p50_ms"] > 0 for e in used)

    runner = CliRunner()
    table = runner.invoke(app, ["status", "--once", "--url", sc.http_url])
    assert table.exit_code == 0, table.output
    assert all(name in table.output for name in ("a", "b", "c")) and "routed" in table.output
    out = tmp_path / "grid.png"
    made = runner.invoke(
        app,
        [
            "generate",
            "--url",
            sc.http_url,
            "--prompt",
            "3",
            "--num-images",
            "2",
            "--seed",
            "21",
            "--steps",
            "3",
            "--out",
            str(out),
        ],
    )
    assert made.exit_code == 0, made.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    refused = runner.invoke(app, ["experts", "add", "d", "--url", sc.http_url, "--token", "wrong"])
    assert refused.exit_code == 2 and "admin token" in refused.output
    assert ADMIN_TOKEN != "wrong"


def test_a_stream_whose_client_leaves_stops_its_request(cluster) -> None:  # noqa: ANN001
    """The client reads one progress event of a long request and hangs up: the router drops the request (its
    slot is free again: the one-request router admits the next), instead of computing it for nobody."""
    sc, model = cluster
    with Client(sc.http_url, retries=0) as c:
        stream = c.stream(prompt=2, num_images=1, seed=2, steps=1000)
        assert isinstance(next(stream), Progress)
        wait_for(
            lambda: c.status()["router"]["active"] == 1, "the request in the engine (heartbeats lag 0.5 s)"
        )
        stream.close()  # closes the HTTP response: the connection goes
        wait_for(lambda: c.status()["router"]["active"] == 0, "the abandoned request dropped", timeout=30)
        assert (c.generate(**BODY).images - expected(model, BODY)).abs().max() <= 1e-5


def test_hanging_up_on_the_request_that_started_the_engine_hurts_no_other(serve_cluster, tmp_path) -> None:  # noqa: ANN001
    """On a fresh router the first request starts the engine's tick loop. Its client hangs up while 4 other
    requests share its ticks: they all finish with nothing dropped and the images they would have had, and the
    abandoned request leaves the engine."""
    from concurrent.futures import ThreadPoolExecutor

    model = build_tiny_mixture(tmp_path)
    with tiny_app(serve_cluster, model), Client(serve_cluster.http_url, retries=0) as c:
        first = c.stream(prompt=2, num_images=1, seed=2, steps=1000)
        assert isinstance(next(first), Progress)
        body = {**BODY, "steps": 60}
        with ThreadPoolExecutor(4) as pool:
            others = [pool.submit(c.generate, **{**body, "seed": i}) for i in range(4)]
            wait_for(lambda: c.status()["router"]["active"] == 5, "all five requests stepping")
            first.close()
            results = [f.result() for f in others]
        assert all(r.dropped_mass == 0 for r in results)
        for i, r in enumerate(results):
            assert (r.images - expected(model, {**body, "seed": i})).abs().max() <= 1e-5
        wait_for(lambda: c.status()["router"]["active"] == 0, "the abandoned request gone")

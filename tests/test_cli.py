"""The command line (typer.testing): it parses, calls builders, and answers bad input with a message and
exit code 2, never a traceback."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from typer.testing import CliRunner

from mode_ray import cli

runner = CliRunner()


def run(*args: str):  # noqa: ANN201
    result = runner.invoke(cli.app, list(args))
    assert "Traceback" not in result.output, result.output
    return result


def test_generate_local_writes_png_and_npz_and_the_same_seed_gives_the_same_images(tmp_path) -> None:  # noqa: ANN001
    common = ["generate", "--local", "--prompt", "seven", "--num-images", "2", "--seed", "5", "--steps", "3"]
    r = run(*common, "--out", str(tmp_path / "grid.png"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG" and "seed 5" in r.output
    for name in ("a.npz", "b.npz"):
        assert run(*common, "--out", str(tmp_path / name)).exit_code == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["images"].shape == (2, 1, 28, 28) and a["labels"].tolist() == [7, 7]
    assert np.array_equal(a["images"], b["images"])
    assert len(json.loads(str(a["trace"]))) == 5  # heun, 3 steps


def test_generate_writes_a_viewable_grid_with_labels_and_the_routing_heatmap(tmp_path) -> None:  # noqa: ANN001
    from PIL import Image

    common = ["generate", "--local", "--prompt", "3", "--num-images", "4", "--seed", "5", "--steps", "3"]
    assert run(*common, "--scale", "1", "--out", str(tmp_path / "small.png")).exit_code == 0
    r = run(
        *common, "--labels", "--trace-png", str(tmp_path / "routing.png"), "--out", str(tmp_path / "big.png")
    )
    assert r.exit_code == 0, r.output
    small, big = Image.open(tmp_path / "small.png"), Image.open(tmp_path / "big.png")
    assert small.size == (62, 62)  # 2 x 2 tiles of 28 px with 2 px borders
    assert (
        big.width == 4 * small.width and big.height == 4 * small.height + 2 * 12
    )  # scale 4, 2 caption bands
    heat = Image.open(tmp_path / "routing.png").convert("RGB")
    assert heat.width >= 5 * 12 and "routing: 5 evaluations" in r.output  # heun 3 steps: 5 columns
    colours = {heat.getpixel((x, y)) for x in range(heat.width) for y in range(heat.height)}
    assert any(b > 200 and r < 200 for r, g, b in colours)  # some weight drawn in blue


def test_generate_unconditional_prior_or_null(tmp_path) -> None:  # noqa: ANN001
    common = ["generate", "--local", "--num-images", "3", "--seed", "2", "--steps", "1", "--sampler", "euler"]
    assert run(*common, "--out", str(tmp_path / "prior.npz")).exit_code == 0  # the shipped default: prior
    assert run(*common, "--unconditional", "null", "--out", str(tmp_path / "null.npz")).exit_code == 0
    assert min(np.load(tmp_path / "prior.npz")["labels"].tolist()) >= 0
    assert np.load(tmp_path / "null.npz")["labels"].tolist() == [-1, -1, -1]
    r = run(*common, "--unconditional", "maybe")
    assert r.exit_code == 2 and "maybe" in r.output


def test_the_default_image_count_is_the_apis(tmp_path) -> None:  # noqa: ANN001
    from mode_ray.generation import DEFAULT_NUM_IMAGES

    r = run("generate", "--local", "--steps", "1", "--sampler", "euler", "--out", str(tmp_path / "x.npz"))
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "x.npz")["images"].shape[0] == DEFAULT_NUM_IMAGES


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["generate", "--local", "--prompt", "giraffe"], ["prompt", "giraffe"]),
        (["generate", "--local", "--sampler", "magic"], ["magic", "heun"]),
        (["generate", "--local", "--num-images", "0"], ["num_images"]),
        (["generate", "--local", "--out", "grid.jpg"], ["--out", ".png"]),
        (["generate", "--local", "--expert", "nope"], ["nope", "digits-0-6"]),
        (["train", "gate"], ["--mixture", "--extend"]),
        (["train", "gate", "--extend", "x"], ["--expert"]),
        (["train", "experts", "--out", "x", "--preset", "huge"], ["huge", "s2"]),
        (["train", "dense", "--out", "x"], ["--steps", "--match-compute"]),
    ],
)
def test_bad_input_is_a_message_and_exit_code_2(args: list[str], words: list[str], monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(cli, "_ray", lambda *a: pytest.fail("Ray must not start for bad arguments"))
    r = run(*args)
    assert r.exit_code == 2, r.output
    for word in words:
        assert word in r.output, (word, r.output)


def test_an_unreachable_cluster_is_a_message_not_a_traceback() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    for args in (
        ["generate", "--url", f"http://127.0.0.1:{port}"],
        ["experts", "list", "--url", f"http://127.0.0.1:{port}"],
    ):
        r = run(*args)
        assert r.exit_code == 2 and "cannot reach the cluster" in r.output, r.output


def test_every_option_shows_its_default() -> None:
    r = run("generate", "--help")
    assert r.exit_code == 0 and "default: 4" in r.output.replace("[", "").replace("]", "")

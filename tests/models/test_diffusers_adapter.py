"""The diffusers adapter: a DDPM epsilon / v model as an EDM expert equals the analytic conversion."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mode_ray.models.diffusers_adapter import DiffusersVPAdapter

diffusers = pytest.importorskip("diffusers")
S = 0.6  # data N(0, S^2)


def alphas_cumprod(t: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, t, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


class OptimalVPModel(nn.Module):
    """The exact epsilon / v prediction for Gaussian data, driven by a continuous timestep (as diffusers)."""

    def __init__(self, ac: torch.Tensor, prediction_type: str) -> None:
        super().__init__()
        self.log_sigmas = ((1 - ac) / ac).sqrt().log().float()
        self.prediction_type = prediction_type
        self.config = SimpleNamespace(num_class_embeds=None)

    def forward(self, x_vp, t, class_labels=None):  # noqa: ANN001, ANN201
        lo = t.floor().long().clamp(max=len(self.log_sigmas) - 2)
        sigma = torch.lerp(self.log_sigmas[lo], self.log_sigmas[lo + 1], t - lo).exp().reshape(-1, 1, 1, 1)
        ab = 1 / (1 + sigma**2)
        x0 = x_vp * ab.sqrt() * S**2 / (ab * S**2 + 1 - ab)  # E[x0 | x_vp]
        eps = (x_vp - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = eps if self.prediction_type == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
        return SimpleNamespace(sample=out)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_adapter_recovers_the_optimal_edm_denoiser(prediction_type: str) -> None:
    ac = alphas_cumprod()
    adapter = DiffusersVPAdapter(OptimalVPModel(ac, prediction_type), ac, prediction_type)
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0])
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * (sigma.reshape(-1, 1, 1, 1) + S)
    expected = x * S**2 / (sigma.reshape(-1, 1, 1, 1) ** 2 + S**2)
    torch.testing.assert_close(adapter(x, sigma), expected, rtol=1e-4, atol=1e-5)


def test_adapter_on_a_real_unet2d_matches_the_formula() -> None:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=11,
    ).eval()
    ac = alphas_cumprod()
    adapter = DiffusersVPAdapter(unet, ac, "epsilon")
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 4.0])
    cond = torch.zeros(2, 10)
    cond[0, 7] = 1  # row 1 stays the null condition -> class 10
    with torch.no_grad():
        t = adapter.sigma_to_t(sigma)
        eps = unet(
            x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt(), t, class_labels=torch.tensor([7, 10])
        ).sample
        torch.testing.assert_close(adapter(x, sigma, cond), x - sigma.reshape(-1, 1, 1, 1) * eps)
    sig_back = ((1 - ac) / ac).sqrt()[[10, 500]].float()
    torch.testing.assert_close(adapter.sigma_to_t(sig_back), torch.tensor([10.0, 500.0]), rtol=0, atol=1e-3)

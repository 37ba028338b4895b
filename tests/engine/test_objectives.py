"""The objectives: DDPM (eps / v, min-SNR, noise offset) as the SD families train, and rectified flow with
the timestep samplings and loss weightings of kohya's flux_train_utils and the SD3 paper."""

import math

import pytest
import torch

from engine.objectives import DDPMObjective, FlowObjective, scaled_linear_alphas_cumprod, weighted_mse
from engine.objectives.flow import SAMPLINGS, flux_mu, shifted


def _ddpm(kind="epsilon", gamma=0.0, offset=0.0):
    return DDPMObjective(scaled_linear_alphas_cumprod(), kind, min_snr_gamma=gamma, noise_offset=offset)


def test_schedule_is_the_scaled_linear_sd_schedule():
    acp = scaled_linear_alphas_cumprod()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert acp.dtype == torch.float32 and torch.equal(acp, torch.cumprod(1 - betas, 0).float())


def test_perfect_predictions_give_zero_loss_for_eps_and_v():
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    drawn = {"noise": noise, "t": torch.tensor([0, 500, 999])}
    for kind in ("epsilon", "v_prediction"):
        objective = _ddpm(kind, gamma=5.0)
        noised = objective.noised(x0, drawn)
        assert objective.loss(noised.target, noised).item() == 0.0


def test_v_target_recovers_x0():
    objective = _ddpm("v_prediction")
    x0, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    noised = objective.noised(x0, {"noise": noise, "t": t})
    a = objective.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(a.sqrt() * noised.noisy - (1 - a).sqrt() * noised.target, x0, atol=1e-5)


def test_min_snr_weights_as_kohya():
    objective = _ddpm("epsilon", gamma=5.0)
    acp, t = objective.alphas_cumprod, torch.tensor([0, 999])
    snr = acp[t] / (1 - acp[t])
    w = objective.noised(torch.zeros(2, 4, 2, 2), {"noise": torch.zeros(2, 4, 2, 2), "t": t}).weight
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0] < 1 and w[1] == 1  # low noise is down-weighted, high noise untouched
    v = _ddpm("v_prediction", gamma=5.0).snr_weights(t)
    assert torch.allclose(v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert _ddpm("epsilon").noised(torch.zeros(1, 4, 2, 2), {"noise": torch.zeros(1, 4, 2, 2),
                                                             "t": torch.tensor([3])}).weight is None


def test_prior_weights_scale_samples():
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    target = noise
    full = weighted_mse(torch.zeros_like(x0), target)
    halved = weighted_mse(torch.zeros_like(x0), target, sample_weights=torch.tensor([1.0, 0.0]))
    per = (noise ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(full, per.mean()) and torch.allclose(halved, per[0] / 2)


def test_ddpm_draws_noise_then_offset_then_timesteps_from_the_generator():
    """The order every recorded run depends on: a seed gives the same run on every path."""
    x0 = torch.zeros(2, 4, 8, 8)
    drawn = _ddpm(offset=0.1).draw(x0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(x0.shape, generator=g)
    noise = noise + 0.1 * torch.randn((2, 4, 1, 1), generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    assert torch.equal(drawn["noise"], noise) and torch.equal(drawn["t"], t)


def test_for_training_takes_the_runs_options_and_device():
    from engine.config import TrainConfig

    cfg = TrainConfig(min_snr_gamma=3.0, noise_offset=0.05)
    objective = _ddpm("v_prediction").for_training(cfg, torch.device("cpu"))
    assert (objective.min_snr_gamma, objective.noise_offset, objective.prediction_type) == (3.0, 0.05, "v_prediction")
    flow = FlowObjective(sampling="shift").for_training(cfg, torch.device("cpu"))
    assert flow.noise_offset == 0.05 and flow.sampling == "shift"


# --- rectified flow -----------------------------------------------------------------------------------

def test_flow_input_is_the_straight_line_and_the_target_its_velocity():
    objective = FlowObjective()
    x0, noise, sigma = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0.0, 0.25, 1.0])
    noised = objective.noised(x0, {"noise": noise, "sigma": sigma})
    assert torch.equal(noised.noisy[0], x0[0]) and torch.equal(noised.noisy[2], noise[2])
    assert torch.allclose(noised.noisy[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert torch.equal(noised.target, noise - x0) and torch.equal(noised.timestep, sigma)
    assert objective.loss(noised.target, noised).item() == 0.0


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_every_sampling_draws_sigmas_inside_0_1_reproducibly(sampling):
    objective = FlowObjective(sampling=sampling, weighting="logit_normal")
    x0 = torch.zeros(512, 4, 16, 16)
    a = objective.draw(x0, torch.Generator().manual_seed(1))
    b = objective.draw(x0, torch.Generator().manual_seed(1))
    assert torch.equal(a["sigma"], b["sigma"]) and torch.equal(a["noise"], b["noise"])
    assert a["sigma"].shape == (512,) and a["sigma"].min() >= 0 and a["sigma"].max() <= 1


def test_samplings_follow_their_definitions():
    n, g = 4096, lambda: torch.Generator().manual_seed(3)
    normal = torch.randn((n,), generator=g())
    sig = FlowObjective(sampling="sigmoid", sigmoid_scale=2.0).sample_sigmas(n, (n, 4, 8, 8), g(), "cpu")
    assert torch.allclose(sig, torch.sigmoid(2.0 * normal))
    logit = FlowObjective(sampling="logit_normal", logit_mean=0.5, logit_std=0.8).sample_sigmas(n, (n,), g(), "cpu")
    assert torch.allclose(logit, torch.sigmoid(0.5 + 0.8 * normal))
    shift = FlowObjective(sampling="shift", shift=3.0).sample_sigmas(n, (n,), g(), "cpu")
    assert torch.allclose(shift, 3 * torch.sigmoid(normal) / (1 + 2 * torch.sigmoid(normal)))
    assert shift.mean() > torch.sigmoid(normal).mean()  # shifted towards noise


def test_flux_shift_moves_larger_images_towards_noise():
    objective = FlowObjective(sampling="flux_shift")
    small = objective.sample_sigmas(256, (256, 16, 32, 32), torch.Generator().manual_seed(0), "cpu")
    large = objective.sample_sigmas(256, (256, 16, 128, 128), torch.Generator().manual_seed(0), "cpu")
    assert (large > small).all()
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    s = torch.sigmoid(torch.randn((256,), generator=torch.Generator().manual_seed(0)))
    mu = flux_mu(16 * 16)  # a 32x32 latent in 2x2 patches
    assert torch.allclose(small, math.exp(mu) / (math.exp(mu) + (1 / s - 1)))


def test_sigma_sampling_reads_the_shifted_1000_step_schedule():
    sigmas = FlowObjective(sampling="sigma", shift=3.0).sample_sigmas(2048, (2048,), torch.Generator(), "cpu")
    grid = shifted(torch.linspace(1.0, 1e-3, 1000), 3.0)
    assert all(bool((grid == s).any()) for s in sigmas[:64])
    # SD3's mode density, on the unshifted grid (shift 1)
    u = torch.rand((8,), generator=torch.Generator().manual_seed(2))
    index = ((1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)) * 1000).long().clamp(0, 999)
    mode = FlowObjective(sampling="sigma", weighting="mode", mode_scale=1.29, shift=1.0)
    assert torch.equal(mode.sample_sigmas(8, (8,), torch.Generator().manual_seed(2), "cpu"),
                       torch.linspace(1.0, 1e-3, 1000)[index])


def test_weightings():
    sigma = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(FlowObjective(weighting="sigma_sqrt").weights(sigma), sigma ** -2)
    cosmap = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    assert torch.allclose(FlowObjective(weighting="cosmap").weights(sigma), cosmap)
    for name in ("none", "logit_normal", "mode"):
        assert FlowObjective(weighting=name).weights(sigma) is None


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="timestep sampling"):
        FlowObjective(sampling="cosine")
    with pytest.raises(ValueError, match="weighting"):
        FlowObjective(weighting="snr")
    with pytest.raises(ValueError, match="prediction type"):
        DDPMObjective(scaled_linear_alphas_cumprod(), "flow")

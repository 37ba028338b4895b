"""The one loss: eps and v targets agree with the DDPM algebra, min-SNR weights as kohya's."""

import torch

from engine.loss import add_noise, diffusion_loss, snr_weights, target


def _acp():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    return torch.cumprod(1 - betas, 0)


def test_perfect_predictions_give_zero_loss_for_eps_and_v():
    acp, x0, noise = _acp(), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    for kind in ("epsilon", "v_prediction"):
        pred = target(x0, noise, t, acp, kind)
        assert diffusion_loss(pred, x0, noise, t, acp, kind, min_snr_gamma=5.0).item() == 0.0


def test_v_target_recovers_x0():
    acp, x0, noise = _acp(), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 900])
    xt, v = add_noise(x0, noise, t, acp), target(x0, noise, t, acp, "v_prediction")
    a = acp[t].view(-1, 1, 1, 1)
    assert torch.allclose(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5)


def test_min_snr_weights():
    acp = _acp()
    t = torch.tensor([0, 999])
    w = snr_weights(t, acp, 5.0, "epsilon")
    snr = acp[t] / (1 - acp[t])
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0] < 1 and w[1] == 1  # low noise is down-weighted, high noise untouched


def test_prior_weights_scale_samples():
    acp, x0, noise = _acp(), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([100, 100])
    pred = torch.zeros_like(x0)
    full = diffusion_loss(pred, x0, noise, t, acp, "epsilon")
    halved = diffusion_loss(pred, x0, noise, t, acp, "epsilon", sample_weights=torch.tensor([1.0, 0.0]))
    per = (noise ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(full, per.mean()) and torch.allclose(halved, per[0] / 2)

"""Multi-resolution (pyramid) noise and input-perturbation noise (kohya's multires_noise_iterations,
multires_noise_discount, ip_noise_gamma): the DDPM objective's draws equal the formulas, the target keeps
the plain noise, and off changes nothing (the fast step with them: test_features_fast_step.py)."""

import torch
import torch.nn.functional as F

from engine.config import TrainConfig
from engine.lora.metadata import build_metadata
from engine.models import tiny_sd1
from engine.objectives import DDPMObjective, scaled_linear_alphas_cumprod
from engine.objectives.noise import host_rng


def _objective(**options):
    return DDPMObjective(scaled_linear_alphas_cumprod(), "epsilon", **options)


def _kohya_pyramid(noise, ratios, coarse, discount):
    """kohya's pyramid_noise_like with its random ratios and coarse noises given (the formula)."""
    b, c, h, w = noise.shape
    noise = noise.clone()
    for i, (r, n) in enumerate(zip(ratios, coarse)):
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        assert n.shape == (b, c, hn, wn)
        noise += torch.nn.Upsample(size=(h, w), mode="bilinear")(n) * discount ** i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def test_pyramid_noise_is_kohyas_formula():
    x0 = torch.zeros(2, 4, 32, 24)
    got = _objective(multires_noise_iterations=6, multires_noise_discount=0.3).draw(x0, torch.Generator().manual_seed(7))
    # the same draws, in the same order, by hand
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(x0.shape, generator=g)
    rng = host_rng(g)  # kohya's random.random(), from the generator's state (no GPU read)
    ratios = [rng.random() * 2 + 2 for _ in range(6)]
    coarse = []
    for i, r in enumerate(ratios):
        hn, wn = max(1, int(32 / r ** i)), max(1, int(24 / r ** i))
        coarse.append(torch.randn((2, 4, hn, wn), generator=g))
        if hn == 1 or wn == 1:
            break
    t = torch.randint(0, 1000, (2,), generator=g)
    assert torch.allclose(got["noise"], _kohya_pyramid(noise, ratios, coarse, 0.3), atol=1e-6)
    assert torch.equal(got["t"], t)
    assert abs(float(got["noise"].std()) - 1) < 1e-5  # scaled back to unit variance
    assert not torch.allclose(got["noise"], noise / noise.std(), atol=1e-2)  # low frequencies were added


def test_pyramid_noise_adds_low_frequencies():
    x0 = torch.zeros(8, 4, 64, 64)
    plain = _objective().draw(x0, torch.Generator().manual_seed(0))["noise"]
    pyramid = _objective(multires_noise_iterations=8, multires_noise_discount=0.8).draw(
        x0, torch.Generator().manual_seed(0))["noise"]
    coarse = lambda n: F.avg_pool2d(n, 16).var().item()  # noqa: E731 - power at 1/16 of the size
    assert coarse(pyramid) > 5 * coarse(plain)


def test_input_perturbation_noises_the_input_but_not_the_target():
    x0, gamma = torch.randn(3, 4, 8, 8), 0.1
    objective = _objective(ip_noise_gamma=gamma)
    drawn = objective.draw(x0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    xi = torch.randn(x0.shape, generator=g)
    assert torch.equal(drawn["noise"], noise) and torch.equal(drawn["t"], t)
    assert torch.allclose(drawn["ip_noise"], gamma * xi)
    noised = objective.noised(x0, drawn)
    assert torch.allclose(noised.noisy, objective.add_noise(x0, noise + gamma * xi, t))
    assert torch.equal(noised.target, noise)  # kohya: the model predicts the plain noise


def test_input_perturbation_random_strength_stays_below_gamma():
    objective = _objective(ip_noise_gamma=0.2, ip_noise_gamma_random_strength=True)
    x0 = torch.zeros(1, 4, 16, 16)
    g = torch.Generator().manual_seed(5)
    strengths = []
    for _ in range(20):
        drawn = objective.draw(x0, g)
        strengths.append(float(drawn["ip_noise"].std()))  # gamma * u with u uniform, xi of unit variance
    assert max(strengths) < 0.2 * 1.1 and min(strengths) < 0.1 and len(set(strengths)) == 20


def test_off_draws_exactly_what_it_drew_before():
    x0 = torch.randn(2, 4, 8, 8)
    drawn = _objective(noise_offset=0.05).draw(x0, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x0.shape, generator=g) + 0.05 * torch.randn((2, 4, 1, 1), generator=g)
    assert set(drawn) == {"noise", "t"} and torch.equal(drawn["noise"], noise)


def test_the_run_options_reach_the_objective_and_the_metadata(tmp_path):
    cfg = TrainConfig.from_dict({"multires_noise_iterations": 6, "multires_noise_discount": 0.4, "ip_noise_gamma": 0.1})
    objective = _objective().for_training(cfg, torch.device("cpu"))
    assert (objective.multires_noise_iterations, objective.multires_noise_discount, objective.ip_noise_gamma) == (6, 0.4, 0.1)
    model = tiny_sd1()
    md = build_metadata(cfg, model.info, data_summary={}, steps=1, epoch=0, total_steps=1, batches_per_epoch=1,
                        started_at=0.0, mixed_precision="no")
    assert (md["ss_multires_noise_iterations"], md["ss_multires_noise_discount"], md["ss_ip_noise_gamma"]) == ("6", "0.4", "0.1")
    plain = build_metadata(TrainConfig(), model.info, data_summary={}, steps=1, epoch=0, total_steps=1,
                           batches_per_epoch=1, started_at=0.0, mixed_precision="no")
    assert "ss_multires_noise_iterations" not in plain and "ss_ip_noise_gamma" not in plain
    # kohya's own config keys are read, not refused
    assert TrainConfig.from_dict({"network_module": "networks.lora", "ip_noise_gamma": 0.1,
                                  "multires_noise_iterations": 6}).ip_noise_gamma == 0.1


def test_the_level_sizes_change_from_step_to_step_and_repeat_with_the_seed():
    objective = _objective(multires_noise_iterations=3)
    x0 = torch.zeros(1, 4, 64, 64)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return [objective.draw(x0, g)["noise"] for _ in range(3)]

    first, again = run(11), run(11)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])

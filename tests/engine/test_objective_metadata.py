"""An SD LoRA's file keeps the DDPM options kohya's train_network.py writes (min-SNR, pyramid noise,
input perturbation, modelspec prediction type) and none of the flow ones a Flux file carries
(test_flux_cli.py checks the Flux side)."""

from engine.lora.kohya_io import read_lora
from engine.models.tiny import tiny_sd1
from engine.train import train

from train_fixtures import pattern_dataset, quick_config


def test_an_sd_file_keeps_the_ddpm_options_and_no_flow_ones(tmp_path):
    data = pattern_dataset(tmp_path / "data", n=2)
    cfg = quick_config(data, tmp_path / "out", max_train_steps=1, multires_noise_iterations=6, ip_noise_gamma=0.1)
    _, md = read_lora(train(cfg, tiny_sd1(seed=0)).lora_path)
    assert (md["ss_min_snr_gamma"], md["ss_multires_noise_iterations"], md["ss_multires_noise_discount"]) == \
        ("5.0", "6", "0.3")
    assert (md["ss_ip_noise_gamma"], md["modelspec.prediction_type"]) == ("0.1", "epsilon")
    flow_only = ("ss_timestep_sampling", "ss_discrete_flow_shift", "ss_guidance_scale", "ss_model_prediction_type")
    assert [k for k in flow_only if k in md] == []

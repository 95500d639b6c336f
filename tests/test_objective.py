"""Min-SNR-gamma weights for the scheduler's prediction type, as diffusers' training scripts compute them."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from ec_lora_t.training.objective import min_snr_weights

# SD1.5's training noise schedule
SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
TIMESTEPS = torch.tensor([0, 10, 100, 300, 500, 700, 999])
GAMMA = 5.0


def snr_by_hand(scheduler) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.double()[TIMESTEPS]
    return alphas_cumprod / (1 - alphas_cumprod)


def test_epsilon_and_v_prediction_weights_follow_their_formulas_and_differ():
    epsilon = DDPMScheduler(**SD15, prediction_type="epsilon")
    velocity = DDPMScheduler.from_config({**epsilon.config, "prediction_type": "v_prediction"})
    snr = snr_by_hand(epsilon)
    epsilon_weights = min_snr_weights(epsilon, TIMESTEPS, GAMMA)
    velocity_weights = min_snr_weights(velocity, TIMESTEPS, GAMMA)
    # diffusers train_text_to_image.py: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction
    torch.testing.assert_close(epsilon_weights.double(), snr.clamp(max=GAMMA) / snr, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(velocity_weights.double(), snr.clamp(max=GAMMA) / (snr + 1), rtol=1e-5, atol=1e-7)
    # Noisy timesteps (SNR < 1): epsilon keeps weight 1, v-prediction weighs them by SNR / (SNR + 1) < 1/2.
    assert epsilon_weights[-1] == 1.0 and velocity_weights[-1] < 0.01
    assert (velocity_weights < epsilon_weights).all()


def test_an_unsupported_prediction_type_is_refused():
    scheduler = DDPMScheduler(**SD15, prediction_type="sample")
    with pytest.raises(ValueError, match="unsupported scheduler prediction_type 'sample'"):
        min_snr_weights(scheduler, TIMESTEPS, GAMMA)

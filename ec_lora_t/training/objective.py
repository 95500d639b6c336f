"""What one training step optimises: the noise-prediction objective on cached latents (report 4.6).

The report encodes every image at every step; here the VAE's posterior is cached, so a step
samples `latents = mean + std * noise` (what `latent_dist.sample()` would do), adds noise at
a uniformly drawn timestep (or one per stratum of the schedule, `draw_timesteps`), and regresses
the UNet's prediction onto the scheduler's target.
The embedded base model's pretraining (`ec_lora_t.demo.pretrain`) uses the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from diffusers.training_utils import compute_snr

from ec_lora_t.adapter.conditioning import AVERAGE_POST, engagement_conditioning, unet_rows
from ec_lora_t.adapter.model import ECLoRAAdapter
from ec_lora_t.training.config import TIMESTEP_SAMPLING_CHOICES


@dataclass
class NoisyLatents:
    noisy_latents: torch.Tensor  # (B, C, h, w) fp32
    timesteps: torch.Tensor  # (B,) int64
    target: torch.Tensor  # (B, C, h, w) fp32: the noise (epsilon) or the velocity (v_prediction)


def draw_timesteps(batch_size: int, num_train_timesteps: int, sampling: str, generator: torch.Generator,
                   device: torch.device | str) -> torch.Tensor:
    """(batch_size,) int64 training timesteps in [0, num_train_timesteps).

    "uniform": each drawn independently (the diffusers training scripts). "stratified": the
    schedule cut into `batch_size` equal strata and one timestep drawn in each, with a shared
    uniform offset (the low-discrepancy sampler of Kingma et al. 2021, Variational Diffusion
    Models), in random order over the batch. Every timestep still has the same marginal
    probability, so the expected loss is unchanged; what goes is the batch-to-batch noise of a
    batch that happens to draw mostly clean or mostly noisy steps.
    """
    if sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device)
    if sampling != "stratified":
        raise ValueError(f"timestep sampling must be one of {TIMESTEP_SAMPLING_CHOICES}, got {sampling!r}")
    offset = torch.rand((), generator=generator, device=device)
    positions = (torch.arange(batch_size, device=device) + offset) / batch_size  # one per stratum, in [0, 1)
    timesteps = (positions * num_train_timesteps).long().clamp_(max=num_train_timesteps - 1)
    return timesteps[torch.randperm(batch_size, generator=generator, device=device)]


def noisy_latents(
    latent_mean: torch.Tensor, latent_std: torch.Tensor, noise_scheduler, generator: torch.Generator,
    timestep_sampling: str = "uniform",
) -> NoisyLatents:
    """1. Sample latents from the cached VAE posterior; 2. draw noise and 3. one timestep per
    sample (`draw_timesteps`); noise the latents and give the scheduler's prediction target."""
    device = latent_mean.device
    latents = latent_mean + latent_std * torch.randn(latent_mean.shape, generator=generator, device=device)
    noise = torch.randn(latents.shape, generator=generator, device=device)
    timesteps = draw_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps, timestep_sampling,
                               generator, device)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")
    return NoisyLatents(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, target)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023) for the scheduler's prediction type.

    As diffusers' examples/text_to_image/train_text_to_image.py computes them: min(SNR, gamma) / SNR
    when the UNet predicts the noise (epsilon), min(SNR, gamma) / (SNR + 1) when it predicts the
    velocity (v_prediction: the v-loss already carries a factor SNR + 1 over the epsilon loss).
    """
    snr = compute_snr(noise_scheduler, timesteps)
    clamped = torch.clamp(snr, max=gamma)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return clamped / snr
    if prediction_type == "v_prediction":
        return clamped / (snr + 1)
    raise ValueError(f"min-SNR weights: unsupported scheduler prediction_type {prediction_type!r}")


def caption_embeddings(
    batch: dict[str, torch.Tensor], dropped: torch.Tensor | None, text_encoder: nn.Module | None
) -> torch.Tensor:
    """(B, 77, D) text embeddings of the batch's captions; rows where `dropped` (B,) bool is set
    take the generic caption (caption dropout).

    Without `text_encoder`, the cached embeddings. With it (a text-encoder LoRA, which changes
    them as it trains), the cached token ids encoded now, with gradients to its LoRA.
    """
    if text_encoder is None:
        text = batch["text_embeddings"]
        return text if dropped is None else torch.where(dropped[:, None, None], batch["generic_text_embeddings"], text)
    ids = batch["input_ids"]
    if dropped is not None:
        ids = torch.where(dropped[:, None], batch["generic_input_ids"], ids)
    return text_encoder(ids, return_dict=False)[0]  # the last hidden state, as encode_prompts gives it


def drop_time(vectors: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """`vectors` (N, 2) with the time of the `dropped` rows set to the guidance anchor's (a copy)."""
    vectors = vectors.clone()
    vectors[dropped.to(vectors.device), 1] = AVERAGE_POST[1]
    return vectors


def diffusion_training_step(
    accelerator: Accelerator,
    unet: nn.Module,
    adapter: ECLoRAAdapter,
    ecm: nn.Module,
    noise_scheduler,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    mode: str = "ec_lora",
    caption_dropout: float = 0.0,
    vector_dropout: float = 0.0,
    time_dropout: float = 0.0,
    snr_gamma: float | None = None,
    text_encoder: nn.Module | None = None,
    timestep_sampling: str = "uniform",
) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns the detached loss.

    `unet` and `ecm` are what the caller runs (prepared by accelerate, possibly wrapped for
    distributed training), and so is `text_encoder` (given only when it has a LoRA to train);
    `adapter` holds the unwrapped layers. The backward pass runs
    inside the conditioning block because gradient checkpointing re-runs layers during backward.
    """
    compute_dtype = next(p for p in unet.parameters() if not p.requires_grad).dtype
    # 1.-3. Latents from the cached posterior, noise and timesteps.
    noisy = noisy_latents(batch["latent_mean"], batch["latent_std"], noise_scheduler, generator, timestep_sampling)
    # 4. Text embeddings (cached, or encoded now through the text encoder's LoRA); with caption
    #    dropout some samples get their generic caption.
    dropped = None
    if caption_dropout > 0.0:
        dropped = torch.rand(noisy.timesteps.shape[0], generator=generator, device=noisy.timesteps.device)
        dropped = dropped < caption_dropout
    text_embeddings = caption_embeddings(batch, dropped, text_encoder)
    # 5. One row per sample (`unet_rows`, the layout sampling also uses): the ECM's scales (and
    #    time-embedding offsets) for its vector, or constants (plain LoRA); with vector dropout
    #    some samples get the null vector (every scale 1, no offset), with time dropout the
    #    anchor's time (`drop_time`). Each dropout draws only when on, so runs without it keep
    #    their random stream.
    null_rows = None
    if mode == "ec_lora" and vector_dropout > 0.0:
        null_rows = torch.rand(noisy.timesteps.shape[0], generator=generator, device=noisy.timesteps.device)
        null_rows = null_rows < vector_dropout
    vectors = batch["engagement_time"]
    if mode == "ec_lora" and time_dropout > 0.0:
        vectors = drop_time(vectors, torch.rand(noisy.timesteps.shape[0], generator=generator,
                                                device=noisy.timesteps.device) < time_dropout)
    rows = unet_rows(ecm, mode, text_embeddings, vectors if mode == "ec_lora" else None, null_rows=null_rows)
    # 6. The UNet predicts the target; min-SNR weights rebalance the timesteps.
    with engagement_conditioning(adapter, rows.scales, rows.offsets):
        prediction = unet(
            noisy.noisy_latents.to(compute_dtype),
            noisy.timesteps,
            encoder_hidden_states=rows.text_embeddings.to(compute_dtype),
            return_dict=False,
        )[0]
        if snr_gamma is None:
            loss = F.mse_loss(prediction.float(), noisy.target.float())
        else:
            per_sample = F.mse_loss(prediction.float(), noisy.target.float(), reduction="none").mean(
                dim=tuple(range(1, prediction.ndim))
            )
            loss = (per_sample * min_snr_weights(noise_scheduler, noisy.timesteps, snr_gamma)).mean()
        accelerator.backward(loss)
    return loss.detach()

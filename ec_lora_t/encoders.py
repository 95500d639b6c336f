"""Running the frozen encoders: VAE latents of images and CLIP hidden states of prompts.

The latents stage encodes the training images and captions once; the evaluation encodes the
generated images the same way, so that the latent regressor reads both alike.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTokenizer


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states for prompts, padded to the tokenizer's max length: (N, 77, D)."""
    input_ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(input_ids)[0]


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell: the VAE halves the resolution in every block but the last."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_images(
    vae: AutoencoderKL,
    pixel_values: torch.Tensor,
    batch_size: int = 32,
    *,
    scaled: bool = True,
    output_device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std of images in [-1, 1]: 2 x (N, C, h, w) fp32 on `output_device`.

    `scaled`: multiplied by the VAE's scaling factor, as the UNet sees latents; unscaled is
    what a scaling factor is measured on (the demo's pretraining).
    """
    means, stds = [], []
    for start in range(0, len(pixel_values), batch_size):
        batch = pixel_values[start : start + batch_size].to(vae.device, vae.dtype)
        distribution = vae.encode(batch).latent_dist
        means.append(distribution.mean.float().to(output_device))
        stds.append(distribution.std.float().to(output_device))
    scaling = vae.config.scaling_factor if scaled else 1.0
    return torch.cat(means) * scaling, torch.cat(stds) * scaling

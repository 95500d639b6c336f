"""VAE latents and text embeddings, computed once and cached for training (report 3.6.3, 4.6.2).

The report encodes every image and caption again at every step; the encoders are frozen, so
the result only changes through the VAE's sampling noise. We cache the latent distribution's
mean and standard deviation (already multiplied by the VAE scaling factor) and the text
encoder's hidden states, and training draws `mean + std * noise` per step: the same
distribution the VAE would sample, at none of its cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from ec_lora_t.models import StableDiffusionComponents, encode_prompts


def image_to_pixel_values(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the shorter side to `resolution` (bilinear), centre-crop, scale to [-1, 1]: (3, R, R)."""
    width, height = image.size
    scale = resolution / min(width, height)
    resized = image.convert("RGB").resize(
        (max(resolution, round(width * scale)), max(resolution, round(height * scale))), Image.Resampling.BILINEAR
    )
    left = (resized.width - resolution) // 2
    top = (resized.height - resolution) // 2
    cropped = resized.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return pixels * 2.0 - 1.0


@torch.no_grad()
def encode_images(vae: AutoencoderKL, pixel_values: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent mean and std of images in [-1, 1], multiplied by the VAE scaling factor: 2 x (N, C, h, w) fp32."""
    means, stds = [], []
    for start in range(0, len(pixel_values), batch_size):
        batch = pixel_values[start : start + batch_size].to(vae.device, vae.dtype)
        distribution = vae.encode(batch).latent_dist
        means.append(distribution.mean.float().cpu())
        stds.append(distribution.std.float().cpu())
    scaling = vae.config.scaling_factor
    return torch.cat(means) * scaling, torch.cat(stds) * scaling


def build_latent_cache(
    components: StableDiffusionComponents,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    engagement_time: np.ndarray,
    resolution: int,
    batch_size: int = 32,
    generic_captions: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Encode images and captions once; the tensors the `train` stage reads, in input order.

    `generic_captions` (the style tag and season without the description) are encoded too,
    as `generic_text_embeddings`, for training with caption dropout.
    """
    if not (len(images) == len(captions) == len(engagement_time)):
        raise ValueError("images, captions and engagement_time must have the same length")
    pixel_values = torch.stack([image_to_pixel_values(image, resolution) for image in images])
    latent_mean, latent_std = encode_images(components.vae, pixel_values, batch_size)

    def embed(texts: Sequence[str]) -> torch.Tensor:
        return torch.cat(
            [
                encode_prompts(components.tokenizer, components.text_encoder, list(texts[start : start + batch_size])).float().cpu()
                for start in range(0, len(texts), batch_size)
            ]
        ).contiguous()

    cache = {
        "latent_mean": latent_mean.contiguous(),
        "latent_std": latent_std.contiguous(),
        "text_embeddings": embed(captions),
        "engagement_time": torch.tensor(np.ascontiguousarray(engagement_time, dtype=np.float32)),
    }
    if generic_captions is not None:
        if len(generic_captions) != len(captions):
            raise ValueError("generic_captions must have one entry per caption")
        cache["generic_text_embeddings"] = embed(generic_captions)
    return cache


def generic_caption(full_caption: str, caption: str, season: str) -> str:
    """The full caption without its description: `(<style> style) (<season>)`.

    Cut by position (the description sits just before the season tag), not by searching for
    the description's text, which could also occur inside the style tag.
    """
    suffix = f"{caption.strip()} ({season})"
    if not full_caption.endswith(suffix):
        raise ValueError(f"full caption {full_caption!r} does not end with its caption and season {suffix!r}")
    return f"{full_caption[: -len(suffix)].strip()} ({season})"

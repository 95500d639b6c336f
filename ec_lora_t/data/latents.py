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
from PIL import Image

from ec_lora_t.data.images import image_to_pixel_values
from ec_lora_t.encoders import encode_images, encode_prompts
from ec_lora_t.models import StableDiffusionComponents


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
    the description's text, which could also occur inside the style tag. An empty caption
    (caption_source "generic") is already the generic one.
    """
    suffix = " ".join(part for part in (caption.strip(), f"({season})") if part)
    if not full_caption.endswith(suffix):
        raise ValueError(f"full caption {full_caption!r} does not end with its caption and season {suffix!r}")
    return f"{full_caption[: -len(suffix)].strip()} ({season})"

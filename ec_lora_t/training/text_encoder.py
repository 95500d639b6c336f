"""Training the text encoder's LoRA with the UNet's (`train.text_encoder_lora_rank` > 0).

The accelerate skeleton's steps for the second model: freeze it, cast it to the compute dtype,
add the LoRA (fp32 master weights), then the loop `prepare`s it with the UNet. Its LoRA matrices
join the adapter (`ECLoRAAdapter.text_encoder_lora`), so the optimizer's LoRA group, gradient
clipping, the finiteness checks, checkpoints and the saved adapter all include them.
"""

from __future__ import annotations

import torch
from torch import nn

from ec_lora_t.adapter.model import ECLoRAAdapter
from ec_lora_t.adapter.text_encoder import inject_text_encoder_lora
from ec_lora_t.training.cache import LatentCache


def add_text_encoder_lora(
    adapter: ECLoRAAdapter,
    text_encoder: nn.Module | None,
    cache: LatentCache,
    caption_dropout: float,
    device: torch.device,
    compute_dtype: torch.dtype,
) -> nn.Module | None:
    """The text encoder to run in training steps, with its LoRA in `adapter`; None (and the cached
    embeddings) when the adapter's `text_encoder_rank` is 0."""
    if adapter.config.text_encoder_rank == 0:
        return None
    if text_encoder is None:
        raise ValueError("text_encoder_lora_rank > 0 needs the text encoder: pass the base model's")
    if cache.input_ids is None or (caption_dropout > 0 and cache.generic_input_ids is None):
        raise ValueError("text_encoder_lora_rank > 0 needs the captions' token ids (input_ids, generic_input_ids) "
                         "in the latent cache; rerun the latents stage")
    width = text_encoder.config.hidden_size
    if width != cache.text_embeddings.shape[2]:
        raise ValueError(f"the text encoder's width is {width}, the latent cache's text embeddings "
                         f"{cache.text_embeddings.shape[2]}: were they made with another text encoder?")
    text_encoder.requires_grad_(False)
    text_encoder.to(device, compute_dtype)
    adapter.text_encoder_lora = inject_text_encoder_lora(text_encoder, adapter.config)
    return text_encoder

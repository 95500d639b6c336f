"""A small Stable Diffusion with random, seeded weights, built from configs (tests and smoke runs).

Same architecture classes as SD1.5, only narrower, saved in diffusers layout and loaded through
the one loading path (`ec_lora_t.models.load_components`), as diffusers' `get_dummy_components()`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# The CLIP tokenizer files the project ships (built by scripts/build_clip_tokenizer.py).
SHIPPED_CLIP_TOKENIZER = Path(__file__).resolve().parents[2] / "models" / "clip-tokenizer"


def build_tiny_stable_diffusion(
    out_dir: str | Path,
    seed: int = 0,
    resolution: int = 32,
    unet_block_out_channels: tuple[int, ...] = (32, 64),
    vae_block_out_channels: tuple[int, ...] = (32, 64, 64),
    text_hidden_size: int = 32,
    text_layers: int = 2,
    save_dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a small Stable Diffusion with random, seeded weights in diffusers layout.

    Same architecture classes as SD1.5 (UNet2DConditionModel with cross-attention blocks,
    AutoencoderKL, CLIPTextModel with the real CLIP tokenizer, DDPM scheduler), only narrower,
    so the whole pipeline runs on a CPU. `StableDiffusionPipeline.from_pretrained(out_dir)` loads it.
    `save_dtype=torch.float16` halves the files; `load_components` upcasts on load.
    """
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED_CLIP_TOKENIZER)
    latent_size = resolution // 2 ** (len(vae_block_out_channels) - 1)
    num_blocks = len(unet_block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_block_out_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * num_blocks,
        up_block_types=("CrossAttnUpBlock2D",) * num_blocks,
        cross_attention_dim=text_hidden_size,
        attention_head_dim=8,
        norm_num_groups=min(32, unet_block_out_channels[0]),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=vae_block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_block_out_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=min(32, vae_block_out_channels[0]),
        sample_size=resolution,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden_size,
            intermediate_size=4 * text_hidden_size,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=text_hidden_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # SD1.5's training schedule: scaled-linear betas over 1000 steps.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    pipeline.to(save_dtype).save_pretrained(out_dir)
    shutil.copy(SHIPPED_CLIP_TOKENIZER / "LICENSE", out_dir / "tokenizer" / "LICENSE")
    return out_dir

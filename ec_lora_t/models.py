"""Loading Stable Diffusion components, and building the small one the tests and demo use.

There is one loading path: every component comes from `from_pretrained(pretrained, subfolder=...)`,
where `pretrained` is a hub id (`stable-diffusion-v1-5/stable-diffusion-v1-5`) or a local folder
in diffusers layout. The tiny model below is saved in that layout and loaded the same way.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# The CLIP tokenizer files the project ships (built by scripts/build_clip_tokenizer.py).
SHIPPED_CLIP_TOKENIZER = Path(__file__).resolve().parent.parent / "models" / "clip-tokenizer"


@dataclass
class StableDiffusionComponents:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def load_components(
    pretrained: str | Path, torch_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> StableDiffusionComponents:
    """Load tokenizer, text encoder, VAE, UNet and DDPM scheduler from a hub id or a diffusers folder."""
    pretrained = str(pretrained)
    tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", dtype=torch_dtype)
    vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", torch_dtype=torch_dtype)
    unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", torch_dtype=torch_dtype)
    noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    for model in (text_encoder, vae, unet):
        model.to(device).eval().requires_grad_(False)
    return StableDiffusionComponents(tokenizer, text_encoder, vae, unet, noise_scheduler)


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

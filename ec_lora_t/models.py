"""Loading Stable Diffusion components.

There is one loading path: every component comes from `from_pretrained(pretrained, subfolder=...)`,
where `pretrained` is a hub id (`stable-diffusion-v1-5/stable-diffusion-v1-5`) or a local folder
in diffusers layout. The demo's tiny model
(`ec_lora_t.demo.tiny_model`) is saved in that layout and loaded the same way. Which of the two a
string is, and failing in seconds when it is neither there nor reachable: `ec_lora_t.hub`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ec_lora_t.hub import resolve_pretrained


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
    pretrained = resolve_pretrained(pretrained, what="model.pretrained")
    tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", dtype=torch_dtype)
    vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", torch_dtype=torch_dtype)
    unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", torch_dtype=torch_dtype)
    noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    for model in (text_encoder, vae, unet):
        model.to(device).eval().requires_grad_(False)
    return StableDiffusionComponents(tokenizer, text_encoder, vae, unet, noise_scheduler)

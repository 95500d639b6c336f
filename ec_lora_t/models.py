"""Loading Stable Diffusion components.

There is one loading path: every component comes from `from_pretrained(pretrained, subfolder=...)`,
where `pretrained` is a hub id (`stable-diffusion-v1-5/stable-diffusion-v1-5`) or a local folder
in diffusers layout. The demo's tiny model
(`ec_lora_t.demo.tiny_model`) is saved in that layout and loaded the same way. Which of the two a
string is, and failing in seconds when it is neither there nor reachable: `ec_lora_t.hub`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import huggingface_hub.utils
import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from packaging.version import Version
from transformers import CLIPTextModel, CLIPTokenizer

from ec_lora_t.hub import resolve_pretrained

# diffusers reads `dtype` in from_pretrained since 0.40 and, in pipelines, warns that
# `torch_dtype` is deprecated (FutureWarning); older releases know only `torch_dtype`.
_DIFFUSERS_DTYPE_KEY = "dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype"


def diffusers_dtype(dtype: torch.dtype | None) -> dict[str, Any]:
    """The dtype keyword of diffusers' `from_pretrained` (models and pipelines) for the installed release."""
    return {_DIFFUSERS_DTYPE_KEY: dtype}


class _TorchvisionFallbackNotice(logging.Filter):
    """transformers says, once per image processor, that it falls back to the PIL one without
    torchvision. That fallback is the intended setup here (torchvision breaks beside the CPU
    torch, README), so the notice is dropped; every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Load (and import diffusers' pipelines) without transformers' "Loading weights" and
    diffusers' "Loading pipeline components" bars, which are instant for local files and noise
    in every stage's log, nor the torchvision fallback notice; the hub's download bars stay."""
    notice, notice_filter = logging.getLogger("transformers.utils.import_utils"), _TorchvisionFallbackNotice()
    notice.addFilter(notice_filter)
    transformers_bars = transformers.utils.logging.is_progress_bar_enabled()
    diffusers_bars = diffusers.utils.logging.is_progress_bar_enabled()
    hub_bars = not huggingface_hub.utils.are_progress_bars_disabled()
    transformers.utils.logging.disable_progress_bar()  # also turns the hub's bars off...
    diffusers.utils.logging.disable_progress_bar()
    if hub_bars:
        huggingface_hub.utils.enable_progress_bars()  # ...which a long download still deserves
    try:
        yield
    finally:
        notice.removeFilter(notice_filter)
        if transformers_bars:
            transformers.utils.logging.enable_progress_bar()
        if diffusers_bars:
            diffusers.utils.logging.enable_progress_bar()
        if not hub_bars:
            huggingface_hub.utils.disable_progress_bars()




@dataclass
class StableDiffusionComponents:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def _vae_from_pretrained(pretrained: str | Path, torch_dtype: torch.dtype) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **diffusers_dtype(torch_dtype))


def load_vae(
    pretrained: str | Path, torch_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> AutoencoderKL:
    """The base model's VAE alone, frozen in eval mode: the evaluation scores generated images
    with it in fp32, as the latents stage encoded the training images (a pipeline's own VAE is
    bf16 or fp16 on a GPU)."""
    pretrained = resolve_pretrained(pretrained, what="model.pretrained")
    with quiet_loading():
        vae = _vae_from_pretrained(pretrained, torch_dtype)
    return vae.to(device).eval().requires_grad_(False)


def load_components(
    pretrained: str | Path, torch_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> StableDiffusionComponents:
    """Load tokenizer, text encoder, VAE, UNet and DDPM scheduler from a hub id or a diffusers folder."""
    pretrained = resolve_pretrained(pretrained, what="model.pretrained")
    with quiet_loading():
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", dtype=torch_dtype)
        vae = _vae_from_pretrained(pretrained, torch_dtype)
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **diffusers_dtype(torch_dtype))
        noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    for model in (text_encoder, vae, unet):
        model.to(device).eval().requires_grad_(False)
    return StableDiffusionComponents(tokenizer, text_encoder, vae, unet, noise_scheduler)

"""Shared fixtures: tiny seeded models built from configs, saved and loaded like real checkpoints."""

from __future__ import annotations

import warnings

import pytest
import torch

# The test models are tiny: one intra-op thread is faster than two fighting over CI's 2 cores.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*requires torchvision.*")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random Stable Diffusion in diffusers layout (loaded through from_pretrained)."""
    from ec_lora_t.demo.tiny_model import build_tiny_stable_diffusion

    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


@pytest.fixture(scope="session")
def adapter_dir(tiny_sd_dir, tmp_path_factory):
    """A 'trained' adapter for the tiny UNet: random B and ECM output layer, so vectors matter."""
    from diffusers import UNet2DConditionModel

    from ec_lora_t.adapter import ECLoRAConfig, add_ec_lora, save_adapter

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    adapter = add_ec_lora(unet, ECLoRAConfig(rank=4, alpha=8, ecm_hidden_size=16))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in adapter.layers:
            layer.lora_B.weight.copy_(0.5 * torch.randn(layer.lora_B.weight.shape, generator=generator))
        output = adapter.ecm.mlp[-1]
        output.weight.copy_(2.0 * torch.randn(output.weight.shape, generator=generator))
    return save_adapter(tmp_path_factory.mktemp("adapter") / "adapter", adapter)


@pytest.fixture(scope="session")
def ec_pipeline(tiny_sd_dir, adapter_dir):
    """The tiny model with that adapter, loaded as the tool loads it (DDIM, CPU); do not modify it."""
    from ec_lora_t.generation import load_pipeline

    return load_pipeline(str(tiny_sd_dir), adapter_dir, device="cpu")

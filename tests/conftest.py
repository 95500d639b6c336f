"""Shared fixtures: tiny seeded models built from configs, saved and loaded like real checkpoints."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# Two cores on CI: don't oversubscribe them with intra-op threads.
torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", message=".*requires torchvision.*")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random Stable Diffusion in diffusers layout (loaded through from_pretrained)."""
    from ec_lora_t.models import build_tiny_stable_diffusion

    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)

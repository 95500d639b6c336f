"""Toy modules with UNet-like layer names for the EC-LoRA tests (imported by several test files)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ec_lora_t.adapter import (
    ECLoRAAdapter,
    ECLoRAConfig,
    add_ec_lora,
    engagement_conditioning,
    row_conditioning,
)

WIDTH = 8


class ToyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(WIDTH, WIDTH)
        self.to_k = nn.Linear(WIDTH, WIDTH)
        self.to_v = nn.Linear(WIDTH, WIDTH)
        self.to_out = nn.ModuleList([nn.Linear(WIDTH, WIDTH), nn.Dropout(0.0)])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        q, k, v = self.to_q(hidden), self.to_k(hidden), self.to_v(hidden)
        weights = torch.softmax(q @ k.transpose(1, 2) / WIDTH**0.5, dim=-1)
        return self.to_out[0](weights @ v)


class ToyBlock(nn.Module):
    """Names like a diffusers transformer block: attn1.to_q ... ff.net.0.proj, ff.net.2."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(WIDTH, WIDTH)  # not a target
        self.attn1 = ToyAttention()
        projection = nn.Module()
        projection.proj = nn.Linear(WIDTH, 2 * WIDTH)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([projection, nn.GELU(), nn.Linear(2 * WIDTH, WIDTH)])

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        hidden = self.proj_in(sample)
        hidden = hidden + self.attn1(hidden)
        feed_forward = self.ff.net[2](self.ff.net[1](self.ff.net[0].proj(hidden)))
        return hidden + feed_forward


def make_toy(seed: int = 0) -> ToyBlock:
    torch.manual_seed(seed)
    return ToyBlock()


def randomize_adapter(adapter: ECLoRAAdapter, ecm: bool = True, seed: int = 1) -> None:
    """Give B (zero at init) and, with `ecm`, the ECM output layer non-zero values, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.layers:
            layer.lora_B.weight.copy_(0.3 * torch.randn(layer.lora_B.weight.shape, generator=generator))
        if ecm:
            output = adapter.ecm.mlp[-1]
            output.weight.copy_(0.5 * torch.randn(output.weight.shape, generator=generator))


def toy_with_adapter(seed: int = 0, **config_overrides) -> tuple[ToyBlock, ECLoRAAdapter]:
    model = make_toy(seed)
    adapter = add_ec_lora(model, ECLoRAConfig(rank=4, alpha=8, ecm_hidden_size=16, **config_overrides))
    return model, adapter


@contextmanager
def conditioned(adapter: ECLoRAAdapter, engagement_time: torch.Tensor | None = None, mode: str = "ec_lora"):
    """The common case: one row per vector (mode ec_lora), or a constant scale (the other modes)."""
    with engagement_conditioning(adapter, *row_conditioning(adapter.ecm, mode, engagement_time)):
        yield

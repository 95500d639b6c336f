"""The EC-LoRA layer: a frozen `nn.Linear` plus a low-rank update scaled per sample (report 3.1.2, 4.4.1).

    y = W x + s_k(e) * (alpha / r) * B A x

W is the frozen base layer (wrapped, never copied), A and B the trainable low-rank matrices,
alpha / r the static scale and s_k(e) the dynamic scale that the Engagement Conditioning
Module produces for this layer (index k) from each sample's engagement-time vector e. The
dynamic scales are handed to the layer for the calls inside one block by
`ec_lora_t.adapter.conditioning.engagement_conditioning`; outside that block a layer refuses
to run, so an unconditioned call can never pass silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def low_rank_pair(base_layer: nn.Linear, rank: int) -> tuple[nn.Linear, nn.Linear]:
    """A (rank, in) and B (out, rank) for `base_layer`: fp32 on its device, B zero."""
    device = base_layer.weight.device
    lora_a = nn.Linear(base_layer.in_features, rank, bias=False, device=device, dtype=torch.float32)
    lora_b = nn.Linear(rank, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
    # Initialise A the same way as the default for nn.Linear and B to zero, so that
    # step 0 reproduces the base model (LoRA paper; peft tuners/lora/layer.py).
    nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
    nn.init.zeros_(lora_b.weight)
    return lora_a, lora_b


def copy_lora_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into the tensors of `expected` (a LoRA state dict of live weights); the keys
    and shapes must match exactly, else an error naming `source`."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: missing LoRA keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    with torch.no_grad():
        for key, target in expected.items():
            if state[key].shape != target.shape:
                raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {tuple(target.shape)}")
            target.copy_(state[key])


@dataclass(frozen=True)
class FoldedWeights:
    """A layer's weight with its low-rank update folded in, one per run of rows that share their
    scales: rows `bounds[g]:bounds[g + 1]` of the UNet batch use `weights[g]`.

    For sampling, where the scales do not change over the denoising steps and the rows of one
    image share a vector: W' = W + s (alpha / r) B A once per call, and each step runs one matmul
    per run instead of the base matmul plus the two thin low-rank ones and their sum.
    """

    bounds: tuple[int, ...]  # (0, ..., rows)
    weights: tuple[torch.Tensor, ...]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] != self.bounds[-1]:
            raise RuntimeError(
                f"EC-LoRA layer has folded weights for {self.bounds[-1]} rows but was called with a batch "
                f"of {x.shape[0]}: fold the scales of the UNet batch's row layout"
            )
        if len(self.weights) == 1:
            return F.linear(x, self.weights[0], bias)
        return torch.cat([F.linear(x[start:end], weight, bias)
                          for start, end, weight in zip(self.bounds, self.bounds[1:], self.weights)])


class ECLoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a low-rank update scaled per sample by the ECM.

    The base layer keeps its own weights and dtype (the compute dtype, e.g. bf16); the LoRA
    matrices are fp32 master weights. Under autocast the LoRA matmuls run in the autocast
    dtype like every other linear layer; without autocast the input is cast to fp32 for them.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, ecm_index: int) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"EC-LoRA wraps nn.Linear layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.rank = rank
        self.static_scale = alpha / rank
        self.ecm_index = ecm_index
        self.lora_A, self.lora_B = low_rank_pair(base_layer, rank)
        # Per-block state, set and cleared only by `engagement_conditioning`: a float (the same
        # scale for every row of any batch: 1.0 for plain LoRA, 0.0 for the base model) or a
        # tensor with this layer's ECM scale for each row of the UNet batch, (rows,), or
        # (rows, rank) with one scale per rank component (ecm_granularity "rank"); or, for
        # sampling, the weights with those scales folded in (`FoldedWeights`).
        self.dynamic_scale: torch.Tensor | float | FoldedWeights | None = None

    @torch.no_grad()
    def folded_weight(self, scale: torch.Tensor) -> torch.Tensor:
        """W + s (alpha / r) B A in the base weight's dtype, for one row's scale: () or (rank,).

        Summed in fp32 and rounded once, as a merged LoRA is (peft's `merge`)."""
        lora_b = self.lora_B.weight * (scale.to(self.lora_B.weight) * self.static_scale)  # B diag(s): (out, r)
        return (self.base_layer.weight.float() + lora_b @ self.lora_A.weight).to(self.base_layer.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, ..., in_features)
        dynamic_scale = self.dynamic_scale
        if dynamic_scale is None:
            raise RuntimeError(
                "EC-LoRA layer called without a dynamic scale: run the model inside "
                "ec_lora_t.adapter.conditioning.engagement_conditioning(...)"
            )
        if isinstance(dynamic_scale, FoldedWeights):
            return dynamic_scale.linear(x, self.base_layer.bias)
        result = self.base_layer(x)
        if isinstance(dynamic_scale, float) and dynamic_scale == 0.0:
            return result  # adapter switched off: exactly the base layer, no LoRA compute
        lora_input = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)
        hidden = self.lora_A(lora_input)  # (batch, ..., r)
        # Scaling the rank-r hidden state equals scaling B A x (B is linear) and touches r
        # instead of out_features values per token.
        if isinstance(dynamic_scale, torch.Tensor):
            if dynamic_scale.shape[0] != x.shape[0]:
                raise RuntimeError(
                    f"EC-LoRA layer has scales for {dynamic_scale.shape[0]} rows but was called with a batch "
                    f"of {x.shape[0]}: build the scales for the UNet batch's row layout "
                    "(ec_lora_t.adapter.conditioning.unet_rows)"
                )
            # (batch,) -> (batch, 1, ..., 1); (batch, r) -> (batch, 1, ..., r): per component
            components = dynamic_scale.shape[1] if dynamic_scale.ndim == 2 else 1
            scale = (dynamic_scale * self.static_scale).to(hidden.dtype)
            hidden = hidden * scale.view(x.shape[0], *([1] * (hidden.ndim - 2)), components)
        else:
            hidden = hidden * (dynamic_scale * self.static_scale)
        return result + self.lora_B(hidden).to(result.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, static_scale={self.static_scale:g}, ecm_index={self.ecm_index}"


class VectorTimeEmbedding(nn.Module):
    """The UNet's timestep embedding plus a per-row offset made by the ECM from the vector.

    Wraps diffusers' `TimestepEmbedding` (`unet.time_embedding`) the way an EC-LoRA layer wraps
    its linear layer: the base module keeps its weights, and the offset for each row of the UNet
    batch is handed in by `engagement_conditioning` for the calls inside one block. Every ResNet
    block of the UNet adds the embedding to its features, so the offset reaches the whole network.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        # Per-block state, set and cleared only by `engagement_conditioning`: None (no offset:
        # the base model, the plain LoRA) or a (rows, embedding_dim) tensor.
        self.offset: torch.Tensor | None = None
        self.active = False

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if not self.active:
            raise RuntimeError(
                "EC-LoRA time embedding called outside a conditioning block: run the model inside "
                "ec_lora_t.adapter.conditioning.engagement_conditioning(...)"
            )
        embedding = self.base_layer(*args, **kwargs)  # (rows, embedding_dim)
        if self.offset is None:
            return embedding
        if self.offset.shape[0] != embedding.shape[0]:
            raise RuntimeError(
                f"EC-LoRA time embedding has offsets for {self.offset.shape[0]} rows but was called with a batch "
                f"of {embedding.shape[0]}"
            )
        return embedding + self.offset.to(embedding.dtype)


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a static low-rank update: y = W x + (alpha / r) B A x.

    The text encoder's LoRA (`train.text_encoder_lora_rank`): the vector modulates only the
    UNet, so this layer has no dynamic scale and runs without a conditioning block. `enabled`
    False gives exactly the base layer (the pipeline's "base" mode).
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRA wraps nn.Linear layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.rank = rank
        self.static_scale = alpha / rank
        self.lora_A, self.lora_B = low_rank_pair(base_layer, rank)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, in_features)
        result = self.base_layer(x)
        if not self.enabled:
            return result
        lora_input = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)
        return result + (self.lora_B(self.lora_A(lora_input)) * self.static_scale).to(result.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, static_scale={self.static_scale:g}"

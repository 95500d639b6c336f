"""The Engagement Conditioning Module (report 3.1.1, 4.3.2).

An MLP f_psi from the engagement-time vector e = [normalized_engagement, normalized_time]
to one dynamic scale per EC-LoRA layer: Linear(2, h), ReLU, then (depth - 1) times
Linear(h, h), ReLU, then a linear output layer Linear(h, num_layers) with no activation.
The report uses h = 128 and depth 2. Weights and computation stay fp32.

`scales_per_layer` > 1 (our extension, `ecm_granularity: rank`) gives each layer one scale per
LoRA rank component instead of one for the whole update: the layer computes
B diag(s(e)) A x, so the vector can switch learned directions on and off rather than only
turn a single direction up or down (the report's "make the ECM more expressive").

Initialisation of the output layer (our choice; the report used PyTorch's default): zero
weights and bias 1, so every scale is exactly 1 for every vector at step 0. With LoRA's
B = 0 that makes step 0 the base model, and as B grows it starts as plain LoRA with the
report's alpha / r. With the default init the scales would start as small random numbers
of either sign around 0, which shrinks and randomly flips each layer's LoRA update before
any learning happens. The hidden layers keep the default init so that different vectors
give different hidden features, which is what the output layer learns to map to
different scales once B is non-zero (the output weights receive gradient as soon as the
LoRA update does).

`input_shift` and `input_scale` (our extension, `ECLoRAConfig.ecm_input`) feed the first layer
(e - shift) / scale instead of e. In the demo feed engagement sits at 0.53 ± 0.21 and time at
0.52 ± 0.30. Read raw (shift 0, scale 1, the report's), every hidden unit's pre-activation is
mostly a constant (its bias plus its weights times the mean vector), so the hidden features, and
with them the output layer's gradients, differ little from one vector to the next: the scales'
vector-dependent part is learned after their static part. `centered` (shift 0.5, scale 0.5:
2 e - 1) makes the inputs symmetric about 0 and twice as spread; `standardized` (the training
set's mean and standard deviation) makes them z-scores, so the differences between vectors are a
larger share of every hidden feature whatever the feed's spread (docs/research.md, rounds 6-7:
steadier control over training seeds).

`embedding_dim` > 0 (our extension, `ECLoRAConfig.vector_embedding`) adds a second head on the
same hidden features: an offset added to the UNet's timestep embedding, which every ResNet
block of the UNet reads (as class labels condition a class-conditional diffusion model). The
LoRA scales can only turn learned directions of the attention and feed-forward layers up or
down; the offset reaches the whole network directly. The head starts at zero: no offset.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

ENGAGEMENT_TIME_DIM = 2  # [normalized_engagement, normalized_time]
VECTOR_NAMES = ("normalized_engagement", "normalized_time")


def check_unit_interval(name: str, value: float) -> float:
    """`value` as a float; ValueError unless finite and in [0, 1].

    [0, 1] is the range the ECM was trained on (min-max normalised): outside it the ECM
    extrapolates, and a NaN makes every scale NaN (black images).
    """
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1] (the range the ECM was trained on), got {value}")
    return value


def check_engagement_time(vectors: Iterable[Iterable[float]]) -> list[tuple[float, float]]:
    """The vectors as (normalized_engagement, normalized_time) floats, each checked by `check_unit_interval`."""
    checked = []
    for vector in vectors:
        values = tuple(float(value) for value in vector)
        if len(values) != ENGAGEMENT_TIME_DIM:
            raise ValueError(f"an engagement-time vector has {ENGAGEMENT_TIME_DIM} values "
                             f"({', '.join(VECTOR_NAMES)}), got {values}")
        checked.append(tuple(check_unit_interval(name, value) for name, value in zip(VECTOR_NAMES, values)))
    return checked


class EngagementConditioningModule(nn.Module):
    def __init__(
        self, num_layers: int, hidden_size: int = 128, depth: int = 2, scales_per_layer: int = 1, embedding_dim: int = 0,
        input_shift: tuple[float, float] = (0.0, 0.0), input_scale: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        super().__init__()
        if min(num_layers, hidden_size, depth, scales_per_layer) < 1:
            raise ValueError(
                "ECM needs num_layers, hidden_size, depth and scales_per_layer >= 1, got "
                f"{num_layers}, {hidden_size}, {depth}, {scales_per_layer}"
            )
        self.num_layers = num_layers
        self.scales_per_layer = scales_per_layer
        if len(input_shift) != ENGAGEMENT_TIME_DIM or len(input_scale) != ENGAGEMENT_TIME_DIM:
            raise ValueError(f"input_shift and input_scale need {ENGAGEMENT_TIME_DIM} values each, "
                             f"got {input_shift}, {input_scale}")
        if not all(math.isfinite(v) for v in (*input_shift, *input_scale)) or min(input_scale) <= 0:
            raise ValueError(f"input_shift must be finite and input_scale positive, got {input_shift}, {input_scale}")
        # Not persistent: they come from the adapter's config, so ecm.safetensors keeps its keys.
        self.register_buffer("input_shift", torch.tensor(input_shift, dtype=torch.float32), persistent=False)
        self.register_buffer("input_scale", torch.tensor(input_scale, dtype=torch.float32), persistent=False)
        blocks: list[nn.Module] = []
        in_features = ENGAGEMENT_TIME_DIM
        for _ in range(depth):
            blocks += [nn.Linear(in_features, hidden_size, dtype=torch.float32), nn.ReLU()]
            in_features = hidden_size
        output = nn.Linear(in_features, num_layers * scales_per_layer, dtype=torch.float32)
        nn.init.zeros_(output.weight)
        nn.init.ones_(output.bias)
        blocks.append(output)
        self.mlp = nn.Sequential(*blocks)
        self.embedding_dim = embedding_dim
        if embedding_dim > 0:
            self.embedding = nn.Linear(in_features, embedding_dim, dtype=torch.float32)
            nn.init.zeros_(self.embedding.weight)
            nn.init.zeros_(self.embedding.bias)

    def forward(
        self, engagement_time: torch.Tensor, with_embedding: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """(batch, 2) engagement-time vectors -> (batch, num_layers) dynamic scales, fp32,
        or (batch, num_layers, scales_per_layer) when a layer gets several.

        With `with_embedding`, (scales, time-embedding offsets (batch, embedding_dim) or None).
        """
        if engagement_time.ndim != 2 or engagement_time.shape[1] != ENGAGEMENT_TIME_DIM:
            raise ValueError(
                f"engagement_time must have shape (batch, {ENGAGEMENT_TIME_DIM}), got {tuple(engagement_time.shape)}"
            )
        device = self.mlp[0].weight.device
        # The ECM stays fp32 even inside an autocast region (report 3.1.1).
        with torch.autocast(device_type=device.type, enabled=False):
            inputs = (engagement_time.to(device=device, dtype=torch.float32) - self.input_shift) / self.input_scale
            hidden = self.mlp[:-1](inputs)
            scales = self.mlp[-1](hidden)
            offsets = self.embedding(hidden) if self.embedding_dim > 0 else None
        if self.scales_per_layer > 1:
            scales = scales.view(scales.shape[0], self.num_layers, self.scales_per_layer)
        return (scales, offsets) if with_embedding else scales

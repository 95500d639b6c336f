"""Handing each row's ECM scales to the EC-LoRA layers for the model calls inside one block.

Report 4.4.2 replaced the UNet's `forward` with `types.MethodType` and reset the scales
after the call, which leaks state when the forward raises. Here a context manager does it:

    scales = ecm_scales(adapter.ecm, engagement_time)       # (N, 2) -> (N, K) or (N, K, r)
    with engagement_conditioning(adapter, scales):
        noise_pred = unet(noisy_latents, timesteps, text_embeddings).sample
        accelerator.backward(loss)

The scales are per row of the UNet batch, and `unet_rows` builds that batch for training (one
row per sample) and for sampling (with guidance: [unconditional + vector, conditional +
vector, conditional + anchor], and with a time guidance of its own a fourth group, conditional
+ (engagement, anchor's time); `ECLoRAStableDiffusionPipeline` repeats each prompt's rows
`num_images_per_prompt` times in a row, p0, p0, p1, p1, before the layout). Nothing is guessed
from the batch size: a layer called with a batch that its scales do not fit raises.

On entry the (rows, K, ...) scales are split once into one tensor per layer (`unbind`, views,
so gradients reach the ECM); on exit, also when the block raises, every layer's scale is
cleared. The scales stay set until exit, not just for one call, because gradient checkpointing
re-runs the layers' forward during `backward()`: keep backward inside the block. For sampling,
`fold_scales` folds the scales into each layer's weight once per run of rows that share a
vector, and the block hands the layers those weights instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ec_lora_t.adapter.ecm import EngagementConditioningModule
from ec_lora_t.adapter.layer import FoldedWeights
from ec_lora_t.adapter.model import ECLoRAAdapter

# ec_lora: each row's ECM scales; plain_lora: every scale 1, the ECM bypassed
# (LoRA with only its static alpha / r); base: every scale 0, the adapter off.
MODES = ("ec_lora", "plain_lora", "base")
CONSTANT_SCALES = {"plain_lora": 1.0, "base": 0.0}


def _checked(engagement_time: torch.Tensor) -> torch.Tensor:
    engagement_time = torch.as_tensor(engagement_time)
    if engagement_time.ndim == 1:
        engagement_time = engagement_time.unsqueeze(0)
    if not torch.isfinite(engagement_time).all():
        raise ValueError(f"engagement_time has non-finite values: {engagement_time.tolist()}")
    return engagement_time


def ecm_scales(ecm: EngagementConditioningModule, engagement_time: torch.Tensor) -> torch.Tensor:
    """(N, 2) vectors -> (N, K) fp32 dynamic scales ((N, K, r) per rank), with a clear error on bad input."""
    return ecm(_checked(engagement_time))


def ecm_outputs(
    ecm: EngagementConditioningModule, engagement_time: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, 2) vectors -> the scales and, with `vector_embedding`, the (N, D) time-embedding offsets."""
    return ecm(_checked(engagement_time), with_embedding=True)


# The vector of a typical post: what vector guidance and extrapolation push away from by default.
AVERAGE_POST = (0.5, 0.5)


def null_outputs(scales: torch.Tensor, offsets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The null vector's outputs shaped like (scales, offsets): every scale 1 and no offset, the
    plain LoRA, which `train.vector_dropout` trains as the vector-free model."""
    return torch.ones_like(scales), torch.zeros_like(offsets) if offsets is not None else None


def anchor_outputs(
    ecm: EngagementConditioningModule, engagement_time: torch.Tensor, anchor: tuple[float, float] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The outputs of `anchor` (an (engagement, time) pair, or None: the null vector) for each of the rows."""
    if anchor is None:
        return null_outputs(*ecm_outputs(ecm, engagement_time))
    # One anchor per row (expanded, not broadcast after the MLP): the batch is the same shape as the vectors'.
    anchors = torch.tensor([anchor], dtype=engagement_time.dtype, device=engagement_time.device)
    return ecm_outputs(ecm, anchors.expand_as(engagement_time))


def row_conditioning(
    ecm: EngagementConditioningModule | None,
    mode: str,
    engagement_time: torch.Tensor | None = None,
    *,
    vector_scale: float = 1.0,
    anchor: tuple[float, float] | None = AVERAGE_POST,
    null_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor | float, torch.Tensor | None]:
    """(scales, time offsets) for one group of rows, one row per vector.

    "ec_lora": the ECM's outputs for each vector, extrapolated from `anchor` by `vector_scale`
    (s' = s(anchor) + γ (s(e, t) - s(anchor)); anchor None: from the null vector, s' = 1 + γ (s - 1));
    rows where `null_rows` (N,) is true get the null vector (vector dropout). Other modes:
    a constant scale (1 plain LoRA, 0 base) and no offset.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "ec_lora":
        return CONSTANT_SCALES[mode], None
    if engagement_time is None:
        raise ValueError("mode 'ec_lora' needs an engagement_time tensor (N, 2)")
    scales, offsets = ecm_outputs(ecm, engagement_time)
    if vector_scale != 1.0:
        anchor_scales, anchor_offsets = anchor_outputs(ecm, engagement_time, anchor)
        scales = anchor_scales + vector_scale * (scales - anchor_scales)
        if offsets is not None:
            offsets = anchor_offsets + vector_scale * (offsets - anchor_offsets)
    if null_rows is not None:
        null_scales, null_offsets = null_outputs(scales, offsets)
        scales = torch.where(null_rows.view(-1, *([1] * (scales.ndim - 1))), null_scales, scales)
        if offsets is not None:
            offsets = torch.where(null_rows[:, None], null_offsets, offsets)
    return scales, offsets


@dataclass
class UNetRows:
    """One UNet batch: `groups` groups of N rows, each row's text embedding, scales and offsets;
    the last `anchor_groups` of them are read by vector guidance only."""

    text_embeddings: torch.Tensor  # (groups * N, T, D)
    scales: torch.Tensor | float  # (groups * N, K) or (groups * N, K, r); a float: every row
    offsets: torch.Tensor | None  # (groups * N, D) time-embedding offsets, or None
    groups: int
    anchor_groups: int = 0

    def without_anchor_groups(self) -> UNetRows:
        """The same batch less its anchor groups: the rows of a step without vector guidance."""
        if self.anchor_groups == 0:
            raise ValueError("this UNet batch has no anchor group to leave out")
        kept = self.groups - self.anchor_groups
        rows = self.text_embeddings.shape[0] // self.groups * kept
        return UNetRows(
            self.text_embeddings[:rows],
            self.scales if isinstance(self.scales, float) else self.scales[:rows],
            None if self.offsets is None else self.offsets[:rows],
            kept,
        )


def unet_rows(
    ecm: EngagementConditioningModule | None,
    mode: str,
    prompt_embeds: torch.Tensor,
    engagement_time: torch.Tensor | None = None,
    *,
    negative_prompt_embeds: torch.Tensor | None = None,
    anchor_row: bool = False,
    engagement_anchor_row: bool = False,
    guidance_anchor: tuple[float, float] | None = AVERAGE_POST,
    vector_scale: float = 1.0,
    null_rows: torch.Tensor | None = None,
) -> UNetRows:
    """The one place that lays out the UNet batch, for training and sampling alike.

    Row groups, in this order, each N rows (one per prompt embedding and vector (e, t)):
        [negative text + vector]   when `negative_prompt_embeds` is given (classifier-free guidance)
        [text + vector]            always; the only group in training
        [text + guidance anchor]   when `anchor_row` (vector guidance; "ec_lora" only)
        [text + (e, anchor's t)]   when `engagement_anchor_row` too (guidance with a time scale
                                   of its own: the step from the anchor to it is engagement's)
    Every vector group gets the same `row_conditioning` (the vector conditions the model, not
    the prompt), including the extrapolation (`vector_scale`) and vector dropout (`null_rows`).
    """
    vector = row_conditioning(ecm, mode, engagement_time, vector_scale=vector_scale, anchor=guidance_anchor,
                              null_rows=null_rows)
    groups = [(negative_prompt_embeds, vector)] if negative_prompt_embeds is not None else []
    groups.append((prompt_embeds, vector))
    if anchor_row or engagement_anchor_row:
        if mode != "ec_lora":
            raise ValueError(f"an anchor row (vector guidance) needs mode 'ec_lora', got {mode!r}")
        groups.append((prompt_embeds, anchor_outputs(ecm, engagement_time, guidance_anchor)))
    if engagement_anchor_row:
        if guidance_anchor is None:
            raise ValueError("a time guidance of its own needs an (engagement, time) anchor, not the null vector")
        engagement_only = engagement_time.clone()
        engagement_only[:, 1] = guidance_anchor[1]
        groups.append((prompt_embeds, row_conditioning(ecm, mode, engagement_only, vector_scale=vector_scale,
                                                       anchor=guidance_anchor)))
    text = torch.cat([embeds for embeds, _ in groups])
    if len(groups) == 1:
        scales, offsets = vector
    elif isinstance(vector[0], float):
        scales, offsets = vector[0], None
    else:
        scales = torch.cat([scales for _, (scales, _) in groups])
        offsets = torch.cat([offsets for _, (_, offsets) in groups]) if vector[1] is not None else None
    return UNetRows(text, scales, offsets, len(groups), anchor_groups=int(anchor_row or engagement_anchor_row)
                    + int(engagement_anchor_row))


# Rows whose scales agree this closely share a run. Rows of one vector need not be bit-identical:
# a batched matmul may round each row of the ECM's batch its own way (seen on one CPU, not on
# another), and a run split by one ulp would only cost the fold. Two different vectors' scales
# differ by far more.
RUN_RTOL, RUN_ATOL = 1e-5, 1e-6


def scale_runs(scales: torch.Tensor) -> tuple[int, ...]:
    """Row offsets (0, ..., rows) of the maximal runs of consecutive rows whose scales are equal
    to within rounding (`RUN_RTOL`, `RUN_ATOL`)."""
    same = torch.isclose(scales[1:], scales[:-1], rtol=RUN_RTOL, atol=RUN_ATOL).flatten(1).all(dim=1)
    changes = (~same).nonzero().flatten() + 1
    return (0, *changes.tolist(), scales.shape[0])


def fold_scales(adapter: ECLoRAAdapter, scales: torch.Tensor | float,
                max_runs: int) -> tuple[FoldedWeights, ...] | None:
    """Each layer's weights with `scales` folded in, one per run of rows sharing their scales
    (`scale_runs`), for `engagement_conditioning(..., folded=...)`; no gradients.

    None when folding does not pay: constant scales (every row alike: 0 is already the base
    layer alone) or more than `max_runs` runs, where the per-row low-rank path costs less than
    a matmul per run. One sync with the device, to find the runs: call it once per sampling
    call, not per step (the scales do not change over the denoising steps).
    """
    if not isinstance(scales, torch.Tensor) or max_runs < 1:
        return None
    bounds = scale_runs(scales)
    if len(bounds) - 1 > max_runs:
        return None
    firsts = scales[list(bounds[:-1])]  # (runs, K[, r]): one row per run
    return tuple(FoldedWeights(bounds, tuple(layer.folded_weight(run_scale) for run_scale in firsts[:, index]))
                 for index, layer in enumerate(adapter.layers))


@contextmanager
def engagement_conditioning(
    adapter: ECLoRAAdapter, scales: torch.Tensor | float, time_offsets: torch.Tensor | None = None,
    folded: tuple[FoldedWeights, ...] | None = None,
) -> Iterator[None]:
    """Condition the adapter's layers for the calls inside the block.

    `scales` is a float (the same scale for every row of any batch: 1 plain LoRA, 0 the base
    model) or a tensor with one row per row of the UNet batch: (rows, K), or (rows, K, r)
    with one scale per rank component. `time_offsets` (rows, D): the vector's offsets of the
    timestep embedding (adapters with `vector_embedding`); None adds nothing. `folded`: the
    layers' weights with these scales folded in (`fold_scales`), run instead of the low-rank path.
    """
    if time_offsets is not None and adapter.time_embedding is None:
        raise ValueError("time_offsets given but the adapter has no vector embedding")
    layers = adapter.layers
    if isinstance(scales, torch.Tensor) and (scales.ndim not in (2, 3) or scales.shape[1] != len(layers)):
        raise ValueError(
            f"scales must be (rows, {len(layers)}) or (rows, {len(layers)}, rank), got {tuple(scales.shape)}"
        )
    per_layer: tuple[torch.Tensor | float | FoldedWeights, ...]
    if folded is not None:  # the scales are already in the weights: nothing to split per layer
        if len(folded) != len(layers):
            raise ValueError(f"folded weights for {len(folded)} layers, the adapter has {len(layers)}")
        per_layer = folded
    elif isinstance(scales, torch.Tensor):
        per_layer = scales.to(layers[0].lora_A.weight.device).unbind(dim=1)
    else:
        per_layer = (float(scales),) * len(layers)
    if adapter.conditioning_active:
        raise RuntimeError("engagement_conditioning: this adapter is already inside a conditioning block")
    adapter.conditioning_active = True
    try:
        for layer, layer_scale in zip(layers, per_layer):
            layer.dynamic_scale = layer_scale
        if adapter.time_embedding is not None:
            adapter.time_embedding.offset = time_offsets
            adapter.time_embedding.active = True
        yield
    finally:
        for layer in layers:
            layer.dynamic_scale = None
        if adapter.time_embedding is not None:
            adapter.time_embedding.offset = None
            adapter.time_embedding.active = False
        adapter.conditioning_active = False

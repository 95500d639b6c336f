"""Handing each row's ECM scales to the EC-LoRA layers for the model calls inside one block.

Report 4.4.2 replaced the UNet's `forward` with `types.MethodType` and reset the scales
after the call, which leaks state when the forward raises. Here a context manager does it:

    scales = ecm_scales(adapter.ecm, engagement_time)       # (N, 2) -> (N, K) or (N, K, r)
    with engagement_conditioning(adapter, scales):
        noise_pred = unet(noisy_latents, timesteps, text_embeddings).sample
        accelerator.backward(loss)

The scales are per row of the UNet batch, and the code that builds that batch builds them:
the training step has one row per sample; a sampler with classifier-free guidance calls the
UNet on [unconditional rows, conditional rows]; diffusers' pipeline with
`num_images_per_prompt` = n repeats each prompt's rows n times in a row (p0, p0, p1, p1).
`pipeline_row_scales` gives that layout for diffusers' pipeline. Nothing is guessed from the
batch size: a layer called with a batch that its scales do not fit raises.

On entry the (rows, K, ...) scales are split once into one tensor per layer (`unbind`, views,
so gradients reach the ECM); on exit, also when the block raises, every layer's scale is
cleared. The scales stay set until exit, not just for one call, because gradient
checkpointing re-runs the layers' forward during `backward()`: keep backward inside the block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ec_lora_t.adapter.ecm import EngagementConditioningModule
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


def pipeline_row_scales(
    scales: torch.Tensor, num_images_per_prompt: int = 1, classifier_free_guidance: bool = True
) -> torch.Tensor:
    """Per-prompt scales laid out as diffusers' StableDiffusionPipeline lays out the UNet batch.

    The pipeline repeats each prompt's embedding `num_images_per_prompt` times in a row
    (p0, p0, p1, p1) and, with classifier-free guidance, calls the UNet on
    `torch.cat([unconditional, conditional])`. Both halves get the prompt's vector: the
    vector conditions the model, not the prompt.
    """
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    rows = scales.repeat_interleave(num_images_per_prompt, dim=0)
    return torch.cat([rows, rows]) if classifier_free_guidance else rows


def mode_conditioning(
    adapter: ECLoRAAdapter, mode: str, engagement_time: torch.Tensor | None = None
) -> tuple[torch.Tensor | float, torch.Tensor | None]:
    """(scales, time offsets) of a mode: the ECM's for "ec_lora", constants and no offset otherwise."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "ec_lora":
        return CONSTANT_SCALES[mode], None
    if engagement_time is None:
        raise ValueError("mode 'ec_lora' needs an engagement_time tensor (N, 2)")
    return ecm_outputs(adapter.ecm, engagement_time)


@contextmanager
def engagement_conditioning(
    adapter: ECLoRAAdapter, scales: torch.Tensor | float, time_offsets: torch.Tensor | None = None
) -> Iterator[None]:
    """Condition the adapter's layers for the calls inside the block.

    `scales` is a float (the same scale for every row of any batch: 1 plain LoRA, 0 the base
    model) or a tensor with one row per row of the UNet batch: (rows, K), or (rows, K, r)
    with one scale per rank component. `time_offsets` (rows, D): the vector's offsets of the
    timestep embedding (adapters with `vector_embedding`); None adds nothing.
    """
    if time_offsets is not None and adapter.time_embedding is None:
        raise ValueError("time_offsets given but the adapter has no vector embedding")
    layers = adapter.layers
    if isinstance(scales, torch.Tensor):
        if scales.ndim not in (2, 3) or scales.shape[1] != len(layers):
            raise ValueError(
                f"scales must be (rows, {len(layers)}) or (rows, {len(layers)}, rank), got {tuple(scales.shape)}"
            )
        per_layer: tuple[torch.Tensor | float, ...] = scales.to(layers[0].lora_A.weight.device).unbind(dim=1)
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

"""Handing each sample's ECM scales to the EC-LoRA layers for the calls inside one block.

Report 4.4.2 replaced the UNet's `forward` with `types.MethodType` and reset the scales
after the call, which leaks state when the forward raises. Here a context manager does it:

    with engagement_conditioning(unet, ecm, engagement_time):   # engagement_time: (N, 2)
        noise_pred = unet(noisy_latents, timesteps, text_embeddings).sample
        accelerator.backward(loss)

On entry it runs the ECM once, (N, 2) -> (N, num_layers) scales, and registers a forward
pre-hook on the model. Each model call then gives every layer its column of the scales,
matched to that call's batch: a diffusers pipeline with classifier-free guidance calls the
UNet on `torch.cat([latents] * 2)` (unconditional half first, then conditional), so a batch
of k * N samples gets the N rows of scales repeated k times in that same order. Both halves
use the sample's vector: the vector conditions the model, not the prompt.

On exit, also when the block raises, the hook is removed and every layer's scale is
cleared. The scales stay set until exit, not just for one call, because gradient
checkpointing re-runs the layers' forward during `backward()`: keep backward inside the block.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ec_lora_t.ecm import EngagementConditioningModule
from ec_lora_t.lora import ec_lora_layers

# ec_lora: each sample's ECM scales; plain_lora: every scale 1, the ECM bypassed
# (LoRA with only its static alpha / r); base: every scale 0, the adapter off.
MODES = ("ec_lora", "plain_lora", "base")
CONSTANT_SCALES = {"plain_lora": 1.0, "base": 0.0}

# Models inside an `engagement_conditioning` block now; nesting two blocks on one model
# would let the inner exit clear the outer block's scales.
_conditioned_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _call_batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Batch size of a model call: the UNet's `sample`, else the first tensor argument."""
    sample = kwargs.get("sample")
    if sample is None:
        sample = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if sample is None:
        raise RuntimeError("engagement_conditioning: the model call has no tensor argument to take the batch size from")
    return sample.shape[0]


def ecm_scales(ecm: EngagementConditioningModule, engagement_time: torch.Tensor) -> torch.Tensor:
    """(N, 2) vectors -> (N, num_layers) fp32 dynamic scales, with a clear error on bad input."""
    engagement_time = torch.as_tensor(engagement_time)
    if engagement_time.ndim == 1:
        engagement_time = engagement_time.unsqueeze(0)
    if not torch.isfinite(engagement_time).all():
        raise ValueError(f"engagement_time has non-finite values: {engagement_time.tolist()}")
    return ecm(engagement_time)


@contextmanager
def engagement_conditioning(
    model: nn.Module,
    ecm: EngagementConditioningModule | None = None,
    engagement_time: torch.Tensor | None = None,
    mode: str = "ec_lora",
) -> Iterator[torch.Tensor | None]:
    """Condition `model`'s EC-LoRA layers for the calls inside the block; yields the (N, K) scales.

    mode "ec_lora" needs `ecm` and `engagement_time` (N, 2); "plain_lora" and "base" ignore
    both and set every layer's scale to 1 or 0 for any batch.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    layers = list(ec_lora_layers(model).values())
    if not layers:
        raise ValueError("engagement_conditioning: the model has no EC-LoRA layers")
    if model in _conditioned_models:
        raise RuntimeError("engagement_conditioning: this model is already inside a conditioning block")

    scales: torch.Tensor | None = None
    handle = None
    if mode == "ec_lora":
        if ecm is None or engagement_time is None:
            raise ValueError("mode 'ec_lora' needs the ECM and an engagement_time tensor (N, 2)")
        scales = ecm_scales(ecm, engagement_time)  # (N, K)
        if scales.shape[1] != len(layers):
            raise ValueError(f"the ECM has {scales.shape[1]} outputs but the model has {len(layers)} EC-LoRA layers")
        num_vectors = scales.shape[0]

        def distribute_scales(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            batch_size = _call_batch_size(args, kwargs)
            if batch_size % num_vectors != 0:
                raise RuntimeError(
                    f"engagement_conditioning: a model call has batch size {batch_size}, which is not a "
                    f"multiple of the {num_vectors} engagement-time vectors given"
                )
            # Classifier-free guidance concatenates whole copies of the batch: repeat, not interleave.
            copies = batch_size // num_vectors
            call_scales = scales.repeat(copies, *([1] * (scales.ndim - 1))).to(_first_parameter_device(layers[0]))
            for layer in layers:
                layer.dynamic_scale = call_scales[:, layer.ecm_index]

        handle = model.register_forward_pre_hook(distribute_scales, with_kwargs=True)
    else:
        for layer in layers:
            layer.dynamic_scale = CONSTANT_SCALES[mode]

    _conditioned_models.add(model)
    try:
        yield scales
    finally:
        if handle is not None:
            handle.remove()
        for layer in layers:
            layer.dynamic_scale = None
        _conditioned_models.discard(model)


def _first_parameter_device(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device

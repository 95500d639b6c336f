"""Stopping a run before a non-finite number reaches the weights or the saved adapter."""

from __future__ import annotations

import torch
from torch import nn

from ec_lora_t.adapter.model import ECLoRAAdapter


class NonFiniteLossError(RuntimeError):
    """The loss, the gradient norm or the weights became NaN or infinite; training stops before using them."""


def non_finite_error(what: str, values: torch.Tensor, step: int, epoch: int, batch_index: int) -> NonFiniteLossError:
    """The same message on every process: `values` holds one entry per process."""
    values = values.detach().float().cpu().flatten()
    if values.numel() == 1:
        found = f"{what} is {values.item()}"
    else:
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        found = f"{what} is non-finite on process(es) {bad} of {values.numel()} ({values.tolist()})"
    return NonFiniteLossError(
        f"{found} at optimizer step {step} (epoch {epoch + 1}, batch {batch_index + 1}); stopped before the "
        "update. Lower learning_rate or max_grad_norm, or use mixed_precision bf16 or no instead of fp16"
    )


def check_finite_weights(adapter: ECLoRAAdapter, ecm: nn.Module, when: str) -> None:
    """Raise NonFiniteLossError naming the first non-finite LoRA or ECM weights."""
    named = [(f"LoRA layer {k}", p) for k, p in enumerate(adapter.lora_parameters())]
    named += [(f"ECM {name}", p) for name, p in ecm.named_parameters()]
    bad = [name for name, parameter in named if not torch.isfinite(parameter).all()]
    if bad:
        raise NonFiniteLossError(f"adapter weights became non-finite {when} ({bad[:3]}); nothing was saved")

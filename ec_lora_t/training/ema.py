"""An exponential moving average (EMA) of the adapter's trainable weights, for sampling.

Issue 16 found the control of a CPU-length run to depend on the training seed: one seed in three
ended far below the others. The last steps of a run at a still-high learning rate leave the
weights wherever the last batches pushed them; an average over the last hundred steps or so is
the usual remedy (diffusers' training scripts offer `--use_ema` for the same reason). The
average is diffusers' `EMAModel` over the LoRA A/B matrices and the ECM (and any other
trainable adapter weight); with `train.ema_decay` set, the saved adapter holds the average and
the checkpoints keep it, so a resumed run averages exactly as an uninterrupted one.

`EMAModel`'s decay at optimizer step n is min(ema_decay, (1 + n) / (10 + n)): early steps
follow the weights closely, later ones average over about 1 / (1 - ema_decay) steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from diffusers.training_utils import EMAModel
from torch import nn

EMA_WEIGHTS_NAME = "ema.safetensors"


def make_ema(parameters: Iterable[nn.Parameter], decay: float | None) -> EMAModel | None:
    """An EMA of `parameters` (None when `decay` is None: no averaging)."""
    if decay is None:
        return None
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {decay!r}")
    return EMAModel(list(parameters), decay=decay)


@contextlib.contextmanager
def averaged_weights(ema: EMAModel | None, parameters: list[nn.Parameter]) -> Iterator[None]:
    """Inside the block `parameters` hold the EMA weights (to save or sample); after it, the
    training weights again. Without an EMA, nothing changes."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def ema_state_tensors(ema: EMAModel) -> dict[str, torch.Tensor]:
    """The EMA's shadow weights and step counter as named tensors (a checkpoint's ema.safetensors)."""
    tensors = {f"shadow.{index}": param.detach().contiguous() for index, param in enumerate(ema.shadow_params)}
    tensors["optimization_step"] = torch.tensor(ema.optimization_step, dtype=torch.int64)
    return tensors


def load_ema_state_tensors(ema: EMAModel, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Restore what `ema_state_tensors` saved; `source` (the file) is named in every error."""
    shadows = sorted((key for key in tensors if key.startswith("shadow.")), key=lambda key: int(key.split(".")[1]))
    if len(shadows) != len(ema.shadow_params) or "optimization_step" not in tensors:
        raise ValueError(f"{source}: holds {len(shadows)} averaged weights for {len(ema.shadow_params)} trainable ones")
    for key, shadow in zip(shadows, ema.shadow_params):
        if tensors[key].shape != shadow.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensors[key].shape)}, expected {tuple(shadow.shape)}")
        shadow.data.copy_(tensors[key].to(shadow.device, shadow.dtype))
    ema.optimization_step = int(tensors["optimization_step"])

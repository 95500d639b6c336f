"""Per-epoch checkpoints of a training run: what defines the run, and saving and restoring its state.

A checkpoint is a folder `epoch-NNNN` holding the adapter (LoRA matrices, ECM, config), the
optimizer's tensors (`training_state.safetensors`) and the rest of the state as JSON
(`training_state.json`: the run's fingerprint, epoch, step, losses, timing, LR schedule);
nothing is pickled. A save goes to a dot-named folder first and is renamed into place, so a
run killed while saving never leaves a half-written `epoch-N`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from ec_lora_t.adapter.config import ECLoRAConfig
from ec_lora_t.adapter.ecm import EngagementConditioningModule
from ec_lora_t.adapter.model import ECLoRAAdapter, load_adapter_weights, save_adapter
from ec_lora_t.training.cache import LatentCache
from ec_lora_t.training.config import TrainingConfig

TRAINING_STATE_TENSORS = "training_state.safetensors"
TRAINING_STATE_JSON = "training_state.json"
CHECKPOINT_NAME = re.compile(r"^epoch-(\d{4,})$")


def run_fingerprint(
    cache: LatentCache, lora_config: ECLoRAConfig, training: TrainingConfig, mixed_precision: str
) -> str:
    """sha256 of what changes the result: a checkpoint of another run must not be resumed."""
    # "auto" precision as resolved on this machine; the checkpoint limit changes nothing.
    training_values = {k: v for k, v in asdict(training).items() if k != "checkpoints_total_limit"}
    description = {
        "data": cache.fingerprint(),
        "lora": {k: v for k, v in lora_config.to_dict().items() if k != "layer_names"},
        "training": {**training_values, "mixed_precision": mixed_precision},
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _optimizer_state_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {
        f"optimizer.{index}.{key}": value.detach().contiguous().cpu()
        for index, param_state in state["state"].items()
        for key, value in param_state.items()
    }
    return tensors, state["param_groups"]


def _optimizer_state_from_files(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for group in param_groups:
        group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": param_groups}


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a save in progress lives under a dot-name)."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))


def save_checkpoint(
    checkpoints_dir: Path,
    epoch: int,
    adapter: ECLoRAAdapter,
    ecm: EngagementConditioningModule,
    optimizer,
    lr_scheduler,
    accelerator: Accelerator,
    state: dict[str, Any],
    total_limit: int | None,
) -> Path:
    """Write checkpoint `epoch-NNNN` atomically and keep only the newest `total_limit`."""
    final = checkpoints_dir / f"epoch-{epoch:04d}"
    partial = checkpoints_dir / f".epoch-{epoch:04d}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    save_adapter(partial, adapter, ecm)
    optimizer_tensors, param_groups = _optimizer_state_to_files(optimizer)
    save_file(optimizer_tensors, partial / TRAINING_STATE_TENSORS)
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    state = {
        **state,
        "optimizer_param_groups": param_groups,
        "lr_scheduler": lr_scheduler.state_dict(),
        "grad_scaler": scaler,
    }
    (partial / TRAINING_STATE_JSON).write_text(json.dumps(state, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    # A rename is atomic: a run killed while saving never leaves a half-written "epoch-N".
    os.replace(partial, final)
    if total_limit is not None:
        for old in list_checkpoints(checkpoints_dir)[:-total_limit]:
            shutil.rmtree(old)
    return final


def read_checkpoint_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / TRAINING_STATE_JSON).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{checkpoint / TRAINING_STATE_JSON}: unreadable checkpoint state ({error})") from error


def restore_checkpoint(
    checkpoint: Path, saved: dict[str, Any], adapter: ECLoRAAdapter, ecm: EngagementConditioningModule,
    optimizer, lr_scheduler, accelerator: Accelerator,
) -> tuple[int, int, list[float]]:
    """Load a checkpoint's weights and optimizer state in place; (epoch, global step, losses)."""
    _, lora_state, ecm_state = load_adapter_weights(checkpoint)
    adapter.load_lora_state_dict(lora_state, source=str(checkpoint))
    ecm.load_state_dict(ecm_state)
    tensors = load_file(checkpoint / TRAINING_STATE_TENSORS)
    optimizer.load_state_dict(_optimizer_state_from_files(tensors, saved["optimizer_param_groups"]))
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if accelerator.scaler is not None and saved.get("grad_scaler"):
        accelerator.scaler.load_state_dict(saved["grad_scaler"])
    return saved["epoch"], saved["global_step"], list(saved["losses"])

"""Per-epoch checkpoints of a training run: what defines the run, where its checkpoints live, which one is safe to resume.

Layout: one folder per run under the checkpoints root, named by the first 16 hex digits of
the run's fingerprint (`run_fingerprint`: base UNet weights and config, adapter config with
its layer names, latent cache, training config, precision, process count, training code):

    <root>/<fingerprint[:16]>/run.json          the full fingerprint, what it covers, when last used
    <root>/<fingerprint[:16]>/epoch-NNNN/       adapter (LoRA, ECM, config, text-encoder LoRA when it
                                                has one), optimizer tensors
                                                (`training_state.safetensors`), the rest as JSON
                                                (`training_state.json`); nothing is pickled

Rules:
- A run only ever resumes its own folder; another run's folder is never touched, except that
  only the `runs_limit` most recently used unfinished runs are kept (`open_run` prunes the rest).
- Checkpoints are resume state of an unfinished run: a run that finishes removes its folder
  (`close_run`), so a finished run is never "resumed" into a no-op. Rerunning its stage
  (`dvc repro -f`, a code change) trains it again from scratch.
- A save goes to a dot-named folder and is renamed into place: a run killed while saving
  never leaves a half-written `epoch-N`. Before resuming, `find_resumable` reads the newest
  checkpoint completely, checks its fingerprint and that every tensor is finite, and falls back
  to the previous one, naming the unusable one and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ec_lora_t.adapter.config import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    ECM_WEIGHTS_NAME,
    TEXT_ENCODER_WEIGHTS_NAME,
    ECLoRAConfig,
)
from ec_lora_t.adapter.ecm import EngagementConditioningModule
from ec_lora_t.adapter.model import ECLoRAAdapter, save_adapter, save_safetensors
from ec_lora_t.training.ema import EMA_WEIGHTS_NAME
from ec_lora_t.training.cache import LatentCache
from ec_lora_t.training.config import TrainingConfig

TRAINING_STATE_TENSORS = "training_state.safetensors"
TRAINING_STATE_JSON = "training_state.json"
RUN_STATE_JSON = "run.json"
CHECKPOINT_NAME = re.compile(r"^epoch-(\d{4,})$")
RUN_NAME = re.compile(r"^[0-9a-f]{16}$")
STATE_KEYS = ("fingerprint", "epoch", "global_step", "losses", "timing", "optimizer_param_groups", "lr_scheduler")
# TrainingConfig fields that decide what is kept on disk, not what is trained.
NOT_IN_FINGERPRINT = ("checkpoints_total_limit", "checkpoint_runs_limit")
# The code whose change changes a run's numbers (this package's adapter and training).
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
FINGERPRINTED_CODE = ("adapter", "training")


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed; the message names the folder and the reason."""


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    # Through uint8 so that every dtype (bf16 included) hashes its exact bits.
    return tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def unet_fingerprint(unet: nn.Module) -> str:
    """sha256 of the base UNet's config and weights: two base models never share a run.

    Call it on the loaded model, before it is cast or adapted. Reads every weight once (a
    few seconds for SD1.5's 3.4 GB in fp32).
    """
    digest = hashlib.sha256()
    config = getattr(unet, "config", None)
    if config is not None:
        # Private keys say where the model came from (`_name_or_path`) or hold sets in hash
        # order (`_use_default_values`): not what the model is.
        public = {key: value for key, value in dict(config).items() if not key.startswith("_")}
        digest.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in sorted(unet.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def code_fingerprint() -> str:
    """sha256 of the adapter and training source files and the torch and diffusers versions.

    A run interrupted before a code change resumes into a fresh run after it, not into a
    mixture of the two versions.
    """
    import diffusers

    digest = hashlib.sha256(f"torch {torch.__version__}, diffusers {diffusers.__version__}".encode())
    for package in FINGERPRINTED_CODE:
        for source in sorted((_PACKAGE_ROOT / package).rglob("*.py")):
            digest.update(source.relative_to(_PACKAGE_ROOT).as_posix().encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()


def run_fingerprint(
    cache: LatentCache,
    lora_config: ECLoRAConfig,
    training: TrainingConfig,
    mixed_precision: str,
    base_model: str,
    num_processes: int = 1,
) -> tuple[str, dict[str, Any]]:
    """(sha256, what it covers) of everything that changes a run's result.

    `lora_config` must carry its `layer_names` (inject first); `base_model` is
    `unet_fingerprint(unet)`; `mixed_precision` is "auto" as resolved on this machine;
    `num_processes` splits the data differently. The checkpoint limits change nothing.
    """
    if not lora_config.layer_names:
        raise ValueError("lora_config.layer_names is empty: fingerprint the run after injecting the adapter")
    description = {
        "base_model": base_model,
        "data": cache.fingerprint(),
        "lora": lora_config.to_dict(),
        "training": {k: v for k, v in asdict(training).items() if k not in NOT_IN_FINGERPRINT},
        "mixed_precision": mixed_precision,
        "num_processes": num_processes,
        "code": code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest(), description


def run_folder(checkpoints_root: str | Path, fingerprint: str) -> Path:
    return Path(checkpoints_root) / fingerprint[:16]


def _write_json_atomically(path: Path, value: Any) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(partial, path)


def list_runs(checkpoints_root: str | Path) -> list[Path]:
    """Run folders under the root, least recently used first (`run.json`'s `last_used`)."""
    root = Path(checkpoints_root)
    if not root.is_dir():
        return []

    def last_used(folder: Path) -> float:
        try:
            return float(json.loads((folder / RUN_STATE_JSON).read_text())["last_used"])
        except (OSError, ValueError, KeyError, TypeError):
            return folder.stat().st_mtime  # a run.json cut short: the folder's own time

    runs = [p for p in root.iterdir() if p.is_dir() and RUN_NAME.match(p.name)]
    return sorted(runs, key=last_used)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of one run, oldest first (a save in progress lives under a dot-name)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))


def open_run(
    checkpoints_root: str | Path,
    fingerprint: str,
    description: dict[str, Any],
    runs_limit: int | None,
    log: Callable[[str], None],
) -> Path:
    """Create or touch this run's folder and keep at most `runs_limit` runs (this one included).

    Main process only. Other runs are removed least recently used first, and only beyond
    the limit; saves that a kill cut short (dot-named folders) are cleared.
    """
    root = Path(checkpoints_root)
    folder = run_folder(root, fingerprint)
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in [*root.glob(".*"), *folder.glob(".*")]:
        if leftover.is_dir():  # a save or a removal that a kill cut short
            shutil.rmtree(leftover, ignore_errors=True)
    _write_json_atomically(
        folder / RUN_STATE_JSON, {"fingerprint": fingerprint, "last_used": time.time(), "covers": description}
    )
    if list(root.glob("epoch-*")):
        log(f"{root}: epoch-* folders at the top level are checkpoints of the layout before one folder per run; "
            "they are never resumed, delete them to free the space")
    others = [run for run in list_runs(root) if run != folder]
    if runs_limit is not None:
        for old in others[: max(0, len(others) - (runs_limit - 1))]:
            log(f"removing {old}: an unfinished run's checkpoints, beyond checkpoint_runs_limit={runs_limit} "
                "(least recently used first)")
            _remove_folder(old)
    return folder


def _remove_folder(folder: Path) -> None:
    # Renamed first, so a kill during the removal leaves a dot-folder that nothing resumes.
    doomed = folder.with_name(f".removing-{folder.name}")
    if doomed.exists():  # left by a removal that a kill cut short
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def close_run(run_dir: str | Path) -> None:
    """Remove a finished run's checkpoints (main process only): a finished run is never resumed."""
    if Path(run_dir).is_dir():
        _remove_folder(Path(run_dir))


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


def save_checkpoint(
    run_dir: Path,
    epoch: int,
    adapter: ECLoRAAdapter,
    ecm: EngagementConditioningModule,
    optimizer,
    lr_scheduler,
    accelerator: Accelerator,
    state: dict[str, Any],
    total_limit: int | None,
    ema_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `epoch-NNNN` atomically and keep only the newest `total_limit` of this run
    (with `ema_tensors`, the weights' moving average, as `ema.safetensors`)."""
    final = run_dir / f"epoch-{epoch:04d}"
    partial = run_dir / f".epoch-{epoch:04d}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    save_adapter(partial, adapter, ecm)
    optimizer_tensors, param_groups = _optimizer_state_to_files(optimizer)
    save_safetensors(optimizer_tensors, partial / TRAINING_STATE_TENSORS)
    if ema_tensors is not None:
        save_safetensors(ema_tensors, partial / EMA_WEIGHTS_NAME)
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    state = {
        **state,
        "optimizer_param_groups": param_groups,
        "lr_scheduler": lr_scheduler.state_dict(),
        "grad_scaler": scaler,
    }
    (partial / TRAINING_STATE_JSON).write_text(json.dumps(state, indent=1) + "\n")
    if final.exists():  # an unusable checkpoint of this epoch, being trained again
        _remove_folder(final)
    # A rename is atomic: a run killed while saving never leaves a half-written "epoch-N".
    os.replace(partial, final)
    if total_limit is not None:
        for old in list_checkpoints(run_dir)[:-total_limit]:
            _remove_folder(old)
    return final


@dataclass
class LoadedCheckpoint:
    """A checkpoint read completely and checked; what `restore_checkpoint` puts back."""

    path: Path
    state: dict[str, Any]  # training_state.json
    lora_state: dict[str, torch.Tensor]
    ecm_state: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    text_encoder_state: dict[str, torch.Tensor] | None = None  # the text encoder's LoRA, when it has one
    ema_state: dict[str, torch.Tensor] | None = None  # the weights' moving average, when the run keeps one

    @property
    def epoch(self) -> int:
        return int(self.state["epoch"])


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: unreadable ({' '.join(str(error).split())})") from None


def load_checkpoint(checkpoint: str | Path, fingerprint: str) -> LoadedCheckpoint:
    """Read a checkpoint completely; CheckpointError if it is not a finite checkpoint of this run."""
    checkpoint = Path(checkpoint)
    try:
        state = json.loads((checkpoint / TRAINING_STATE_JSON).read_text())
        adapter_config = json.loads((checkpoint / ADAPTER_CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{checkpoint}: unreadable state ({' '.join(str(error).split())})") from None
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{checkpoint / TRAINING_STATE_JSON}: lacks {missing}")
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{checkpoint}: made by another run (fingerprint {str(state.get('fingerprint'))[:16]})")
    match = CHECKPOINT_NAME.match(checkpoint.name)
    if match is None or int(match.group(1)) != state.get("epoch"):
        raise CheckpointError(f"{checkpoint}: its state says epoch {state.get('epoch')}")
    loaded = LoadedCheckpoint(
        path=checkpoint,
        state=state,
        lora_state=_read_tensors(checkpoint / ADAPTER_WEIGHTS_NAME),
        ecm_state=_read_tensors(checkpoint / ECM_WEIGHTS_NAME),
        optimizer_tensors=_read_tensors(checkpoint / TRAINING_STATE_TENSORS),
    )
    if (checkpoint / TEXT_ENCODER_WEIGHTS_NAME).exists():
        loaded.text_encoder_state = _read_tensors(checkpoint / TEXT_ENCODER_WEIGHTS_NAME)
    if (checkpoint / EMA_WEIGHTS_NAME).exists():
        loaded.ema_state = _read_tensors(checkpoint / EMA_WEIGHTS_NAME)
    if adapter_config.get("layer_names") is None:
        raise CheckpointError(f"{checkpoint}: {ADAPTER_CONFIG_NAME} has no layer_names")
    for file_name, tensors in ((ADAPTER_WEIGHTS_NAME, loaded.lora_state), (ECM_WEIGHTS_NAME, loaded.ecm_state),
                               (TRAINING_STATE_TENSORS, loaded.optimizer_tensors),
                               (TEXT_ENCODER_WEIGHTS_NAME, loaded.text_encoder_state or {}),
                               (EMA_WEIGHTS_NAME, loaded.ema_state or {})):
        bad = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
        if bad:
            raise CheckpointError(f"{checkpoint / file_name}: non-finite values in {bad[:3]}")
    if not all(isinstance(loss, (int, float)) for loss in state.get("losses", [None])):
        raise CheckpointError(f"{checkpoint}: its loss history is damaged")
    return loaded


def find_resumable(run_dir: str | Path, fingerprint: str, log: Callable[[str], None]) -> LoadedCheckpoint | None:
    """The newest checkpoint of the run that reads back whole and finite; the others are named in the log."""
    for checkpoint in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(checkpoint, fingerprint)
        except CheckpointError as error:
            log(f"cannot resume from {checkpoint}: {error}; trying the checkpoint before it")
    return None


def restore_checkpoint(
    loaded: LoadedCheckpoint, adapter: ECLoRAAdapter, ecm: EngagementConditioningModule, optimizer, lr_scheduler,
    accelerator: Accelerator,
) -> tuple[int, int, list[float]]:
    """Put a loaded checkpoint's weights and optimizer state back in place; (epoch, global step, losses)."""
    saved = loaded.state
    adapter.load_lora_state_dict(loaded.lora_state, source=str(loaded.path))
    if adapter.text_encoder_lora is not None:
        # The fingerprint covers the adapter config: a checkpoint of this run has the file.
        adapter.text_encoder_lora.load_state_dict(loaded.text_encoder_state or {}, source=str(loaded.path))
    ecm.load_state_dict(loaded.ecm_state)
    optimizer.load_state_dict(_optimizer_state_from_files(loaded.optimizer_tensors, saved["optimizer_param_groups"]))
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if accelerator.scaler is not None and saved.get("grad_scaler"):
        accelerator.scaler.load_state_dict(saved["grad_scaler"])
    return saved["epoch"], saved["global_step"], list(saved["losses"])

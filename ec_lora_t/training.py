"""Training EC-LoRA-T from cached latents (report 4.5, 4.6), with accelerate.

The latents stage has already run the VAE and the text encoder once per image, so a step
only samples latents = mean + std * noise (what `latent_dist.sample()` would do), adds noise
at a random timestep and trains the UNet's EC-LoRA layers and the ECM to predict it.

accelerate skeleton (diffusers `train_text_to_image_lora.py`): freeze the UNet, cast it to
the compute dtype, inject the adapters, keep the trainable parameters fp32, `prepare`,
`accumulate`, act only on `sync_gradients`, save only adapter weights.

Resuming: every epoch ends with a checkpoint (adapter, ECM, optimizer, LR schedule, loss
history; safetensors + JSON, nothing pickled). The data order and all noise of epoch e are
a pure function of (seed, e), so a run resumed from the checkpoint of epoch e replays
epochs e+1... exactly as an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_cosine_schedule_with_warmup
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ec_lora_t.conditioning import engagement_conditioning
from ec_lora_t.ecm import ENGAGEMENT_TIME_DIM, EngagementConditioningModule
from ec_lora_t.lora import (
    ECLoRAConfig,
    build_ecm,
    inject_ec_lora,
    load_adapter_weights,
    load_lora_state_dict,
    lora_parameters,
    save_adapter,
)

MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")
COMPUTE_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CACHE_TENSORS = ("latent_mean", "latent_std", "text_embeddings", "engagement_time")
# Written by the latents stage since caption dropout; older caches train without it.
OPTIONAL_CACHE_TENSORS = ("generic_text_embeddings",)
TRAINING_STATE_TENSORS = "training_state.safetensors"
TRAINING_STATE_JSON = "training_state.json"
CHECKPOINT_NAME = re.compile(r"^epoch-(\d{4,})$")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops before the optimizer uses it."""


@dataclass
class TrainingConfig:
    learning_rate: float = 1e-4
    # None: the ECM trains with `learning_rate` like the LoRA matrices (the report's setup).
    ecm_learning_rate: float | None = None
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_warmup_ratio: float = 0.1
    epochs: int = 4
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"  # auto (bf16 on a GPU, no on a CPU) | no | fp16 | bf16
    gradient_checkpointing: bool = False
    seed: int = 42
    # Keep only the newest checkpoints (None: keep all); the run resumes from the newest.
    checkpoints_total_limit: int | None = 2
    # Probability that a sample trains on its generic caption (style tag and season only)
    # instead of its full caption. 0 is the report's setup. Why it matters: a full caption
    # already names what engagement depends on (the outfit, the light), so the vector adds
    # nothing the text does not say and the model learns to ignore it; with the generic
    # caption only the vector tells the model which kind of picture to draw.
    caption_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {self.mixed_precision!r}")
        for name in ("epochs", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.lr_warmup_ratio < 1.0:
            raise ValueError(f"lr_warmup_ratio must be in [0, 1), got {self.lr_warmup_ratio}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")


@dataclass
class LatentCache:
    """The latents stage's tensors, row i = one training image."""

    latent_mean: torch.Tensor  # (N, 4, h, w) fp32, times the VAE scaling factor
    latent_std: torch.Tensor  # (N, 4, h, w) fp32, times the VAE scaling factor
    text_embeddings: torch.Tensor  # (N, 77, D)
    engagement_time: torch.Tensor  # (N, 2) [normalized_engagement, normalized_time]
    generic_text_embeddings: torch.Tensor | None = None  # (N, 77, D) style tag + season only

    def tensor_names(self) -> tuple[str, ...]:
        return CACHE_TENSORS + tuple(name for name in OPTIONAL_CACHE_TENSORS if getattr(self, name) is not None)

    def __len__(self) -> int:
        return self.latent_mean.shape[0]

    def fingerprint(self) -> str:
        """sha256 of the tensors: a checkpoint made on other data must not be resumed."""
        digest = hashlib.sha256()
        for name in self.tensor_names():
            tensor = getattr(self, name).detach().to("cpu", torch.float32).contiguous()
            digest.update(name.encode() + str(tuple(tensor.shape)).encode())
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()


def validate_latent_cache(cache: LatentCache, source: str = "latent cache") -> LatentCache:
    """Check shapes and values; `source` (the file) is named in every error."""
    num_images = len(cache)
    if num_images == 0:
        raise ValueError(f"{source}: the cache holds no images")
    if cache.latent_mean.ndim != 4:
        raise ValueError(f"{source}: latent_mean must be (N, C, h, w), got {tuple(cache.latent_mean.shape)}")
    if cache.latent_std.shape != cache.latent_mean.shape:
        raise ValueError(
            f"{source}: latent_std {tuple(cache.latent_std.shape)} differs from "
            f"latent_mean {tuple(cache.latent_mean.shape)}"
        )
    if cache.text_embeddings.ndim != 3 or cache.text_embeddings.shape[0] != num_images:
        raise ValueError(
            f"{source}: text_embeddings must be ({num_images}, L, D), got {tuple(cache.text_embeddings.shape)}"
        )
    if cache.engagement_time.shape != (num_images, ENGAGEMENT_TIME_DIM):
        raise ValueError(
            f"{source}: engagement_time must be ({num_images}, {ENGAGEMENT_TIME_DIM}), "
            f"got {tuple(cache.engagement_time.shape)}"
        )
    generic = cache.generic_text_embeddings
    if generic is not None and generic.shape != cache.text_embeddings.shape:
        raise ValueError(
            f"{source}: generic_text_embeddings {tuple(generic.shape)} differs from "
            f"text_embeddings {tuple(cache.text_embeddings.shape)}"
        )
    for name in cache.tensor_names():
        tensor = getattr(cache, name)
        if not tensor.is_floating_point():
            raise ValueError(f"{source}: {name} must be a float tensor, got {tensor.dtype}")
        bad_rows = (~torch.isfinite(tensor.reshape(num_images, -1))).any(dim=1).nonzero().flatten()
        if len(bad_rows):
            raise ValueError(f"{source}: {name} has non-finite values in rows {bad_rows[:10].tolist()}")
    if (cache.latent_std < 0).any():
        raise ValueError(f"{source}: latent_std has negative values")
    return cache


def load_latent_cache(path: str | Path) -> LatentCache:
    """Read `latents.safetensors` written by the latents stage (see docs/architecture.md)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: latent cache not found; run the latents stage first")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    missing = [name for name in CACHE_TENSORS if name not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}; it has {sorted(tensors)}")
    present = CACHE_TENSORS + tuple(name for name in OPTIONAL_CACHE_TENSORS if name in tensors)
    return validate_latent_cache(LatentCache(**{name: tensors[name] for name in present}), source=str(path))


class CachedLatentsDataset(Dataset):
    def __init__(self, cache: LatentCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: getattr(self.cache, name)[index] for name in self.cache.tensor_names()}


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """One seed per (run seed, epoch, random stream) so every epoch can be replayed alone."""
    return (seed * 1_000_003 + epoch) * 4096 + stream


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation every epoch, fixed by (seed, epoch) alone."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


def resolve_mixed_precision(mixed_precision: str, device_type: str) -> str:
    """'auto' -> bf16 on a CUDA GPU, 'no' (fp32) elsewhere; other values pass through."""
    if mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {mixed_precision!r}")
    if mixed_precision == "auto":
        return "bf16" if device_type == "cuda" else "no"
    return mixed_precision


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated by torch, or the process's peak RSS on a CPU (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def diffusion_training_step(
    accelerator: Accelerator,
    unet: nn.Module,
    ecm: EngagementConditioningModule | None,
    noise_scheduler,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    mode: str = "ec_lora",
    caption_dropout: float = 0.0,
) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns the detached loss.

    Noise-prediction loss of report 4.6 on cached latents. The backward pass runs inside
    the conditioning block because gradient checkpointing re-runs layers during backward.
    """
    latent_mean = batch["latent_mean"]
    device = latent_mean.device
    compute_dtype = next(p for p in unet.parameters() if not p.requires_grad).dtype
    # 1. Sample latents from the cached VAE posterior, as latent_dist.sample() would.
    latents = latent_mean + batch["latent_std"] * torch.randn(
        latent_mean.shape, generator=generator, device=device
    )
    # 2. Noise and 3. one uniform timestep per sample.
    noise = torch.randn(latents.shape, generator=generator, device=device)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=device
    )
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")
    # 4. Cached text embeddings; with caption dropout some samples get their generic caption.
    text_embeddings = batch["text_embeddings"]
    if caption_dropout > 0.0:
        dropped = torch.rand(latents.shape[0], generator=generator, device=device) < caption_dropout
        text_embeddings = torch.where(dropped[:, None, None], batch["generic_text_embeddings"], text_embeddings)
    # 5./6. The vector conditions the adapters; the UNet predicts the noise.
    with engagement_conditioning(accelerator.unwrap_model(unet), ecm, batch["engagement_time"], mode=mode):
        noise_pred = unet(
            noisy_latents.to(compute_dtype),
            timesteps,
            encoder_hidden_states=text_embeddings.to(compute_dtype),
            return_dict=False,
        )[0]
        loss = F.mse_loss(noise_pred.float(), target.float())
        accelerator.backward(loss)
    return loss.detach()


@dataclass
class TrainingResult:
    losses: list[float]  # one per optimizer step, over the whole run (resumed epochs included)
    steps: int
    epochs: int
    images_per_second: float  # all epochs, resumed ones included; checkpoint saving excluded
    peak_memory_mb: float
    mixed_precision: str
    resumed_from_epoch: int  # 0 when the run started fresh
    num_images: int
    num_lora_layers: int
    trainable_parameters: int
    device: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def _run_fingerprint(
    cache: LatentCache, lora_config: ECLoRAConfig, training: TrainingConfig, mixed_precision: str
) -> str:
    # Everything that changes the result ("auto" precision as resolved on this machine);
    # the checkpoint limit does not.
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


def _save_checkpoint(
    checkpoints_dir: Path,
    epoch: int,
    unet: nn.Module,
    ecm: EngagementConditioningModule,
    lora_config: ECLoRAConfig,
    optimizer,
    lr_scheduler,
    accelerator: Accelerator,
    state: dict[str, Any],
    total_limit: int | None,
) -> Path:
    final = checkpoints_dir / f"epoch-{epoch:04d}"
    partial = checkpoints_dir / f".epoch-{epoch:04d}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    save_adapter(partial, unet, ecm, lora_config)
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


def _read_checkpoint_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / TRAINING_STATE_JSON).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{checkpoint / TRAINING_STATE_JSON}: unreadable checkpoint state ({error})") from error


def train_ec_lora(
    unet: nn.Module,
    noise_scheduler,
    cache: LatentCache,
    lora_config: ECLoRAConfig,
    training: TrainingConfig,
    checkpoints_dir: str | Path,
    adapter_dir: str | Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] = print,
) -> TrainingResult:
    """Train EC-LoRA layers + ECM on `unet` (modified in place) from cached latents.

    Resumes from the newest checkpoint in `checkpoints_dir` that was made with the same
    data and configs; checkpoints from other data or configs are deleted with a notice.
    Saves the final adapter to `adapter_dir` when given. `on_step(step, loss)` is called
    after every optimizer step (progress display; tests use it to interrupt a run).
    """
    checkpoints_dir = Path(checkpoints_dir)
    validate_latent_cache(cache)
    _check_cache_fits_unet(cache, unet)
    if training.caption_dropout > 0 and cache.generic_text_embeddings is None:
        raise ValueError(
            "caption_dropout > 0 needs generic_text_embeddings in the latent cache; rerun the latents stage"
        )

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mixed_precision = resolve_mixed_precision(training.mixed_precision, device_type)
    accelerator = Accelerator(
        mixed_precision=mixed_precision, gradient_accumulation_steps=training.gradient_accumulation_steps
    )
    set_seed(training.seed)  # LoRA A and ECM initialisation

    # 1. Freeze the UNet and cast it to the compute dtype; 2. add the adapters (fp32).
    unet.requires_grad_(False)
    unet.to(accelerator.device)
    if mixed_precision != "no":
        unet.to(COMPUTE_DTYPES[mixed_precision])
    inject_ec_lora(unet, lora_config)
    ecm = build_ecm(lora_config, accelerator.device)
    if training.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # diffusers checkpoints non-reentrantly: ECM grads flow
    lora_params = lora_parameters(unet)
    # 3. AdamW over the trainable parameters only; the ECM may get its own learning rate.
    ecm_learning_rate = training.learning_rate if training.ecm_learning_rate is None else training.ecm_learning_rate
    optimizer = torch.optim.AdamW(
        [
            {"params": lora_params, "lr": training.learning_rate},
            {"params": list(ecm.parameters()), "lr": ecm_learning_rate},
        ],
        lr=training.learning_rate,
        betas=(training.adam_beta1, training.adam_beta2),
        eps=training.adam_epsilon,
        weight_decay=training.weight_decay,
    )
    sampler = EpochShuffleSampler(len(cache), training.seed)
    dataloader = DataLoader(CachedLatentsDataset(cache), batch_size=training.batch_size, sampler=sampler)
    batches_per_epoch = math.ceil(len(cache) / (training.batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / training.gradient_accumulation_steps)
    total_steps = training.epochs * steps_per_epoch
    # accelerate's prepared scheduler steps once per process; scale the schedule to match.
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer,
        num_warmup_steps=round(training.lr_warmup_ratio * total_steps) * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    unet, ecm, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, ecm, optimizer, dataloader, lr_scheduler)
    unwrapped_unet, unwrapped_ecm = accelerator.unwrap_model(unet), accelerator.unwrap_model(ecm)

    # 4. Resume from the newest compatible checkpoint.
    fingerprint = _run_fingerprint(cache, lora_config, training, mixed_precision)
    start_epoch, global_step, losses = 0, 0, []
    # Throughput over all epochs of the run, resumed ones included (the checkpoint carries them).
    timing = {"train_seconds": 0.0, "images_seen": 0}
    checkpoints = list_checkpoints(checkpoints_dir)
    if checkpoints:
        saved = _read_checkpoint_state(checkpoints[-1])
        if saved.get("fingerprint") != fingerprint:
            log(f"{checkpoints_dir}: checkpoints were made with other data or params; starting from scratch")
            if accelerator.is_main_process:
                for old in checkpoints:
                    shutil.rmtree(old)
        else:
            start_epoch, global_step, losses = _restore_checkpoint(
                checkpoints[-1], saved, unwrapped_unet, unwrapped_ecm, optimizer, lr_scheduler, accelerator
            )
            timing = {key: saved["timing"][key] for key in timing}
            log(f"resumed from {checkpoints[-1]} (epoch {start_epoch}, step {global_step})")

    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    for epoch in range(start_epoch, training.epochs):
        epoch_started = time.perf_counter()
        unet.train()
        dataloader.set_epoch(epoch)
        generator = torch.Generator(device=accelerator.device).manual_seed(
            epoch_seed(training.seed, epoch, stream=1 + accelerator.process_index)
        )
        window_losses: list[torch.Tensor] = []
        for batch_index, batch in enumerate(dataloader):
            with accelerator.accumulate(unet, ecm):
                loss = diffusion_training_step(
                    accelerator, unet, ecm, noise_scheduler, batch, generator, caption_dropout=training.caption_dropout
                )
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at optimizer step {global_step + 1} (epoch {epoch + 1}, "
                        f"batch {batch_index + 1}); stopped before the update. Lower learning_rate, or use "
                        "mixed_precision bf16 or no instead of fp16"
                    )
                window_losses.append(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            timing["images_seen"] += batch["latent_mean"].shape[0] * accelerator.num_processes
            # 5. Act only when the accumulated gradients were applied.
            if accelerator.sync_gradients:
                global_step += 1
                step_loss = accelerator.gather(torch.stack(window_losses).mean()).mean().item()
                losses.append(step_loss)
                window_losses = []
                if on_step is not None:
                    on_step(global_step, step_loss)
        accelerator.wait_for_everyone()
        timing["train_seconds"] += time.perf_counter() - epoch_started
        if accelerator.is_main_process:
            checkpoint = _save_checkpoint(
                checkpoints_dir, epoch + 1, unwrapped_unet, unwrapped_ecm, lora_config, optimizer, lr_scheduler,
                accelerator,
                {"fingerprint": fingerprint, "epoch": epoch + 1, "global_step": global_step, "losses": losses,
                 "timing": timing},
                training.checkpoints_total_limit,
            )
            log(f"epoch {epoch + 1}/{training.epochs}: step {global_step}, loss {losses[-1]:.5f} -> {checkpoint}")

    accelerator.wait_for_everyone()
    if adapter_dir is not None and accelerator.is_main_process:
        # 6. Only adapter weights are saved, never the (frozen) UNet.
        save_adapter(adapter_dir, unwrapped_unet, unwrapped_ecm, lora_config)
    return TrainingResult(
        losses=losses,
        steps=global_step,
        epochs=training.epochs,
        images_per_second=timing["images_seen"] / timing["train_seconds"],
        peak_memory_mb=peak_memory_mb(accelerator.device),
        mixed_precision=mixed_precision,
        resumed_from_epoch=start_epoch,
        num_images=len(cache),
        num_lora_layers=len(lora_config.layer_names),
        trainable_parameters=sum(p.numel() for p in lora_params) + sum(p.numel() for p in unwrapped_ecm.parameters()),
        device=str(accelerator.device),
    )


def _restore_checkpoint(
    checkpoint: Path, saved: dict[str, Any], unet: nn.Module, ecm: EngagementConditioningModule,
    optimizer, lr_scheduler, accelerator: Accelerator,
) -> tuple[int, int, list[float]]:
    _, lora_state, ecm_state = load_adapter_weights(checkpoint)
    load_lora_state_dict(unet, lora_state, source=str(checkpoint))
    ecm.load_state_dict(ecm_state)
    tensors = load_file(checkpoint / TRAINING_STATE_TENSORS)
    optimizer.load_state_dict(_optimizer_state_from_files(tensors, saved["optimizer_param_groups"]))
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if accelerator.scaler is not None and saved.get("grad_scaler"):
        accelerator.scaler.load_state_dict(saved["grad_scaler"])
    return saved["epoch"], saved["global_step"], list(saved["losses"])


def _check_cache_fits_unet(cache: LatentCache, unet: nn.Module) -> None:
    config = unet.config
    if cache.latent_mean.shape[1] != config.in_channels:
        raise ValueError(
            f"latent cache has {cache.latent_mean.shape[1]} latent channels, the UNet expects {config.in_channels}"
        )
    if cache.text_embeddings.shape[2] != config.cross_attention_dim:
        raise ValueError(
            f"latent cache has text embeddings of width {cache.text_embeddings.shape[2]}, the UNet's "
            f"cross_attention_dim is {config.cross_attention_dim}: were they made with another text encoder?"
        )

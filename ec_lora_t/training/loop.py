"""Training EC-LoRA-T from cached latents (report 4.5, 4.6), with accelerate, in four named steps.

    run = setup_training(accelerator, unet, noise_scheduler, cache, lora_config, training)
    resume_training(run, checkpoints_dir)             # from the newest checkpoint of this run
    for epoch in range(run.start_epoch, training.epochs):
        train_epoch(run, epoch)                       # then a checkpoint
    result = finish_training(run, adapter_dir)        # adapter weights only

`train_ec_lora` runs them in that order. The caller owns the `Accelerator` (accelerate's
state is process-wide: one per process, made by the stage or the test), see `make_accelerator`.

accelerate skeleton (diffusers `train_text_to_image_lora.py`): freeze the UNet, cast it to
the compute dtype, inject the adapters, keep the trainable parameters fp32, `prepare`,
`accumulate`, act only on `sync_gradients`, save only adapter weights.

Resuming: every epoch ends with a checkpoint in the run's own folder
(`ec_lora_t.training.checkpoint`). The data order and all noise of epoch e are a pure function
of (seed, e), so a run resumed from the checkpoint of epoch e replays epochs e+1... exactly as an
uninterrupted run would. A finished run removes its checkpoints: it is never resumed.

Several processes: only the main process writes, prunes and logs; every process reads a
checkpoint only after a barrier, the one the main process chose. A non-finite loss on any
process stops every process with the same message, because the check is on the gathered
losses, not on the local one (raising on one process alone would leave the others waiting in
the next collective until the timeout).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch import nn

from ec_lora_t.adapter.config import ECLoRAConfig, with_ecm_input_statistics
from ec_lora_t.adapter.model import ECLoRAAdapter, add_ec_lora, save_adapter
from ec_lora_t.training.cache import (
    EpochShuffleSampler,
    LatentCache,
    ResidentBatches,
    check_cache_fits_unet,
    engagement_balance_weights,
    epoch_seed,
    shuffled_vectors,
    validate_latent_cache,
)
from ec_lora_t.training.checkpoint import (
    close_run,
    find_resumable,
    load_checkpoint,
    open_run,
    restore_checkpoint,
    run_fingerprint,
    run_folder,
    save_checkpoint,
    unet_fingerprint,
)
from ec_lora_t.training.config import TrainingConfig
from ec_lora_t.training.ema import averaged_weights, ema_state_tensors, load_ema_state_tensors, make_ema
from ec_lora_t.training.guards import NonFiniteLossError, check_finite_weights, non_finite_error
from ec_lora_t.training.objective import diffusion_training_step
from ec_lora_t.training.precision import (
    COMPUTE_DTYPES,
    peak_memory_mb,
    resolve_mixed_precision,
)
from ec_lora_t.training.text_encoder import add_text_encoder_lora
from ec_lora_t.training.throughput import Throughput


@dataclass
class TrainingResult:
    losses: list[float]  # one per optimizer step, over the whole run (resumed epochs included)
    grad_norms: list[float]  # one per optimizer step: the gradient norm before clipping
    max_grad_norm: float | None  # the clipping threshold (None: no clipping)
    steps: int
    epochs: int
    images_seen: int  # by all processes, all epochs, resumed ones included
    images_per_second: float  # all epochs, resumed ones included; checkpoint saving excluded
    # After the first STEADY_AFTER_STEPS steps of this run, synchronised (None: too few steps).
    steady_images_per_second: float | None
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


@dataclass
class TrainingRun:
    """What one training run holds between its steps."""

    accelerator: Accelerator
    training: TrainingConfig
    adapter: ECLoRAAdapter  # the unwrapped layers and ECM: saved, restored, counted
    unet: nn.Module  # as prepared by accelerate: what runs
    ecm: nn.Module  # as prepared by accelerate: what runs
    text_encoder: nn.Module | None  # as prepared, when its LoRA trains; None: cached embeddings
    noise_scheduler: Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    batches: ResidentBatches
    fingerprint: str
    fingerprint_covers: dict[str, Any]  # what went into the fingerprint (run.json)
    num_images: int
    log: Callable[[str], None] = print  # the main process's log; the others stay quiet
    run_dir: Path | None = None  # this run's checkpoint folder (set by resume_training)
    start_epoch: int = 0
    global_step: int = 0
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    throughput: Throughput = field(default_factory=Throughput)  # this process's run, steady state
    ema: Any = None  # diffusers EMAModel of the trainable weights (train.ema_decay), saved for sampling
    # Throughput over all epochs of the run, resumed ones included (the checkpoint carries them).
    timing: dict[str, float] = field(default_factory=lambda: {"train_seconds": 0.0, "images_seen": 0})


def trainable_parameters(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """What trains: the optimizer's parameters (UNet LoRA, ECM, text-encoder LoRA), in group order."""
    return [parameter for group in optimizer.param_groups for parameter in group["params"]]


def make_optimizer(adapter: ECLoRAAdapter, training: TrainingConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW over the adapter's trainable parameters (its LoRA pairs, the text encoder's LoRA
    included, then the ECM, which may have its own learning rate)."""
    ecm_learning_rate = training.learning_rate if training.ecm_learning_rate is None else training.ecm_learning_rate
    return torch.optim.AdamW(
        [
            {"params": adapter.lora_parameters(), "lr": training.learning_rate},
            {"params": list(adapter.ecm.parameters()), "lr": ecm_learning_rate},
        ],
        lr=training.learning_rate,
        betas=(training.adam_beta1, training.adam_beta2),
        eps=training.adam_epsilon,
        weight_decay=training.weight_decay,
        # One fused kernel for all parameters on a GPU (each LoRA pair is two small tensors, so the
        # per-tensor launches add up); the CPU keeps torch's default, and the demo its numbers.
        fused=True if device_type == "cuda" else None,
    )


def make_accelerator(training: TrainingConfig) -> Accelerator:
    """The Accelerator a run of `training` needs ('auto' precision resolved for this machine)."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return Accelerator(
        mixed_precision=resolve_mixed_precision(training.mixed_precision, device_type),
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        # Without a GPU, processes started by torchrun or `accelerate launch` train together over gloo.
        cpu=device_type == "cpu",
        # No dynamo backend: accelerate would compile every prepared model, the ECM too, and under
        # mixed precision both run through accelerate's one autocast wrapper, so Dynamo sees one
        # function called two ways, recompiles it with dynamic shapes and stalls (issue 18).
        # `setup_training` compiles the UNet alone.
        dynamo_backend="no",
    )


def _check_accelerator(accelerator: Accelerator, training: TrainingConfig) -> str:
    mixed_precision = str(accelerator.mixed_precision)
    wanted = resolve_mixed_precision(training.mixed_precision, accelerator.device.type)
    if mixed_precision != wanted:
        raise ValueError(f"the Accelerator runs mixed_precision {mixed_precision!r}, the training config asks for {wanted!r}")
    if accelerator.gradient_accumulation_steps != training.gradient_accumulation_steps:
        raise ValueError(
            f"the Accelerator accumulates {accelerator.gradient_accumulation_steps} steps, the training config "
            f"{training.gradient_accumulation_steps}"
        )
    return mixed_precision


def setup_training(
    accelerator: Accelerator,
    unet: nn.Module,
    noise_scheduler,
    cache: LatentCache,
    lora_config: ECLoRAConfig,
    training: TrainingConfig,
    log: Callable[[str], None] = print,
    text_encoder: nn.Module | None = None,
) -> TrainingRun:
    """Freeze and cast the UNet (and the text encoder, for its LoRA), add the adapters, build
    optimizer, schedule and data; `prepare` them."""
    validate_latent_cache(cache)
    check_cache_fits_unet(cache, unet)
    if training.caption_dropout > 0 and cache.generic_text_embeddings is None:
        raise ValueError(
            "caption_dropout > 0 needs generic_text_embeddings in the latent cache; rerun the latents stage"
        )
    mixed_precision = _check_accelerator(accelerator, training)
    set_seed(training.seed)  # LoRA A and ECM initialisation
    # The base model's identity, read before it is cast or adapted: checkpoints of a run on
    # another UNet that shares the VAE and text encoder (so the same latent cache) never resume.
    base_model = unet_fingerprint(unet)

    # 1. Freeze the UNet and cast it to the compute dtype; 2. add the adapters (fp32).
    unet.requires_grad_(False)
    unet.to(accelerator.device)
    if mixed_precision != "no":
        unet.to(COMPUTE_DTYPES[mixed_precision])
    # A standardized ECM input reads the training set's statistics; the adapter's config keeps them.
    lora_config = with_ecm_input_statistics(lora_config, cache.engagement_time)
    adapter = add_ec_lora(unet, lora_config, accelerator.device)
    text_encoder = add_text_encoder_lora(adapter, text_encoder, cache, training.caption_dropout, accelerator.device,
                                         COMPUTE_DTYPES[mixed_precision])
    if training.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # diffusers checkpoints non-reentrantly: ECM grads flow
    if training.switched_on("channels_last", accelerator.device.type):
        unet.to(memory_format=torch.channels_last)  # the 4-d weights' layout, before the optimizer sees them
    # 3. AdamW over the trainable parameters only.
    optimizer = make_optimizer(adapter, training, accelerator.device.type)
    ema = make_ema(trainable_parameters(optimizer), training.ema_decay)
    if training.shuffle_vectors:
        cache = shuffled_vectors(cache, training.seed)
    weights = engagement_balance_weights(cache.engagement_time[:, 0], training.engagement_balance)
    sampler = EpochShuffleSampler(len(cache), training.seed, weights)
    # The whole cache on the device, batches by index (the demo at 512 px is about 160 MB).
    batches = ResidentBatches(
        cache, sampler, training.batch_size, accelerator.device,
        text_dtype=COMPUTE_DTYPES[mixed_precision], process_index=accelerator.process_index,
        num_processes=accelerator.num_processes, token_ids=text_encoder is not None,
    )
    steps_per_epoch = math.ceil(len(batches) / training.gradient_accumulation_steps)
    total_steps = training.epochs * steps_per_epoch
    # accelerate's prepared scheduler steps once per process; scale the schedule to match.
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer,
        num_warmup_steps=round(training.lr_warmup_ratio * total_steps) * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    prepared_unet, prepared_ecm, optimizer, lr_scheduler = accelerator.prepare(
        unet, adapter.ecm, optimizer, lr_scheduler
    )
    text_encoder = accelerator.prepare(text_encoder) if text_encoder is not None else None
    if training.switched_on("compile", accelerator.device.type):
        # Static shapes: every batch is full-sized except an epoch's last, which compiles once
        # more; the per-row scales reach the LoRA layers as tensors, so new vectors do not.
        prepared_unet = torch.compile(prepared_unet, backend="inductor", dynamic=False)
    fingerprint, covers = run_fingerprint(
        cache, lora_config, training, mixed_precision, base_model, accelerator.num_processes
    )
    return TrainingRun(
        accelerator=accelerator, training=training, adapter=adapter, unet=prepared_unet, ecm=prepared_ecm,
        text_encoder=text_encoder,
        noise_scheduler=noise_scheduler, optimizer=optimizer, lr_scheduler=lr_scheduler, batches=batches,
        fingerprint=fingerprint, fingerprint_covers=covers, num_images=len(cache),
        log=log if accelerator.is_main_process else _quiet, ema=ema,
    )


def _quiet(message: str) -> None:
    """The log of processes other than the main one."""


def resume_training(run: TrainingRun, checkpoints_dir: str | Path) -> None:
    """4. Continue from the newest usable checkpoint of this run's own folder under `checkpoints_dir`.

    Other runs' folders are kept (up to `checkpoint_runs_limit` unfinished runs). An unusable
    newest checkpoint (unreadable, cut short, non-finite) is named in the log and the one
    before it is used.
    """
    accelerator, root = run.accelerator, Path(checkpoints_dir)
    run.run_dir = run_folder(root, run.fingerprint)
    if accelerator.is_main_process:
        open_run(root, run.fingerprint, run.fingerprint_covers, run.training.checkpoint_runs_limit, run.log)
    # No process reads while the main one creates, cleans or prunes folders.
    accelerator.wait_for_everyone()
    loaded = find_resumable(run.run_dir, run.fingerprint, run.log) if accelerator.is_main_process else None
    # Every process resumes the checkpoint the main process chose.
    (chosen_epoch,) = broadcast_object_list([loaded.epoch if loaded is not None else None])
    if chosen_epoch is None:
        run.log(f"run {run.run_dir}: starting from scratch (no usable checkpoint of this run)")
        return
    if loaded is None:
        loaded = load_checkpoint(run.run_dir / f"epoch-{chosen_epoch:04d}", run.fingerprint)
    run.start_epoch, run.global_step, run.losses = restore_checkpoint(
        loaded, run.adapter, accelerator.unwrap_model(run.ecm), run.optimizer, run.lr_scheduler, accelerator
    )
    if run.ema is not None:  # the fingerprint covers ema_decay: a checkpoint of this run has the file
        load_ema_state_tensors(run.ema, loaded.ema_state or {}, str(loaded.path))
    run.grad_norms = list(loaded.state.get("grad_norms", []))
    run.timing = {key: loaded.state["timing"][key] for key in run.timing}
    run.throughput.first_step = run.global_step + 1
    run.log(f"resumed from {loaded.path} (epoch {run.start_epoch} of {run.training.epochs} done, "
            f"step {run.global_step})")


# On a GPU the host reads the step losses and gradient norms every this many optimizer steps,
# not every step: a per-step read waits for the GPU and leaves it idle while Python queues the
# next step. On a CPU there is nothing to overlap and every step is checked before its update.
GPU_SYNC_EVERY = 20


@dataclass
class _PendingStep:
    """An optimizer step whose loss and gradient norm the host has not read yet."""

    step: int
    epoch: int
    batch_index: int
    loss: torch.Tensor  # 0-d, this process's mean over the step's micro-batches
    grad_norm: torch.Tensor  # 0-d, before clipping, the same on every process
    learning_rate: float
    images_seen: int


def _flush(run: TrainingRun, pending: list[_PendingStep], on_step: Callable[..., None] | None) -> None:
    """Read the pending steps' losses and norms (one host synchronisation), stop every process
    on a non-finite value, record them, and report them to `on_step`."""
    if not pending:
        return
    accelerator = run.accelerator
    # (num_processes, steps): every process sees every loss, so all stop together or none does.
    losses = accelerator.gather(torch.stack([p.loss for p in pending]).reshape(1, -1))
    norms = torch.stack([p.grad_norm for p in pending]).float().cpu()
    losses = losses.float().cpu()
    for column, item in enumerate(pending):
        if not torch.isfinite(losses[:, column]).all():
            raise non_finite_error("loss", losses[:, column], item.step, item.epoch, item.batch_index)
        if accelerator.scaler is None and not torch.isfinite(norms[column]):
            raise non_finite_error("the gradient norm", norms[column].reshape(1), item.step, item.epoch, item.batch_index)
    window_rate = run.throughput.read(pending[-1].step, pending[-1].images_seen)
    step_losses = losses.mean(dim=0).tolist()
    for item, loss, norm in zip(pending, step_losses, norms.tolist()):
        run.losses.append(loss)
        run.grad_norms.append(norm)
        if on_step is not None:
            on_step(
                item.step, loss, epoch=item.epoch, learning_rate=item.learning_rate, images_seen=item.images_seen,
                grad_norm=norm, images_per_second=window_rate,
                steps_per_epoch=math.ceil(len(run.batches) / run.training.gradient_accumulation_steps),
            )
    pending.clear()


def train_epoch(run: TrainingRun, epoch: int, on_step: Callable[..., None] | None = None) -> None:
    """One pass over the data (0-based `epoch`), then the epoch's checkpoint."""
    accelerator, training = run.accelerator, run.training
    epoch_started = time.perf_counter()
    run.throughput.resume()
    run.unet.train()
    run.batches.set_epoch(epoch)
    generator = torch.Generator(device=accelerator.device).manual_seed(
        epoch_seed(training.seed, epoch, stream=1 + accelerator.process_index)
    )
    trainable = trainable_parameters(run.optimizer)
    max_norm = math.inf if training.max_grad_norm is None else training.max_grad_norm  # inf: measure only
    sync_every = GPU_SYNC_EVERY if accelerator.device.type == "cuda" else 1
    window_losses: list[torch.Tensor] = []
    pending: list[_PendingStep] = []
    grad_norm = torch.tensor(float("nan"))
    accumulation = training.gradient_accumulation_steps
    num_batches = len(run.batches)
    for batch_index, batch in enumerate(run.batches):
        # The update comes after every `accumulation` micro-batches and after the epoch's last
        # (a shorter window). The batches are no prepared DataLoader, so the loop says which
        # micro-batch ends a window; the others skip the gradient all-reduce (no_sync).
        ends_window = (batch_index + 1) % accumulation == 0 or batch_index == num_batches - 1
        with contextlib.ExitStack() as no_sync:
            if not ends_window:
                no_sync.enter_context(accelerator.no_sync(run.unet))
                no_sync.enter_context(accelerator.no_sync(run.ecm))
                if run.text_encoder is not None:
                    no_sync.enter_context(accelerator.no_sync(run.text_encoder))
            loss = diffusion_training_step(
                accelerator, run.unet, run.adapter, run.ecm, run.noise_scheduler, batch, generator,
                mode=training.conditioning, caption_dropout=training.caption_dropout,
                vector_dropout=training.vector_dropout, time_dropout=training.time_dropout, snr_gamma=training.snr_gamma, text_encoder=run.text_encoder,
                timestep_sampling=training.timestep_sampling,
            )
        if sync_every == 1:
            # Checked before the update: a non-finite loss never reaches the weights.
            process_losses = accelerator.gather(loss.reshape(1))
            if not torch.isfinite(process_losses).all():
                raise non_finite_error("loss", process_losses, run.global_step + 1, epoch, batch_index)
        window_losses.append(loss)
        run.timing["images_seen"] += batch["latent_mean"].shape[0] * accelerator.num_processes
        if not ends_window:
            continue
        # 5. The update. The norm of the summed gradients, the same on every process; clipped to max_norm.
        grad_norm = accelerator.clip_grad_norm_(trainable, max_norm)
        # With fp16 the grad scaler skips steps with overflowing gradients itself.
        if sync_every == 1 and accelerator.scaler is None and not torch.isfinite(grad_norm):
            raise non_finite_error("the gradient norm", grad_norm.reshape(1), run.global_step + 1, epoch, batch_index)
        run.optimizer.step()
        if run.ema is not None:
            run.ema.step(trainable)
        run.lr_scheduler.step()
        run.optimizer.zero_grad()
        run.global_step += 1
        pending.append(_PendingStep(
            run.global_step, epoch, batch_index, torch.stack(window_losses).mean().detach(),
            torch.as_tensor(grad_norm).detach(), run.lr_scheduler.get_last_lr()[0], int(run.timing["images_seen"]),
        ))
        window_losses = []
        if len(pending) >= sync_every:
            _flush(run, pending, on_step)
    # On a GPU a non-finite value may have been used by up to GPU_SYNC_EVERY updates before it
    # was read: it stops the run here, before any checkpoint or adapter is written.
    _flush(run, pending, on_step)
    accelerator.wait_for_everyone()
    run.timing["train_seconds"] += time.perf_counter() - epoch_started
    run.throughput.pause()  # checks and saving are not training; the next epoch resumes the clock
    check_finite_weights(run.adapter, accelerator.unwrap_model(run.ecm), f"in epoch {epoch + 1}")
    if accelerator.is_main_process and run.run_dir is not None:
        checkpoint = save_checkpoint(
            run.run_dir, epoch + 1, run.adapter, accelerator.unwrap_model(run.ecm), run.optimizer,
            run.lr_scheduler, accelerator,
            {"fingerprint": run.fingerprint, "epoch": epoch + 1, "global_step": run.global_step, "losses": run.losses,
             "grad_norms": run.grad_norms, "timing": run.timing},
            training.checkpoints_total_limit, ema_tensors=None if run.ema is None else ema_state_tensors(run.ema),
        )
        run.log(f"epoch {epoch + 1}/{training.epochs}: step {run.global_step}, loss {run.losses[-1]:.5f}, "
                f"gradient norm {run.grad_norms[-1]:.4g} -> {checkpoint}")


def finish_training(run: TrainingRun, adapter_dir: str | Path | None = None) -> TrainingResult:
    """6. Save only the adapter weights (never the frozen UNet), remove the run's checkpoints, sum the run up."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    ecm = accelerator.unwrap_model(run.ecm)
    # The saved adapter holds the weights' moving average when train.ema_decay is set.
    with averaged_weights(run.ema, trainable_parameters(run.optimizer)):
        check_finite_weights(run.adapter, ecm, "by the end of training")
        if adapter_dir is not None and accelerator.is_main_process:
            save_adapter(adapter_dir, run.adapter, ecm)
    if run.run_dir is not None and accelerator.is_main_process:
        # Checkpoints are resume state: a finished run is trained again from scratch, never resumed.
        close_run(run.run_dir)
        run.log(f"run finished; removed its checkpoints {run.run_dir}")
    return TrainingResult(
        losses=run.losses,
        grad_norms=run.grad_norms,
        max_grad_norm=run.training.max_grad_norm,
        steps=run.global_step,
        epochs=run.training.epochs,
        images_seen=int(run.timing["images_seen"]),
        images_per_second=run.timing["images_seen"] / run.timing["train_seconds"],
        steady_images_per_second=run.throughput.steady_images_per_second,
        peak_memory_mb=peak_memory_mb(accelerator.device),
        mixed_precision=str(accelerator.mixed_precision),
        resumed_from_epoch=run.start_epoch,
        num_images=run.num_images,
        num_lora_layers=len(run.adapter.layers),
        trainable_parameters=sum(p.numel() for p in run.adapter.lora_parameters()) + sum(p.numel() for p in ecm.parameters()),
        device=str(accelerator.device),
        extra=run.throughput.warmup(),
    )


def train_ec_lora(
    accelerator: Accelerator,
    unet: nn.Module,
    noise_scheduler,
    cache: LatentCache,
    lora_config: ECLoRAConfig,
    training: TrainingConfig,
    checkpoints_dir: str | Path,
    adapter_dir: str | Path | None = None,
    on_step: Callable[..., None] | None = None,
    log: Callable[[str], None] = print,
    text_encoder: nn.Module | None = None,
) -> TrainingResult:
    """Train EC-LoRA layers + ECM on `unet` (modified in place) from cached latents.

    Resumes from the newest usable checkpoint of this run (same base model, data, configs,
    code) under `checkpoints_dir`. Saves the final adapter to `adapter_dir` when given.
    `on_step(step, loss, *, epoch, learning_rate, images_seen, steps_per_epoch)` is called after
    every optimizer step (progress display and live logging; tests use it to interrupt):
    `epoch` is 0-based, `learning_rate` the LoRA group's as the schedule set it after the step
    (what diffusers' training scripts log), `images_seen` counts every process's images since
    the run started (resumed epochs included). `text_encoder` (the base model's, modified in
    place) is needed when `lora_config.text_encoder_rank` > 0: its LoRA trains with the UNet's.
    """
    run = setup_training(accelerator, unet, noise_scheduler, cache, lora_config, training, log=log,
                         text_encoder=text_encoder)
    resume_training(run, checkpoints_dir)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    for epoch in range(run.start_epoch, training.epochs):
        train_epoch(run, epoch, on_step)
    return finish_training(run, adapter_dir)

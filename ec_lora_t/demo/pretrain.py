"""Pretraining the embedded base model from scratch on the demo world (issue 6).

No machine here can download SD1.5, so the embedded default is a small model of the same
architecture (AutoencoderKL, CLIPTextModel with the real CLIP tokenizer, UNet2DConditionModel,
DDPM scheduler) trained by the project on a general sample of `ec_lora_t.demo.world`: tens of
thousands of captioned renders with every attribute drawn uniformly, no creator, no engagement.

1. Render the general sample at 64 px and resize it to `resolution`, as the pipeline resizes posts.
2. Build the architecture with random, seeded weights (`models.build_tiny_stable_diffusion`).
3. Train the VAE (reconstruction + a small KL term), then set its `scaling_factor` so that
   scaled latents have unit standard deviation, as SD's 0.18215 does.
4. Freeze the VAE, encode the sample once, and train the UNet and the text encoder together on
   the noise-prediction objective, with captions dropped 10% of the time so that
   classifier-free guidance works, min-SNR loss weights and an EMA of the weights.
5. Save the EMA weights in diffusers layout (`StableDiffusionPipeline.save_pretrained`), fp16.

Only the GPU makes this quick (minutes); the tests run it for a few steps on the CPU.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from ec_lora_t.data.images import pixels_to_model_input
from ec_lora_t.demo import world
from ec_lora_t.demo.tiny_model import (
    SHIPPED_CLIP_TOKENIZER,
    build_tiny_stable_diffusion,
)
from ec_lora_t.encoders import encode_images
from ec_lora_t.models import load_components
from ec_lora_t.training.objective import min_snr_weights, noisy_latents
from ec_lora_t.training.precision import autocast

# Share of training captions replaced by the empty prompt: the unconditional branch of
# classifier-free guidance (SD1.5 was trained with 10%).
CAPTION_DROPOUT = 0.1
# The render size of the demo posts (params.yaml demo_data.image_size): the sample is drawn the
# same way and resized to the model's resolution, so the base sees what the pipeline feeds it.
RENDER_SIZE = 64
# Seconds kept back from `time_limit_s` for saving the model after the last step.
_SAVE_MARGIN_S = 10.0


@dataclass
class PretrainSummary:
    """What a pretraining run did: written next to the weights as `pretrain_summary.json`."""

    num_images: int
    resolution: int
    seed: int
    vae_steps: int
    unet_steps: int
    batch_size: int
    vae_scaling_factor: float
    parameters: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)
    losses: dict[str, list[float]] = field(default_factory=dict)
    device: str = "cpu"

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2)


def training_caption(attributes: world.SceneAttributes, rng: np.random.Generator) -> str:
    """A caption of the image as people might write it: full, or leaving some attributes out.

    Half the captions are `attributes.caption()` exactly; the rest say 'person' for the figure,
    'outfit' for the garment, or leave out the colour, accessory, scene or lighting, so the base
    also follows short prompts ('a person in an outfit on a city street'). A season tag in the
    caption stage's form ('(summer)') is appended to half, so the pipeline's full captions are
    familiar; day lighting is sometimes said ('in daylight'), otherwise it is the default.
    """
    person, garment, colour = attributes.person, attributes.garment, f"{attributes.outfit_colour} "
    accessory = world.ACCESSORY_PHRASES[attributes.accessory]
    place = f" {world.SCENE_PHRASES[attributes.scene]}"
    light = world.LIGHTING_PHRASES[attributes.lighting]
    if rng.uniform() < 0.5:
        person = "person" if rng.uniform() < 0.4 else person
        garment = "outfit" if rng.uniform() < 0.3 else garment
        colour = "" if rng.uniform() < 0.15 else colour
        accessory = "" if rng.uniform() < 0.3 else accessory
        place = "" if rng.uniform() < 0.15 else place
        # A caption that names the scene says night or golden hour whenever it is (day goes without
        # saying, as in `SceneAttributes.caption`); only a caption without a scene may leave it out.
        light = "" if not place and rng.uniform() < 0.5 else light
    if attributes.lighting == "day" and rng.uniform() < 0.2:
        light = " in daylight"
    season = f" ({attributes.season})" if rng.uniform() < 0.5 else ""
    article = "an" if colour.startswith("orange") or (not colour and garment == "outfit") else "a"
    return f"a {person} in {article} {colour}{garment}{accessory}{place}{light}{season}"


def _render_chunk(arguments: tuple[int, int, int, int]) -> np.ndarray:
    seed, start, stop, resolution = arguments
    return world.render_general_sample(seed, range(start, stop), size=RENDER_SIZE, out_size=resolution)


def render_pretraining_set(
    num_images: int, resolution: int, seed: int, workers: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """The pretraining set: uint8 pixels (N, R, R, 3) and one caption per image.

    Rendering is spread over `workers` processes (default: all CPU cores); the result does not
    depend on how many there are.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    workers = workers or os.cpu_count() or 1
    chunk = max(1, math.ceil(num_images / (4 * workers)))
    jobs = [(seed, start, min(start + chunk, num_images), resolution) for start in range(0, num_images, chunk)]
    if workers == 1 or len(jobs) == 1:
        pixels = np.concatenate([_render_chunk(job) for job in jobs])
    else:
        # fork is quick and needs no `if __name__ == "__main__"` guard in the caller's script,
        # but a forked child must not inherit an initialised CUDA context: then spawn.
        fork_safe = "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()
        context = multiprocessing.get_context("fork" if fork_safe else "spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            pixels = np.concatenate(list(pool.map(_render_chunk, jobs)))
    captions = [
        training_caption(world.general_sample_item(seed, index)[0], np.random.default_rng([seed, index, 1]))
        for index in range(num_images)
    ]
    return pixels, captions


def _learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_vae(
    vae: torch.nn.Module,
    pixels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    kl_weight: float,
    generator: torch.Generator,
    mixed_precision: str = "auto",
    log: Callable[[str], None] = print,
) -> list[float]:
    """Train the AutoencoderKL in place on uint8 pixels (on the VAE's device); returns logged losses.

    loss = mean squared error of the reconstruction (pixels in [-1, 1])
         + kl_weight * KL(posterior || N(0, 1)) per latent element.
    The KL term is small: it keeps the latents near unit scale and smooth without blurring.
    """
    device = next(vae.parameters()).device
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, learning_rate, warmup_steps=min(100, steps // 10 + 1))
        index = torch.randint(len(pixels), (batch_size,), generator=generator, device=pixels.device)
        batch = pixels_to_model_input(pixels[index].to(device))
        with autocast(device, mixed_precision):
            posterior = vae.encode(batch).latent_dist
            latents = posterior.sample(generator=None)
            reconstruction = vae.decode(latents).sample
        reconstruction_loss = F.mse_loss(reconstruction.float(), batch)
        # KL to N(0, 1) per latent element, in fp32 (the posterior may come out of autocast in bf16).
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = reconstruction_loss + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            losses.append(reconstruction_loss.item())
            log(f"vae step {step + 1}/{steps}: reconstruction mse {losses[-1]:.5f}, kl {kl.item():.3f}")
    vae.eval().requires_grad_(False)
    return losses


class _ExponentialMovingAverage:
    """EMA of parameters (fp32 copies), the weights that are saved: smoother samples after short runs."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        self.parameters = parameters
        self.shadow = [parameter.detach().clone().float() for parameter in parameters]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        # Warm-up of the decay (as diffusers' EMAModel): early averages follow the weights closely.
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [parameter.detach().float() for parameter in self.parameters], 1.0 - decay)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        for parameter, average in zip(self.parameters, self.shadow):
            parameter.copy_(average.to(parameter.dtype))


def _checked_device(device: str, steps: int, vae_steps: int, batch_size: int, mixed_precision: str) -> torch.device:
    """The run's device, once its step counts and precision are known to be usable."""
    if steps < 1 or vae_steps < 1 or batch_size < 1:
        raise ValueError(f"steps, vae_steps and batch_size must be positive, got {steps}, {vae_steps}, {batch_size}")
    if mixed_precision not in ("auto", "no", "bf16"):
        raise ValueError(f"mixed_precision must be auto, no or bf16, got {mixed_precision!r}")
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        # Fixed input shapes: let cuDNN pick the fastest convolution kernels once.
        torch.backends.cudnn.benchmark = True
    return torch_device


def _seeded_base(out_dir: Path, device: torch.device, **architecture):
    """The architecture with seeded random weights, saved and loaded through the one loading path."""
    build_tiny_stable_diffusion(out_dir, **architecture)
    return load_components(out_dir, device=device)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


@dataclass
class _CaptionIds:
    """Each distinct caption tokenised once: `unique_ids` (distinct captions + 1, max length),
    the last row the empty prompt (caption dropout); `caption_index` (images,): each image's row."""

    unique_ids: torch.Tensor
    caption_index: torch.Tensor

    @property
    def empty_ids(self) -> torch.Tensor:
        return self.unique_ids[-1]


def _tokenize_captions(tokenizer, captions: list[str], device: torch.device) -> _CaptionIds:
    unique_captions, caption_index = np.unique(np.array(captions), return_inverse=True)
    unique_ids = tokenizer(list(unique_captions) + [""], padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids.to(device)
    return _CaptionIds(unique_ids, torch.from_numpy(caption_index.reshape(-1)).to(device))


def _scaled_latents(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Encode the sample once with the trained VAE, and set its `scaling_factor` so that scaled
    latents have unit standard deviation: (scaled latent mean, scaled latent std, the factor)."""
    latent_mean, latent_std = encode_images(
        vae, pixels_to_model_input(pixels), batch_size=1024, scaled=False, output_device=pixels.device
    )
    scaling_factor = float(1.0 / latent_mean.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return latent_mean * scaling_factor, latent_std * scaling_factor, scaling_factor


class _StepBudget:
    """Fits the UNet steps into `time_limit_s` (None: no limit), counted from `started`: times
    steps 10-30 (past cuDNN's first-call tuning), then lowers the step count to what is left."""

    def __init__(self, time_limit_s: float | None, started: float, device: torch.device,
                 log: Callable[[str], None]):
        self.time_limit_s, self.started, self.device, self.log = time_limit_s, started, device, log
        self.timed_from: float | None = None

    def steps_after(self, step: int, steps: int) -> int:
        """The step count after `step` steps of `steps` have run."""
        if self.time_limit_s is None or step not in (10, 30):
            return steps
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if step == 10:
            self.timed_from = time.perf_counter()
            return steps
        per_step = (time.perf_counter() - self.timed_from) / 20
        remaining = self.time_limit_s - (time.perf_counter() - self.started) - _SAVE_MARGIN_S
        affordable = max(step, step + int(0.95 * remaining / per_step))
        self.log(f"{per_step * 1000:.1f} ms per unet step; {remaining:.0f} s left of the time limit")
        if affordable < steps:
            self.log(f"time limit {self.time_limit_s:.0f} s: {steps} -> {affordable} unet steps")
            return affordable
        return steps


def _unet_loss(components, latent_mean, latent_std, caption_ids: _CaptionIds, *, batch_size: int,
               min_snr_gamma: float, mixed_precision: str, generator: torch.Generator) -> torch.Tensor:
    """One batch's min-SNR weighted noise-prediction loss, captions dropped to the empty prompt."""
    device = latent_mean.device
    index = torch.randint(len(latent_mean), (batch_size,), generator=generator, device=device)
    noisy = noisy_latents(latent_mean[index], latent_std[index], components.noise_scheduler, generator)
    input_ids = caption_ids.unique_ids[caption_ids.caption_index[index]]
    dropped = torch.rand(batch_size, generator=generator, device=device) < CAPTION_DROPOUT
    input_ids = torch.where(dropped[:, None], caption_ids.empty_ids[None, :], input_ids)
    with autocast(device, mixed_precision):
        encoder_hidden_states = components.text_encoder(input_ids)[0]
        prediction = components.unet(noisy.noisy_latents, noisy.timesteps, encoder_hidden_states).sample
    per_sample = F.mse_loss(prediction.float(), noisy.target, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(components.noise_scheduler, noisy.timesteps, min_snr_gamma)).mean()


def train_unet_and_text_encoder(
    components,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    caption_ids: _CaptionIds,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    ema_decay: float,
    min_snr_gamma: float,
    mixed_precision: str,
    generator: torch.Generator,
    budget: _StepBudget,
    log: Callable[[str], None] = print,
) -> tuple[list[float], int]:
    """Train the UNet and the text encoder together on the scaled latents, then load the EMA of
    their weights; returns (logged losses, steps run: fewer when `budget` cut them)."""
    started = time.perf_counter()
    trainable = [components.unet, components.text_encoder]
    for model in trainable:
        model.train().requires_grad_(True)
    trainable_parameters = [p for model in trainable for p in model.parameters()]
    optimizer = torch.optim.AdamW(trainable_parameters, lr=learning_rate, weight_decay=1e-2)
    ema = _ExponentialMovingAverage(trainable_parameters, ema_decay)
    warmup_steps = min(200, steps // 10 + 1)
    losses: list[float] = []
    step = 0
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, learning_rate, warmup_steps)
        loss = _unet_loss(components, latent_mean, latent_std, caption_ids, batch_size=batch_size,
                          min_snr_gamma=min_snr_gamma, mixed_precision=mixed_precision, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable_parameters, 1.0)
        optimizer.step()
        ema.update(step)
        step += 1
        steps = budget.steps_after(step, steps)
        if step % max(1, steps // 20) == 0 or step == steps:
            losses.append(float(loss.detach()))
            log(f"unet step {step}/{steps}: loss {float(loss.detach()):.4f} ({time.perf_counter() - started:.0f} s)")
    ema.copy_to_parameters()
    return losses, steps


def pretrain_base(
    out_dir: str | Path,
    *,
    # the sample and the run
    steps: int = 3140, batch_size: int = 256, resolution: int = 32, num_images: int = 60000, seed: int = 0,
    device: str = "cuda", mixed_precision: str = "auto", workers: int | None = None,
    time_limit_s: float | None = None,
    # the optimisation
    vae_steps: int = 2000, learning_rate: float = 5e-4, vae_learning_rate: float = 1e-3, vae_kl_weight: float = 1e-4,
    ema_decay: float = 0.999, min_snr_gamma: float = 5.0,
    # the architecture
    unet_block_out_channels: tuple[int, ...] = (64, 128, 128), vae_block_out_channels: tuple[int, ...] = (32, 64),
    text_hidden_size: int = 64, text_layers: int = 2,
    log: Callable[[str], None] = print,
) -> PretrainSummary:
    """Pretrain the base model from scratch on the world's general sample; save it to `out_dir`.

    `out_dir` is replaced by a diffusers folder (fp16 weights, loaded as fp32 unless a dtype is
    asked for) that `load_components` and `StableDiffusionPipeline.from_pretrained` load, plus
    `pretrain_summary.json`. `time_limit_s` (optional) bounds the whole run (`_StepBudget`);
    the summary records the UNet steps actually run (pass them as `steps` to reproduce the run).

    The defaults are the run of the shipped `models/ec-lora-t-base` (6.1 min on one H200; its
    8000 steps were cut to 3140 by a 400 s limit, and the schedule depends only on the final
    count after step 30, so `steps=3140` without a limit repeats it up to GPU nondeterminism).
    """
    out_dir = Path(out_dir)
    torch_device = _checked_device(device, steps, vae_steps, batch_size, mixed_precision)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    # 1. The general sample, rendered before CUDA starts so that worker processes can fork.
    pixels_np, captions = render_pretraining_set(num_images, resolution, seed, workers)
    seconds["render"] = time.perf_counter() - started
    log(f"rendered {num_images} images at {resolution} px in {seconds['render']:.1f} s")

    # 2. Architecture with seeded random weights, built and loaded through the one loading path.
    components = _seeded_base(out_dir, torch_device, seed=seed, resolution=resolution, text_layers=text_layers,
                              unet_block_out_channels=tuple(unet_block_out_channels), text_hidden_size=text_hidden_size,
                              vae_block_out_channels=tuple(vae_block_out_channels))
    parameters = {name: sum(p.numel() for p in getattr(components, name).parameters())
                  for name in ("unet", "vae", "text_encoder")}
    log(f"parameters: {parameters}")
    pixels = torch.from_numpy(pixels_np).to(torch_device)
    caption_ids = _tokenize_captions(components.tokenizer, captions, torch_device)
    log(f"{len(caption_ids.unique_ids) - 1} distinct captions")

    # 3. The VAE, then its scaling factor; the sample encoded once.
    generator = torch.Generator(device=torch_device).manual_seed(seed)
    torch.manual_seed(seed)
    phase = time.perf_counter()
    vae_losses = train_vae(components.vae, pixels, steps=vae_steps, batch_size=batch_size,
                           learning_rate=vae_learning_rate, kl_weight=vae_kl_weight, generator=generator,
                           mixed_precision=mixed_precision, log=log)
    latent_mean, latent_std, scaling_factor = _scaled_latents(components.vae, pixels)
    seconds["vae"] = time.perf_counter() - phase
    log(f"vae trained in {seconds['vae']:.1f} s; scaling factor {scaling_factor:.4f}")

    # 4. UNet and text encoder on the cached latents.
    phase = time.perf_counter()
    unet_losses, steps = train_unet_and_text_encoder(
        components, latent_mean, latent_std, caption_ids, steps=steps, batch_size=batch_size,
        learning_rate=learning_rate, ema_decay=ema_decay, min_snr_gamma=min_snr_gamma,
        mixed_precision=mixed_precision, generator=generator,
        budget=_StepBudget(time_limit_s, started, torch_device, log), log=log,
    )
    seconds["unet"] = time.perf_counter() - phase
    log(f"unet and text encoder trained in {seconds['unet']:.1f} s")

    # 5. Save in diffusers layout, fp16 (loaders cast back to the dtype they are asked for).
    save_base_model(out_dir, components)
    seconds["total"] = time.perf_counter() - started
    summary = PretrainSummary(
        num_images=num_images, resolution=resolution, seed=seed, vae_steps=vae_steps, unet_steps=steps,
        batch_size=batch_size, vae_scaling_factor=scaling_factor, parameters=parameters, seconds=seconds,
        losses={"vae_reconstruction_mse": vae_losses, "unet": unet_losses}, device=_device_name(torch_device),
    )
    (out_dir / "pretrain_summary.json").write_text(summary.to_json())
    return summary


def save_base_model(out_dir: Path, components) -> None:
    """Write the components as a fp16 diffusers folder loadable by `StableDiffusionPipeline`.

    The tokenizer folder is the shipped CLIP tokenizer (vocab.json + merges.txt, as SD1.5 ships
    it), 2 MB smaller than the tokenizer.json that `save_pretrained` writes.
    """
    pipeline = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=components.noise_scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.to(torch.float16)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    pipeline.save_pretrained(out_dir)
    shutil.rmtree(out_dir / "tokenizer")
    shutil.copytree(SHIPPED_CLIP_TOKENIZER, out_dir / "tokenizer")
    # transformers 5 loads a model in the dtype its config names unless told otherwise, and
    # diffusers in fp32: name fp32 so that a plain `StableDiffusionPipeline.from_pretrained(dir)`
    # gets one dtype throughout (the fp16 weights are upcast on loading).
    config_path = out_dir / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    pipeline.to(torch.float32)

"""Generating images with an EC-LoRA-T adapter at chosen engagement-time vectors.

A row is (prompt, vector, seed). Rows are generated together in batches, each with its own
seeded generator for the initial latents and the deterministic DDIM sampler (eta = 0), so
a row's image does not depend on which rows share its batch. Modes:
    ec_lora     the ECM's scales for each row's vector
    plain_lora  the same LoRA with every dynamic scale 1 (the ECM bypassed)
    base        the adapter off (scale 0): the pretrained model
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ec_lora_t.adapter.conditioning import (
    CONSTANT_SCALES,
    MODES,
    ecm_outputs,
    engagement_conditioning,
)
from ec_lora_t.adapter.ecm import ENGAGEMENT_TIME_DIM, check_engagement_time
from ec_lora_t.adapter.model import ECLoRAAdapter, load_adapter
from ec_lora_t.hub import resolve_pretrained
from ec_lora_t.models import diffusers_dtype, quiet_loading

# diffusers' pipeline module imports CLIP's and SigLIP's image processors (for IP-Adapter), and
# transformers says, once each, that it falls back to the PIL processors without torchvision:
# the intended setup (README), so the import runs where quiet_loading drops that notice.
with quiet_loading():
    from diffusers import StableDiffusionPipeline


@dataclass
class ECLoRAPipeline:
    """A diffusers StableDiffusionPipeline whose UNet carries an EC-LoRA adapter (or none)."""

    pipeline: StableDiffusionPipeline
    adapter: ECLoRAAdapter | None = None
    adapter_dir: Path | None = None

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Deterministic samplers: one seed fixes an image. DDIM (eta 0) is the report's; DPM-Solver++
# (2nd order, multistep) reaches the same quality in fewer steps.
SAMPLERS = {"ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}


def load_pipeline(
    pretrained: str,
    adapter_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    sampler: str = "ddim",
) -> ECLoRAPipeline:
    """Load the pretrained pipeline with a deterministic `sampler` (`SAMPLERS`) and, when given,
    inject the saved adapter.

    Defaults: CUDA in fp16 when available, else CPU in fp32. The LoRA matrices and the ECM
    stay fp32 whatever the pipeline's dtype.
    """
    if sampler not in SAMPLERS:  # before loading the model, not after
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    device = torch.device(device) if device is not None else default_device()
    if torch_dtype is None:
        torch_dtype = torch.float16 if device.type == "cuda" else torch.float32
    with quiet_loading():
        pipeline = StableDiffusionPipeline.from_pretrained(
            resolve_pretrained(pretrained, what="pretrained model"), **diffusers_dtype(torch_dtype),
            safety_checker=None, requires_safety_checker=False,
        )
    pipeline.scheduler = SAMPLERS[sampler].from_config(pipeline.scheduler.config)
    adapter = None
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        adapter = load_adapter(adapter_dir, pipeline.unet)
        adapter.ecm.to(device).eval()
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return ECLoRAPipeline(pipeline=pipeline, adapter=adapter, adapter_dir=adapter_dir)


def _engagement_rows(engagement_time: torch.Tensor | Sequence | None, num_rows: int) -> torch.Tensor | None:
    if engagement_time is None:
        return None
    engagement_time = torch.as_tensor(engagement_time, dtype=torch.float32)
    if engagement_time.shape != (num_rows, ENGAGEMENT_TIME_DIM):
        raise ValueError(
            f"engagement_time must have shape ({num_rows}, {ENGAGEMENT_TIME_DIM}) (one vector per prompt), "
            f"got {tuple(engagement_time.shape)}"
        )
    return engagement_time


# The vector of a typical post: what vector guidance and extrapolation push away from.
AVERAGE_POST = (0.5, 0.5)


@dataclass(frozen=True)
class VectorSampling:
    """How strongly the vector steers sampling (mode "ec_lora"); the defaults change nothing.

    vector_guidance w: classifier-free guidance on the vector, as InstructPix2Pix guides its
        second condition. With text guidance g the prediction is
            eps(∅, v) + g (eps(c, v) - eps(∅, v)) + (w - 1) (eps(c, v) - eps(c, null))
        where null is the adapter without a vector (every scale 1, the plain LoRA, which
        `train.vector_dropout` trains as the vector-free model). w = 1 is ordinary guidance
        (two UNet rows per image); w > 1 adds a third row and pushes along what the vector
        changes given the same prompt, so the prompt's own content is not what is amplified.
    guidance_anchor: what "null" is. A vector (e, t): the average post (0.5, 0.5) by default, so
        guidance pushes along what the vector changes away from a typical post, in engagement
        and in time; None: the null vector (every scale 1, no embedding offset), for adapters
        trained with vector dropout.
    vector_scale γ: extrapolate the ECM's outputs away from the average post,
        s' = s(0.5, 0.5) + γ (s(e, t) - s(0.5, 0.5)); γ = 1 is the ECM itself.
    """

    vector_guidance: float = 1.0
    vector_scale: float = 1.0
    guidance_anchor: tuple[float, float] | None = AVERAGE_POST

    def __post_init__(self) -> None:
        for name in ("vector_guidance", "vector_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        anchor = self.guidance_anchor
        if anchor is not None and (len(anchor) != 2 or not all(0.0 <= float(v) <= 1.0 for v in anchor)):
            raise ValueError(f"guidance_anchor must be an (engagement, time) pair in [0, 1] or None, got {anchor!r}")



def _anchor_rows(engagement_time: torch.Tensor, anchor: tuple[float, float]) -> torch.Tensor:
    return torch.tensor([anchor], dtype=engagement_time.dtype, device=engagement_time.device).expand_as(engagement_time)


def vector_outputs(
    ecm, engagement_time: torch.Tensor, vector_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ECM's scales and time-embedding offsets for each vector, extrapolated from the
    average post (0.5, 0.5) by `vector_scale`."""
    scales, offsets = ecm_outputs(ecm, engagement_time)
    if vector_scale == 1.0:
        return scales, offsets
    anchor_scales, anchor_offsets = ecm_outputs(ecm, _anchor_rows(engagement_time, AVERAGE_POST))
    scales = anchor_scales + vector_scale * (scales - anchor_scales)
    if offsets is not None:
        offsets = anchor_offsets + vector_scale * (offsets - anchor_offsets)
    return scales, offsets


def _initial_latents(seeds: Sequence[int], shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    # A CPU generator per row, as diffusers' randn_tensor does for a list of generators: a
    # row's noise depends on its seed alone, the same on every device.
    rows = [torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=dtype)
            for seed in seeds]
    return torch.cat(rows).to(device)


def _sample_batch(
    pipeline: ECLoRAPipeline,
    prompts: list[str],
    vectors: torch.Tensor | None,
    seeds: list[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    mode: str,
    sampling: VectorSampling,
    negative_prompt: str | None,
    height: int,
    width: int,
) -> list[Image.Image]:
    """The denoising loop for one batch; it builds the UNet batch, so it builds the per-row scales."""
    pipe, adapter = pipeline.pipeline, pipeline.adapter
    device, batch = pipeline.device, len(prompts)
    guided = guidance_scale > 1.0
    # 1. Text: the prompts, and the negative (empty) prompt for guidance.
    conditional, unconditional = pipe.encode_prompt(
        prompts, device, 1, guided, negative_prompt=[negative_prompt] * batch if negative_prompt is not None else None
    )
    # 2. Per-row scales (and time-embedding offsets), in the order the UNet batch is built below.
    row_scales: torch.Tensor | float | None = None
    row_offsets: torch.Tensor | None = None
    vector_rows = mode == "ec_lora" and guided and sampling.vector_guidance != 1.0
    if adapter is not None:
        if mode == "ec_lora":
            vectors = vectors.to(device)
            scales, offsets = vector_outputs(adapter.ecm, vectors, sampling.vector_scale)
            copies_with_vector = 2 if guided else 1  # [unconditional, conditional] both get the vector
            scale_groups, offset_groups = [scales] * copies_with_vector, [offsets] * copies_with_vector
            if vector_rows:  # [conditional text, null vector]
                if sampling.guidance_anchor is None:
                    null_scales = torch.ones_like(scales)
                    null_offsets = torch.zeros_like(offsets) if offsets is not None else None
                else:
                    null_scales, null_offsets = ecm_outputs(
                        adapter.ecm, _anchor_rows(vectors, tuple(sampling.guidance_anchor))
                    )
                scale_groups.append(null_scales)
                offset_groups.append(null_offsets)
            row_scales = torch.cat(scale_groups)
            row_offsets = torch.cat(offset_groups) if offsets is not None else None
        else:
            row_scales = CONSTANT_SCALES[mode]
    text = [unconditional, conditional] if guided else [conditional]
    if vector_rows:
        text.append(conditional)
    text_embeddings = torch.cat(text)
    copies = len(text)
    # 3. Initial noise, one seed per row.
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps, device=device)
    latent_shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = _initial_latents(seeds, latent_shape, device, text_embeddings.dtype) * scheduler.init_noise_sigma
    # 4. Denoise (eta 0: DDIM without fresh noise; DPM-Solver++ takes no eta).
    step_options = {"eta": 0.0} if isinstance(scheduler, DDIMScheduler) else {}
    context = engagement_conditioning(adapter, row_scales, row_offsets) if adapter is not None else nullcontext()
    with context:
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * copies), timestep)
            prediction = pipe.unet(model_input, timestep, encoder_hidden_states=text_embeddings, return_dict=False)[0]
            parts = prediction.chunk(copies)
            if guided:
                noise = parts[0] + guidance_scale * (parts[1] - parts[0])
                if vector_rows:
                    noise = noise + (sampling.vector_guidance - 1.0) * (parts[1] - parts[2])
            else:
                noise = parts[0]
            latents = scheduler.step(noise, timestep, latents, **step_options, return_dict=False)[0]
    # 5. Decode.
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True] * batch)


@torch.no_grad()
def generate_images(
    pipeline: ECLoRAPipeline,
    prompts: list[str],
    engagement_time: torch.Tensor | None,
    seeds: list[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    mode: str = "ec_lora",
    batch_size: int = 8,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    sampling: VectorSampling = VectorSampling(),
    on_batch: Callable[[int], None] | None = None,
) -> list[Image.Image]:
    """One image per row (prompts[i], engagement_time[i], seeds[i]), in row order.

    `engagement_time` (N, 2) is required in mode "ec_lora" and ignored otherwise. Rows are
    generated `batch_size` at a time; the result does not depend on `batch_size`. DDIM with
    eta = 0: the image is a function of the row alone. `on_batch(n)` is called after each
    batch with its number of images (a progress bar's `update`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    num_rows = len(prompts)
    if len(seeds) != num_rows:
        raise ValueError(f"got {num_rows} prompts but {len(seeds)} seeds; give one seed per row")
    vectors = _engagement_rows(engagement_time, num_rows)
    if mode != "base" and pipeline.adapter is None:
        raise ValueError(f"mode {mode!r} needs an adapter: load_pipeline(..., adapter_dir=...)")
    if mode == "ec_lora" and vectors is None:
        raise ValueError("mode 'ec_lora' needs engagement_time, one (normalized_engagement, normalized_time) per row")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    unet_config = pipeline.pipeline.unet.config
    default_size = unet_config.sample_size * pipeline.pipeline.vae_scale_factor
    images: list[Image.Image] = []
    for start in range(0, num_rows, batch_size):
        rows = slice(start, start + batch_size)
        images += _sample_batch(
            pipeline, list(prompts[rows]), vectors[rows] if vectors is not None else None, list(seeds[rows]),
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, mode=mode, sampling=sampling,
            negative_prompt=negative_prompt, height=height or default_size, width=width or default_size,
        )
        if on_batch is not None:
            on_batch(len(prompts[rows]))
    return images


def save_png(image: Image.Image, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Save a PNG with each metadata item as a text chunk (non-strings as JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value))
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_png_metadata(path: str | Path) -> dict[str, str]:
    """The PNG's text chunks (as written by `save_png`)."""
    with Image.open(path) as image:
        return dict(image.text)


def generate(
    pretrained: str,
    adapter_dir: str | Path | None,
    prompts: Sequence[str],
    vectors: Sequence[tuple[float, float]],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    mode: str = "ec_lora",
    batch_size: int = 8,
    device: str | None = None,
    sampling: VectorSampling = VectorSampling(),
    sampler: str = "ddim",
    vector_metadata: Sequence[dict[str, Any]] | None = None,
) -> list[Path]:
    """The `ec-lora-t generate` core: every prompt x vector x seed, in one batched run, to PNGs.

    Files are `<row>_e<engagement>_t<time>_seed<seed>.png` in `out_dir`, with the vector,
    prompt, seed, mode and sampler settings in the PNG text chunks, plus `vector_metadata[i]`
    (one dict per vector, e.g. the raw likes and date it came from) in those of vector i.
    Vectors must lie in [0, 1] and the step count be at least 1: checked before any model loads.
    """
    if not prompts or not seeds:
        raise ValueError("give at least one prompt and one seed")
    if mode == "ec_lora" and not vectors:
        raise ValueError("give at least one engagement-time vector")
    if mode == "ec_lora":
        vectors = check_engagement_time(vectors)
    if vector_metadata is not None and len(vector_metadata) != len(vectors):
        raise ValueError(f"got {len(vector_metadata)} vector_metadata entries for {len(vectors)} vectors")
    if int(num_inference_steps) < 1:
        raise ValueError(f"the number of sampling steps must be at least 1, got {num_inference_steps}")
    if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
    # Without the ECM (plain_lora, base) the vector does nothing: one row per prompt and seed.
    vector_rows = [tuple(v) for v in vectors] if mode == "ec_lora" else [(float("nan"), float("nan"))]
    rows = list(itertools.product(prompts, vector_rows, seeds))
    row_vector_index = [index for _, index, _ in itertools.product(prompts, range(len(vector_rows)), seeds)]
    pipeline = load_pipeline(pretrained, adapter_dir, device=device, sampler=sampler)
    engagement_time = torch.tensor([vector for _, vector, _ in rows], dtype=torch.float32)
    images = generate_images(
        pipeline,
        [prompt for prompt, _, _ in rows],
        engagement_time if mode == "ec_lora" else None,
        [seed for _, _, seed in rows],
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        mode=mode,
        batch_size=batch_size,
        sampling=sampling,
    )
    out_dir = Path(out_dir)
    paths = []
    for index, ((prompt, (engagement, time), seed), image) in enumerate(zip(rows, images)):
        metadata = {
            "prompt": prompt,
            "seed": seed,
            "mode": mode,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "vector_guidance": sampling.vector_guidance,
            "vector_scale": sampling.vector_scale,
            "sampler": sampler,
            "pretrained": str(pretrained),
            "adapter": str(adapter_dir) if adapter_dir is not None else "",
        }
        if mode == "ec_lora":
            metadata |= {"normalized_engagement": engagement, "normalized_time": time,
                         "engagement_time": [engagement, time]}
            if vector_metadata is not None:
                metadata |= vector_metadata[row_vector_index[index]]
            name = f"{index:03d}_e{engagement:.3f}_t{time:.3f}_seed{seed}.png"
        else:
            name = f"{index:03d}_{mode}_seed{seed}.png"
        paths.append(save_png(image, out_dir / name, metadata))
    return paths

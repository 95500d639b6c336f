"""Generating images with an EC-LoRA-T adapter at chosen engagement-time vectors: the tool's
use of `ec_lora_t.pipeline.ECLoRAStableDiffusionPipeline` (which owns the denoising loop).

A row is (prompt, vector, seed). Rows are generated together in batches, each with its own
seeded CPU generator for the initial latents and a deterministic sampler (DDIM with eta = 0,
or DPM-Solver++), so a row's image does not depend on which rows share its batch. Modes:
    ec_lora     the ECM's scales for each row's vector
    plain_lora  the same LoRA with every dynamic scale 1 (the ECM bypassed)
    base        the adapter off (scale 0): the pretrained model
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ec_lora_t.adapter.conditioning import AVERAGE_POST, MODES
from ec_lora_t.adapter.ecm import ENGAGEMENT_TIME_DIM, check_engagement_time
from ec_lora_t.hub import resolve_pretrained
from ec_lora_t.models import diffusers_dtype, quiet_loading
from ec_lora_t.pipeline import (
    ECLoRAStableDiffusionPipeline,
    check_anchor,
    check_interval,
    check_sampling_strength,
    check_time_guidance,
)

# The pipeline with the adapter loaded (or none): what `load_pipeline` returns.
ECLoRAPipeline = ECLoRAStableDiffusionPipeline


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Deterministic samplers: one seed fixes an image. DDIM (eta 0) is the report's; DPM-Solver++
# (2nd order, multistep) reaches the same quality in fewer steps.
SAMPLERS = {"ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}

# The sampling precision (`evaluate.precision`); auto: `default_sampling_dtype`.
PRECISIONS = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_sampling_dtype(device: torch.device) -> torch.dtype:
    """fp32 on the CPU; on CUDA bf16 where the GPU has it, else fp16. bf16 keeps fp32's range:
    the embedded demo model sampled in fp16 draws other images than in fp32 (its base model's
    prompt adherence 0.075 against 0.20; an adapter's ground-truth Spearman +0.06), while bf16
    matches fp32 to the metrics' last digit (docs/research.md, round 9)."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_pipeline(
    pretrained: str,
    adapter_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    sampler: str = "ddim",
) -> ECLoRAStableDiffusionPipeline:
    """Load the pretrained pipeline with a deterministic `sampler` (`SAMPLERS`) and, when given,
    the saved adapter (`load_ec_lora`).

    Defaults: CUDA when available, else the CPU; the dtype `default_sampling_dtype`. The LoRA
    matrices and the ECM stay fp32 whatever the pipeline's dtype.
    """
    if sampler not in SAMPLERS:  # before loading the model, not after
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    device = torch.device(device) if device is not None else default_device()
    if torch_dtype is None:
        torch_dtype = default_sampling_dtype(device)
    with quiet_loading():
        pipeline = ECLoRAStableDiffusionPipeline.from_pretrained(
            resolve_pretrained(pretrained, what="pretrained model"), **diffusers_dtype(torch_dtype),
            safety_checker=None, requires_safety_checker=False,
        )
    pipeline.scheduler = SAMPLERS[sampler].from_config(pipeline.scheduler.config)
    pipeline.to(device)
    if adapter_dir is not None:
        pipeline.load_ec_lora(adapter_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


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


@dataclass(frozen=True)
class VectorSampling:
    """How strongly the vector steers sampling (mode "ec_lora"); the defaults change nothing.

    vector_guidance w: classifier-free guidance on the vector, as InstructPix2Pix guides its
        second condition. With text guidance g the prediction is
            eps(∅, v) + g (eps(c, v) - eps(∅, v)) + (w - 1) (eps(c, v) - eps(c, a))
        where a is `guidance_anchor`. w = 1 is ordinary guidance (two UNet rows per image);
        w != 1 adds a third row and pushes along what the vector changes given the same prompt,
        so the prompt's own content is not what is amplified. Without text guidance (g <= 1)
        it is the same formula at g = 1, on two rows: eps(c, a) + w (eps(c, v) - eps(c, a)).
    guidance_anchor a: a vector (e, t): the average post (0.5, 0.5) by default, so guidance
        pushes along what the vector changes away from a typical post, in engagement and in
        time; None: the null vector (every scale 1, no embedding offset, the plain LoRA that
        `train.vector_dropout` trains as the vector-free model).
    vector_scale γ: extrapolate the ECM's outputs away from the same anchor,
        s' = s(a) + γ (s(e, t) - s(a)) (anchor None: from the null vector, s' = 1 + γ (s - 1));
        γ = 1 is the ECM itself.
    guidance_interval (start, end): vector guidance acts over this fraction of the denoising
        steps only (0: the first, noisiest step; (0, 1): all); elsewhere w = 1 on two rows.
    time_guidance w_t: None, w guides the whole vector; else w guides engagement and w_t time,
        ... + (w - 1) (eps(c, v_e) - eps(c, a)) + (w_t - 1) (eps(c, v) - eps(c, v_e)) with
        v_e = (e, a's time); a fourth row only for vectors away from a in both (`ec_lora_t.pipeline`).
    """

    vector_guidance: float = 1.0
    vector_scale: float = 1.0
    guidance_anchor: tuple[float, float] | None = AVERAGE_POST
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    time_guidance: float | None = None

    def __post_init__(self) -> None:
        check_sampling_strength("vector_guidance", self.vector_guidance)
        check_time_guidance(self.time_guidance, self.guidance_anchor, "time_guidance")
        check_sampling_strength("vector_scale", self.vector_scale)
        check_anchor(self.guidance_anchor)
        check_interval(self.guidance_interval)


@torch.no_grad()
def generate_images(
    pipeline: ECLoRAStableDiffusionPipeline,
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
    generated `batch_size` at a time, each from a CPU generator seeded with its seed; the
    result does not depend on `batch_size`. `on_batch(n)` is called after each batch with its
    number of images (a progress bar's `update`).
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
    images: list[Image.Image] = []
    for start in range(0, num_rows, batch_size):
        rows = slice(start, start + batch_size)
        batch_prompts = list(prompts[rows])
        batch_vectors = vectors[rows].tolist() if vectors is not None and mode == "ec_lora" else None
        images += pipeline(
            batch_prompts,
            engagement=[vector[0] for vector in batch_vectors] if batch_vectors else None,
            time=[vector[1] for vector in batch_vectors] if batch_vectors else None,
            height=height, width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            vector_guidance_scale=sampling.vector_guidance, vector_guidance_interval=sampling.guidance_interval,
            time_guidance_scale=sampling.time_guidance,
            vector_scale=sampling.vector_scale,
            guidance_anchor=sampling.guidance_anchor, mode=mode,
            negative_prompt=[negative_prompt] * len(batch_prompts) if negative_prompt is not None else None,
            generator=[torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds[rows]],
        ).images
        if on_batch is not None:
            on_batch(len(batch_prompts))
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
            "time_guidance": sampling.time_guidance,
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

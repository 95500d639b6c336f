"""`ECLoRAStableDiffusionPipeline`: Stable Diffusion steered by an engagement-time vector.

A `StableDiffusionPipeline` subclass, as diffusers' `StableDiffusionInstructPix2PixPipeline` is
for its second condition: `check_inputs`, `encode_prompt`, `prepare_latents`, the scheduler,
callbacks and `output_type` are diffusers' own; `__call__` owns only what is new, the UNet
batch's rows (`ec_lora_t.adapter.conditioning.unet_rows`, the layout training uses too) and
how their predictions combine:

    pipe = ECLoRAStableDiffusionPipeline.from_pretrained("models/ec-lora-t-base")
    pipe.load_ec_lora("data/train/adapter")
    image = pipe("(democreator style) (summer)", engagement=0.9, time=0.5,
                 vector_guidance_scale=4.0, generator=torch.Generator().manual_seed(42)).images[0]

With text guidance g (`guidance_scale` > 1) and vector guidance w the prediction is

    eps(∅, v) + g (eps(c, v) - eps(∅, v)) + (w - 1) (eps(c, v) - eps(c, a))

over the rows [negative prompt + vector, prompt + vector, prompt + anchor] (the anchor row only
when w != 1). Without text guidance (g <= 1: diffusers then runs the prompt alone, i.e. g = 1)
the same formula at g = 1 needs two rows, [prompt + vector, prompt + anchor]:

    eps(c, a) + w (eps(c, v) - eps(c, a))

A time guidance of its own, w_t (`time_guidance_scale`; None: w), splits the vector's term at
v_e = (e, the anchor's time), as InstructPix2Pix splits its image and text terms:

    ... + (w - 1) (eps(c, v_e) - eps(c, a)) + (w_t - 1) (eps(c, v) - eps(c, v_e))

w guides engagement and w_t time. A fourth row, [prompt + v_e], is run only where both terms are
non-zero: a call whose vectors all sit at the anchor's time (the engagement sweep) is the
three-row formula at w, one whose vectors all sit at the anchor's engagement (the time sweep)
the same at w_t.

The anchor a is the average post (0.5, 0.5) by default, or None: the null vector (every scale
1, the plain LoRA that `train.vector_dropout` trains). `vector_guidance_interval` (start, end)
limits vector guidance to that fraction of the denoising steps (0: the first, noisiest step):
outside it the anchor rows are not run and the prediction is diffusers' own guidance, at the
cost of two rows instead of three (guidance in a limited interval, Kynkäänniemi et al. 2024).
A static LoRA exported at v (`ec-lora-t export`) reproduces w = 1 only: vector guidance is a
difference of two model calls at sampling time, which no fixed weight update can carry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ec_lora_t.adapter.conditioning import (
    AVERAGE_POST,
    MODES,
    UNetRows,
    engagement_conditioning,
    fold_scales,
    unet_rows,
)
from ec_lora_t.adapter.model import ECLoRAAdapter, load_adapter, load_text_encoder_lora
from ec_lora_t.models import quiet_loading

# diffusers' pipeline module imports CLIP's and SigLIP's image processors (for IP-Adapter), and
# transformers says, once each, that it falls back to the PIL processors without torchvision:
# the intended setup (README), so the import runs where quiet_loading drops that notice.
with quiet_loading():
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps


def check_sampling_strength(name: str, value: float) -> float:
    """`vector_guidance_scale` and `vector_scale` are finite numbers >= 0 (one line otherwise)."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_anchor(anchor: Sequence[float] | None) -> tuple[float, float] | None:
    if anchor is None:
        return None
    if len(anchor) != 2 or not all(0.0 <= float(v) <= 1.0 for v in anchor):
        raise ValueError(f"guidance_anchor must be an (engagement, time) pair in [0, 1] or None, got {anchor!r}")
    return (float(anchor[0]), float(anchor[1]))


def check_time_guidance(value: float | None, anchor: Sequence[float] | None,
                        name: str = "time_guidance_scale") -> float | None:
    """A time guidance scale (None: none) is a finite number >= 0 and needs an (e, t) anchor to
    split the vector's term at."""
    if value is None:
        return None
    value = check_sampling_strength(name, value)
    if anchor is None:
        raise ValueError(f"{name} needs an (engagement, time) guidance_anchor, not None (the null vector)")
    return value


def check_interval(interval: Sequence[float]) -> tuple[float, float]:
    """`vector_guidance_interval`: a (start, end) pair with 0 <= start < end <= 1."""
    if len(interval) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval) \
            or not 0.0 <= interval[0] < interval[1] <= 1.0:
        raise ValueError(f"vector_guidance_interval must be (start, end) with 0 <= start < end <= 1, got {interval!r}")
    return (float(interval[0]), float(interval[1]))


def _per_prompt(name: str, value: float | Sequence[float], batch_size: int) -> list[float]:
    values = [value] * batch_size if isinstance(value, (int, float)) else list(value)
    if len(values) != batch_size:
        raise ValueError(f"{name}: got {len(values)} values for {batch_size} prompts; give one, or one per prompt")
    return [float(v) for v in values]


def vector_guidance_for(mode: str, vector_guidance_scale: float) -> float:
    """The vector guidance a call in `mode` runs. Only mode "ec_lora" has the anchor rows; the
    baselines (the evaluate stage passes its scale to every mode) keep diffusers' text guidance.
    Left as asked, their [∅ + v, c + v] groups would be read as [c + v, c + a] by
    `guided_prediction` and guided away from the prompt."""
    vector_guidance_scale = check_sampling_strength("vector_guidance_scale", vector_guidance_scale)
    return vector_guidance_scale if mode == "ec_lora" else 1.0


def split_guidance(
    vectors: torch.Tensor | None, anchor: tuple[float, float] | None, vector_guidance_scale: float,
    time_guidance_scale: float | None,
) -> tuple[float, float | None]:
    """(w, w_t) for one call's (rows, 2) vectors: w_t None where one scale serves every row, so
    that no fourth row is run (module docstring). Only an (e, t) anchor can split."""
    if time_guidance_scale is None or vectors is None:
        return vector_guidance_scale, None
    time_guidance_scale = check_time_guidance(time_guidance_scale, anchor)
    if time_guidance_scale == vector_guidance_scale or bool((vectors[:, 1] == anchor[1]).all()):
        return vector_guidance_scale, None  # no time term: engagement's scale alone
    if bool((vectors[:, 0] == anchor[0]).all()):
        return time_guidance_scale, None  # no engagement term: time's scale alone
    return vector_guidance_scale, time_guidance_scale


def guided_prediction(
    prediction: torch.Tensor, groups: int, anchor_groups: int, guidance_scale: float, vector_guidance_scale: float,
    time_guidance_scale: float | None = None,
) -> torch.Tensor:
    """Combine the UNet's prediction over the `unet_rows` groups, of which the last
    `anchor_groups` are vector guidance's (module docstring's formulas)."""
    parts = prediction.chunk(groups)
    text_groups = groups - anchor_groups
    if text_groups == 1 and anchor_groups == 1:  # [c + v, c + a]: the formula at g = 1
        return parts[1] + vector_guidance_scale * (parts[0] - parts[1])
    conditional = parts[text_groups - 1]
    noise = parts[0] + guidance_scale * (parts[1] - parts[0]) if text_groups == 2 else parts[0]
    if anchor_groups == 0:
        return noise
    if anchor_groups == 1:
        return noise + (vector_guidance_scale - 1.0) * (conditional - parts[-1])
    anchor, engagement_only = parts[text_groups:]
    return (noise + (vector_guidance_scale - 1.0) * (engagement_only - anchor)
            + (time_guidance_scale - 1.0) * (conditional - engagement_only))


class ECLoRAStableDiffusionPipeline(StableDiffusionPipeline):
    """Stable Diffusion with an EC-LoRA-T adapter: `pipe(prompt, engagement=..., time=...)`.

    Modes: "ec_lora" (the ECM's scales for each prompt's vector), "plain_lora" (every dynamic
    scale 1, the ECM bypassed), "base" (the adapter off: the pretrained model).
    """

    ec_lora: ECLoRAAdapter | None = None
    ec_lora_dir: Path | None = None
    # Fold each run of rows' scales into the layers' weights once per call when the UNet batch
    # has at most this many runs of rows that share a vector (`fold_scales`; 0: never). A batch
    # at one vector has one run with text guidance and two with vector guidance (the anchor's).
    max_folded_runs: int = 4

    @property
    def adapter(self) -> ECLoRAAdapter | None:
        return self.ec_lora

    def load_ec_lora(self, adapter_dir: str | Path) -> ECLoRAAdapter:
        """Inject the adapter saved in `adapter_dir` into this pipeline's UNet (once), and its
        text-encoder LoRA, when it has one, into the text encoder; the ECM stays fp32."""
        if self.ec_lora is not None:
            raise RuntimeError(f"an EC-LoRA adapter is already loaded (from {self.ec_lora_dir})")
        adapter_dir, device, text_device = Path(adapter_dir), self.unet.device, self.text_encoder.device
        adapter = load_adapter(adapter_dir, self.unet)
        adapter.text_encoder_lora = load_text_encoder_lora(adapter_dir, adapter.config, self.text_encoder)
        # The new LoRA matrices (fp32 whatever the pipeline's dtype) and the ECM go to their model's device.
        self.unet.to(device)
        self.text_encoder.to(text_device)
        adapter.ecm.to(device).eval()
        self.ec_lora, self.ec_lora_dir = adapter, adapter_dir
        return adapter

    def _vectors(self, mode, engagement, time, batch_size: int, num_images_per_prompt: int, device):
        """(rows, 2) vectors in the pipeline's row order p0, p0, p1, p1 (`num_images_per_prompt` = 2)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "base" and self.ec_lora is None:
            raise ValueError(f"mode {mode!r} needs an adapter: call load_ec_lora(adapter_dir) first")
        if mode != "ec_lora":
            return None
        if engagement is None or time is None:
            raise ValueError("mode 'ec_lora' needs both engagement and time (normalised, in [0, 1])")
        vectors = torch.tensor(
            list(zip(_per_prompt("engagement", engagement, batch_size), _per_prompt("time", time, batch_size))),
            dtype=torch.float32,
        )
        if not torch.isfinite(vectors).all():
            raise ValueError(f"engagement and time must be finite, got {vectors.tolist()}")
        self.ec_lora.ecm.to(device)  # the ECM is not a pipeline component: `pipe.to()` does not move it
        return vectors.repeat_interleave(num_images_per_prompt, dim=0).to(device)

    def _folded(self, rows: UNetRows):
        return fold_scales(self.ec_lora, rows.scales, self.max_folded_runs) if self.ec_lora is not None else None

    def _conditioning(self, rows: UNetRows, folded=None):
        return (engagement_conditioning(self.ec_lora, rows.scales, rows.offsets, folded)
                if self.ec_lora is not None else nullcontext())

    def _denoise(self, latents, rows, timesteps, guidance, extra_step_kwargs, callback_on_step_end,
                 callback_on_step_end_tensor_inputs, negative_prompt_embeds, vector_guidance_interval=(0.0, 1.0)):
        """The denoising loop over `unet_rows`' groups, combined by `guided_prediction` with
        `guidance` (w, w_t); outside `vector_guidance_interval` without the anchor groups (vector
        guidance off)."""
        self._num_timesteps = len(timesteps)
        start, end = vector_guidance_interval
        # The rows of the steps outside the interval: only when there are such steps and anchor groups.
        unguided = rows.without_anchor_groups() if rows.anchor_groups and (start > 0.0 or end < 1.0) else rows
        # The scales are the same at every step: fold them into the weights once per call.
        folded = self._folded(rows)
        unguided_folded = folded if unguided is rows else self._folded(unguided)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                step_rows, step_guidance, step_folded = rows, guidance, folded
                if not start <= i / len(timesteps) < end:
                    step_rows, step_guidance, step_folded = unguided, (1.0, None), unguided_folded
                model_input = self.scheduler.scale_model_input(torch.cat([latents] * step_rows.groups), t)
                with self._conditioning(step_rows, step_folded):
                    prediction = self.unet(model_input, t, encoder_hidden_states=step_rows.text_embeddings,
                                           return_dict=False)[0]
                noise_pred = guided_prediction(prediction, step_rows.groups, step_rows.anchor_groups,
                                               self.guidance_scale, *step_guidance)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    # diffusers' tensor inputs; only the latents are read back (the rows are not changed by callbacks)
                    step_tensors = {"latents": latents, "prompt_embeds": rows.text_embeddings,
                                    "negative_prompt_embeds": negative_prompt_embeds}
                    callback_kwargs = {name: step_tensors[name] for name in callback_on_step_end_tensor_inputs}
                    latents = callback_on_step_end(self, i, t, callback_kwargs).pop("latents", latents)
                progress_bar.update()
        return latents

    def _decode(self, latents, output_type, generator, device, dtype):
        """diffusers' last steps: the VAE, its safety checker (when loaded), `output_type`."""
        if output_type == "latent":
            return latents, None
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        image, has_nsfw_concept = self.run_safety_checker(image, device, dtype)
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not n for n in has_nsfw_concept]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize), \
            has_nsfw_concept

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        engagement: float | Sequence[float] | None = None,
        time: float | Sequence[float] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        vector_guidance_scale: float = 1.0,
        vector_guidance_interval: Sequence[float] = (0.0, 1.0),
        time_guidance_scale: float | None = None,
        vector_scale: float = 1.0,
        guidance_anchor: Sequence[float] | None = AVERAGE_POST,
        mode: str = "ec_lora",
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ):
        """Generate; `engagement` and `time` are one value, or one per prompt (normalised, in [0, 1]).

        `vector_guidance_scale` w (>= 0; 1: none; over `vector_guidance_interval` of the steps),
        `time_guidance_scale` w_t (>= 0; None: w; time's own scale, module docstring) and
        `vector_scale` γ (>= 0; 1: the ECM itself, else s' = s(a) + γ (s(v) - s(a)) from the anchor
        a) act in mode "ec_lora" only. Returns a `StableDiffusionPipelineOutput` (or a tuple).
        """
        # 1. Check inputs (diffusers' checks, then ours) and default the size to the UNet's.
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        vector_scale, vector_guidance_interval, guidance_anchor = (check_sampling_strength(
            "vector_scale", vector_scale), check_interval(vector_guidance_interval), check_anchor(guidance_anchor))
        self._guidance_scale, self._guidance_rescale, self._clip_skip = guidance_scale, 0.0, None
        self._cross_attention_kwargs, self._interrupt = None, False
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device
        vectors = self._vectors(mode, engagement, time, batch_size, num_images_per_prompt, device)
        guidance = split_guidance(vectors, guidance_anchor, vector_guidance_for(mode, vector_guidance_scale),
                                  time_guidance_scale)

        # 2. Encode the prompts (mode "base": without the text encoder's LoRA); lay out the UNet rows.
        text_lora = self.ec_lora.text_encoder_lora if self.ec_lora is not None else None
        with text_lora.disabled() if mode == "base" and text_lora is not None else nullcontext():
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            )
        rows = unet_rows(
            self.ec_lora.ecm if self.ec_lora is not None else None, mode, prompt_embeds, vectors,
            negative_prompt_embeds=negative_prompt_embeds if self.do_classifier_free_guidance else None,
            anchor_row=guidance[0] != 1.0, engagement_anchor_row=guidance[1] is not None,
            guidance_anchor=guidance_anchor, vector_scale=vector_scale,
        )

        # 3. Timesteps and initial latents (a list of CPU generators: each row's noise from its own seed).
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device)
        latents = self.prepare_latents(batch_size * num_images_per_prompt, self.unet.config.in_channels, height,
                                       width, prompt_embeds.dtype, device, generator, latents)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 4. Denoise, with every row's adapter scales set for each step's UNet call.
        latents = self._denoise(latents, rows, timesteps, guidance, extra_step_kwargs, callback_on_step_end,
                                callback_on_step_end_tensor_inputs, negative_prompt_embeds, vector_guidance_interval)

        # 5. Decode (no safety checker in this tool's pipelines; diffusers' runs when one is loaded).
        image, has_nsfw_concept = self._decode(latents, output_type, generator, device, prompt_embeds.dtype)
        self.maybe_free_model_hooks()
        if not return_dict:
            return image, has_nsfw_concept
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)

"""ECLoRAStableDiffusionPipeline on the tiny model: the old sampler's images, the guidance formula
checked against separate UNet calls, diffusers' options, and the documented five-line example."""

from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ec_lora_t.adapter.conditioning import CONSTANT_SCALES, ecm_outputs, engagement_conditioning
from ec_lora_t.generation import VectorSampling, generate_images
from ec_lora_t.pipeline import ECLoRAStableDiffusionPipeline

PROMPTS = ["a person in a red coat (winter)", "a city street at night (summer)"]
VECTORS = torch.tensor([[0.9, 0.1], [0.1, 0.8]])
SEEDS = [3, 11]
STEPS = 3


@pytest.fixture
def pipe(ec_pipeline):
    return ec_pipeline


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


# --- A frozen copy of the sampler before the pipeline (generation.py `_sample_batch`, main at
#     1ea9fb9), kept to show that the pipeline draws the same images from the same seeds.


def _frozen_sample_batch(pipe, adapter, prompts, vectors, seeds, *, num_inference_steps, guidance_scale, mode,
                         vector_guidance=1.0, vector_scale=1.0, guidance_anchor=(0.5, 0.5)):
    device, batch = pipe.unet.device, len(prompts)
    guided = guidance_scale > 1.0
    conditional, unconditional = pipe.encode_prompt(prompts, device, 1, guided, negative_prompt=None)
    row_scales, row_offsets = None, None
    vector_rows = mode == "ec_lora" and guided and vector_guidance != 1.0
    if mode == "ec_lora":
        scales, offsets = ecm_outputs(adapter.ecm, vectors)
        if vector_scale != 1.0:
            mid_scales, _ = ecm_outputs(adapter.ecm, torch.tensor([[0.5, 0.5]]).expand_as(vectors))
            scales = mid_scales + vector_scale * (scales - mid_scales)
        groups = [scales] * (2 if guided else 1)
        if vector_rows:
            groups.append(torch.ones_like(scales) if guidance_anchor is None
                          else ecm_outputs(adapter.ecm, torch.tensor([guidance_anchor]).expand_as(vectors))[0])
        row_scales = torch.cat(groups)
    else:
        row_scales = CONSTANT_SCALES[mode]
    text = [unconditional, conditional] if guided else [conditional]
    if vector_rows:
        text.append(conditional)
    text_embeddings, copies = torch.cat(text), len(text)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps, device=device)
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    latents = torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(seed)))
                         for seed in seeds]) * scheduler.init_noise_sigma
    context = engagement_conditioning(adapter, row_scales, row_offsets) if adapter is not None else nullcontext()
    with context, torch.no_grad():
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * copies), timestep)
            parts = pipe.unet(model_input, timestep, encoder_hidden_states=text_embeddings, return_dict=False)[0]
            parts = parts.chunk(copies)
            if guided:
                noise = parts[0] + guidance_scale * (parts[1] - parts[0])
                if vector_rows:
                    noise = noise + (vector_guidance - 1.0) * (parts[1] - parts[2])
            else:
                noise = parts[0]
            latents = scheduler.step(noise, timestep, latents, eta=0.0, return_dict=False)[0]
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True] * batch)


@pytest.mark.parametrize(
    ("mode", "guidance_scale", "sampling"),
    [
        ("ec_lora", 5.0, {}),
        ("ec_lora", 5.0, {"vector_guidance": 3.0, "vector_scale": 2.0}),
        ("ec_lora", 5.0, {"vector_guidance": 3.0, "guidance_anchor": None}),
        ("ec_lora", 1.0, {}),
        ("plain_lora", 5.0, {}),
        ("base", 5.0, {}),
        # Vector guidance acts in mode ec_lora only: the baselines keep diffusers' text guidance
        # whatever scale is asked (the evaluate stage passes its vector_guidance to every mode).
        ("plain_lora", 5.0, {"vector_guidance": 4.0}),
        ("base", 5.0, {"vector_guidance": 4.0, "guidance_interval": (0.0, 0.5)}),
    ],
)
def test_the_pipeline_draws_the_old_samplers_images_from_the_same_seeds(pipe, mode, guidance_scale, sampling,
                                                                       monkeypatch):
    vectors = VECTORS if mode == "ec_lora" else None
    # The old sampler had no guidance interval: it guided on the vector over every step.
    frozen_sampling = {key: value for key, value in sampling.items() if key != "guidance_interval"}
    old = pixels(_frozen_sample_batch(pipe, pipe.adapter, PROMPTS, VECTORS, SEEDS, num_inference_steps=STEPS,
                                      guidance_scale=guidance_scale, mode=mode, **frozen_sampling))

    def new(max_folded_runs):
        monkeypatch.setattr(pipe, "max_folded_runs", max_folded_runs)
        return pixels(generate_images(pipe, PROMPTS, vectors, SEEDS, num_inference_steps=STEPS,
                                      guidance_scale=guidance_scale, mode=mode, sampling=VectorSampling(**sampling)))

    # The per-row low-rank path is the old sampler's arithmetic, bit for bit; the scales folded
    # into the weights (W + s B A, summed in another order) only round differently: a level or
    # few of 255, where guidance and extrapolation amplify the difference of two rows (the exact
    # arithmetic is checked in float64 in tests/test_lora.py).
    assert np.array_equal(new(0), old)
    differences = np.abs(new(8) - old)
    assert differences.max() <= 3 and differences.mean() < 0.5


def test_folded_sampling_runs_the_folded_weights_and_matches_the_low_rank_path(pipe, monkeypatch):
    seen = []
    hook = pipe.adapter.layers[0].register_forward_pre_hook(
        lambda layer, args: seen.append(type(layer.dynamic_scale).__name__))
    try:
        def latents(max_folded_runs, **kwargs):
            monkeypatch.setattr(pipe, "max_folded_runs", max_folded_runs)
            seen.clear()
            out = pipe(PROMPTS, engagement=[0.9, 0.9], time=[0.1, 0.1], num_inference_steps=2, guidance_scale=5.0,
                       generator=[torch.Generator().manual_seed(seed) for seed in SEEDS], output_type="latent",
                       **kwargs).images
            return out, set(seen)

        # one vector for both prompts: one run with text guidance, two with the anchor's rows
        for kwargs in ({}, {"vector_guidance_scale": 3.0}, {"vector_guidance_scale": 3.0,
                                                            "vector_guidance_interval": (0.0, 0.5)}):
            low_rank, kinds = latents(0, **kwargs)
            assert kinds == {"Tensor"}
            folded, kinds = latents(2, **kwargs)
            assert kinds == {"FoldedWeights"}
            torch.testing.assert_close(folded, low_rank, atol=2e-4, rtol=1e-4)
        # more runs than allowed: the low-rank path
        _, kinds = latents(1, vector_guidance_scale=3.0)
        assert kinds == {"Tensor"}
    finally:
        hook.remove()


# --- The guided step against separate UNet calls combined by hand.


def _one_step_by_hand(pipe, vector, anchor, guidance_scale, vector_guidance, seed, sign=1.0, time_guidance=None):
    """One DDIM step from the seed's noise, each term its own UNet call with its own scales;
    `time_guidance`: the vector's term split at (e, the anchor's t), each part its own scale."""
    ecm, adapter = pipe.adapter.ecm, pipe.adapter
    conditional, unconditional = pipe.encode_prompt(PROMPTS[:1], "cpu", 1, True)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(1)
    (t,) = scheduler.timesteps
    shape = (1, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def eps(text, engagement_time):
        with engagement_conditioning(adapter, *ecm_outputs(ecm, torch.tensor([engagement_time]))), torch.no_grad():
            return pipe.unet(latents, t, encoder_hidden_states=text, return_dict=False)[0]

    conditional_vector, anchor_vector = eps(conditional, vector), eps(conditional, anchor)
    if guidance_scale > 1.0:
        unconditional_vector = eps(unconditional, vector)
        noise = unconditional_vector + guidance_scale * (conditional_vector - unconditional_vector)
        if time_guidance is None:
            noise = noise + sign * (vector_guidance - 1.0) * (conditional_vector - anchor_vector)
        else:
            engagement_only = eps(conditional, (vector[0], anchor[1]))
            noise = (noise + (vector_guidance - 1.0) * (engagement_only - anchor_vector)
                     + (time_guidance - 1.0) * (conditional_vector - engagement_only))
    else:  # two rows: the formula at g = 1
        noise = anchor_vector + vector_guidance * (conditional_vector - anchor_vector)
    return scheduler.step(noise, t, latents, eta=0.0, return_dict=False)[0]


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_a_guided_step_equals_separate_unet_calls_combined_by_hand(pipe, guidance_scale):
    vector, anchor, vector_guidance, seed = (0.9, 0.2), (0.3, 0.6), 4.0, 7
    stepped = pipe(PROMPTS[0], engagement=vector[0], time=vector[1], num_inference_steps=1,
                   guidance_scale=guidance_scale, vector_guidance_scale=vector_guidance, guidance_anchor=anchor,
                   generator=[torch.Generator().manual_seed(seed)], output_type="latent").images
    by_hand = _one_step_by_hand(pipe, vector, anchor, guidance_scale, vector_guidance, seed)
    torch.testing.assert_close(stepped, by_hand, atol=1e-4, rtol=1e-4)
    if guidance_scale > 1.0:  # the vector term is large enough that a flipped sign is far outside that tolerance
        flipped = _one_step_by_hand(pipe, vector, anchor, guidance_scale, vector_guidance, seed, sign=-1.0)
        assert (flipped - by_hand).abs().max() > 100 * 1e-4
    # Vector guidance w acts without text guidance too (not silently dropped): w = 1 differs.
    plain = pipe(PROMPTS[0], engagement=vector[0], time=vector[1], num_inference_steps=1,
                 guidance_scale=guidance_scale, guidance_anchor=anchor,
                 generator=[torch.Generator().manual_seed(seed)], output_type="latent").images
    assert (plain - stepped).abs().max() > 1e-2


def test_time_guidance_splits_the_vector_term_with_a_fourth_row_only_where_needed(pipe):
    """w guides engagement, w_t time; a vector at the anchor's time (the engagement sweep) or at
    its engagement (the time sweep) is the three-row formula at w or at w_t, bit for bit."""
    anchor, seed = (0.3, 0.6), 7
    rows_per_call = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: rows_per_call.append(args[0].shape[0]))

    def one_step(engagement, time, prompts=PROMPTS[0], seeds=(seed,), **guidance):
        rows_per_call.clear()
        out = pipe(prompts, engagement=engagement, time=time, num_inference_steps=1, guidance_scale=5.0,
                   guidance_anchor=anchor, generator=[torch.Generator().manual_seed(s) for s in seeds],
                   output_type="latent", **guidance).images
        return out, rows_per_call[0]

    try:
        stepped, rows = one_step(0.9, 0.2, vector_guidance_scale=4.0, time_guidance_scale=8.0)
        assert rows == 4
        by_hand = _one_step_by_hand(pipe, (0.9, 0.2), anchor, 5.0, 4.0, seed, time_guidance=8.0)
        torch.testing.assert_close(stepped, by_hand, atol=1e-4, rtol=1e-4)
        one_scale = _one_step_by_hand(pipe, (0.9, 0.2), anchor, 5.0, 4.0, seed)
        assert (one_scale - by_hand).abs().max() > 100 * 1e-4  # the split changes the step
        for engagement, time, same_as in [(0.9, 0.6, {"vector_guidance_scale": 4.0}),
                                          (0.3, 0.2, {"vector_guidance_scale": 8.0})]:
            split, rows = one_step(engagement, time, vector_guidance_scale=4.0, time_guidance_scale=8.0)
            assert rows == 3
            assert torch.equal(split, one_step(engagement, time, **same_as)[0])
        equal_scales, rows = one_step(0.9, 0.2, vector_guidance_scale=4.0, time_guidance_scale=4.0)
        assert rows == 3 and torch.equal(equal_scales, one_step(0.9, 0.2, vector_guidance_scale=4.0)[0])
        # One call mixing both kinds runs the fourth row; each image is still its own call's.
        mixed, rows = one_step([0.9, 0.3], [0.6, 0.2], prompts=PROMPTS, seeds=SEEDS,
                               vector_guidance_scale=4.0, time_guidance_scale=8.0)
        assert rows == 8
        for index, (engagement, time) in enumerate([(0.9, 0.6), (0.3, 0.2)]):
            alone, _ = one_step(engagement, time, prompts=PROMPTS[index], seeds=SEEDS[index:index + 1],
                                vector_guidance_scale=4.0, time_guidance_scale=8.0)
            torch.testing.assert_close(mixed[index:index + 1], alone, atol=1e-4, rtol=1e-4)
        # Outside the guidance interval both anchor groups are left out.
        rows_per_call.clear()
        pipe(PROMPTS, engagement=[0.9, 0.3], time=[0.6, 0.2], num_inference_steps=4, guidance_scale=5.0,
             guidance_anchor=anchor, vector_guidance_scale=4.0, time_guidance_scale=8.0,
             vector_guidance_interval=(0.5, 1.0), output_type="latent")
        assert rows_per_call == [4, 4, 8, 8]
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="time_guidance_scale needs an"):
        pipe(PROMPTS[0], engagement=0.9, time=0.2, vector_guidance_scale=4.0, time_guidance_scale=8.0,
             guidance_anchor=None, num_inference_steps=1)
    with pytest.raises(ValueError, match="time_guidance_scale must be a finite number >= 0"):
        pipe(PROMPTS[0], engagement=0.9, time=0.2, time_guidance_scale=float("nan"), num_inference_steps=1)
    with pytest.raises(ValueError, match="time_guidance needs an"):
        VectorSampling(vector_guidance=4.0, time_guidance=8.0, guidance_anchor=None)


def test_diffusers_options_callbacks_output_types_and_checks(pipe):
    seen = []

    def on_step_end(pipeline, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape)))
        return {"latents": tensors["latents"]}

    output = pipe(PROMPTS, engagement=[0.9, 0.1], time=0.5, num_inference_steps=2, guidance_scale=5.0,
                  vector_guidance_scale=2.0, num_images_per_prompt=2, output_type="np",
                  generator=[torch.Generator().manual_seed(s) for s in range(4)], callback_on_step_end=on_step_end)
    assert output.images.shape == (4, 32, 32, 3) and output.images.dtype == np.float32
    assert seen == [(0, (4, 4, 8, 8)), (1, (4, 4, 8, 8))]
    with pytest.raises(ValueError, match="divisible by 8"):  # diffusers' own check_inputs
        pipe(PROMPTS[0], engagement=0.5, time=0.5, height=30)
    with pytest.raises(ValueError, match="vector_guidance_scale must be a finite number >= 0"):
        pipe(PROMPTS[0], engagement=0.5, time=0.5, vector_guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="needs both engagement and time"):
        pipe(PROMPTS[0], engagement=0.5)
    with pytest.raises(ValueError, match="engagement: got 3 values for 2 prompts"):
        pipe(PROMPTS, engagement=[0.1, 0.2, 0.3], time=0.5)


def test_vector_guidance_interval_runs_the_anchor_rows_only_inside_it(pipe):
    """(0.5, 1): the first half of the steps run two rows per image (diffusers' guidance, w = 1),
    the second half three; a step outside the interval is exactly the unguided step."""
    rows_per_call = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: rows_per_call.append(args[0].shape[0]))
    call = dict(engagement=[0.9, 0.1], time=0.5, guidance_scale=5.0, output_type="latent")
    try:
        pipe(PROMPTS, num_inference_steps=4, vector_guidance_scale=3.0, vector_guidance_interval=(0.5, 1.0),
             generator=[torch.Generator().manual_seed(s) for s in SEEDS], **call)
    finally:
        hook.remove()
    assert rows_per_call == [4, 4, 6, 6]

    def one_step(**sampling):
        return pipe(PROMPTS, num_inference_steps=1, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                    **call, **sampling).images

    unguided, guided = one_step(vector_guidance_scale=1.0), one_step(vector_guidance_scale=3.0)
    assert torch.equal(one_step(vector_guidance_scale=3.0, vector_guidance_interval=(0.5, 1.0)), unguided)
    assert torch.equal(one_step(vector_guidance_scale=3.0, vector_guidance_interval=(0.0, 0.5)), guided)
    assert (guided - unguided).abs().max() > 1e-2
    for interval in [(0.6, 0.4), (0.0, 1.5), (0.5,)]:
        with pytest.raises(ValueError, match="vector_guidance_interval"):
            VectorSampling(vector_guidance=3.0, guidance_interval=interval)


def test_several_images_per_prompt_get_each_prompts_vector(pipe):
    """diffusers lays the UNet batch out as p0, p0, p1, p1: each of those rows must get its own
    prompt's vector (a layout per vector, v0, v1, v0, v1, would swap rows 1 and 2)."""
    seeds = [3, 4, 5, 6]
    call = dict(num_inference_steps=STEPS, guidance_scale=5.0, vector_guidance_scale=2.0)
    together = pixels(pipe(PROMPTS, engagement=[0.95, 0.05], time=[0.1, 0.9], num_images_per_prompt=2,
                           generator=[torch.Generator().manual_seed(s) for s in seeds], **call).images)
    for image, (prompt_index, seed) in enumerate(zip([0, 0, 1, 1], seeds)):
        alone = pixels(pipe(PROMPTS[prompt_index], engagement=[0.95, 0.05][prompt_index],
                            time=[0.1, 0.9][prompt_index], generator=[torch.Generator().manual_seed(seed)],
                            **call).images)
        assert np.abs(together[image] - alone[0]).mean() <= 1.0, image
    swapped = pixels(pipe(PROMPTS[0], engagement=0.05, time=0.9, generator=[torch.Generator().manual_seed(3)],
                          **call).images)
    assert np.abs(together[0] - swapped[0]).mean() > 10.0


API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_the_documented_five_line_example_runs(tiny_sd_dir, adapter_dir, tmp_path, monkeypatch):
    """docs/api.md's Python example, run as written with the tiny model and adapter in place of
    the default paths."""
    (example,) = re.findall(r"```python\n(.*?)```", API_DOC.read_text(), flags=re.DOTALL)
    assert len(example.strip().splitlines()) <= 6  # the import lines plus five
    monkeypatch.chdir(tmp_path)
    example = example.replace('"models/ec-lora-t-base"', repr(str(tiny_sd_dir)))
    example = example.replace('"data/train/adapter"', repr(str(adapter_dir)))
    namespace: dict = {}
    exec(compile(example, str(API_DOC), "exec"), namespace)
    assert isinstance(namespace["pipe"], ECLoRAStableDiffusionPipeline)
    assert (tmp_path / "post.png").is_file()

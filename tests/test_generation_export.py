"""Generation with the tiny pipeline, PNG metadata, and export to plain LoRA files."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from ec_lora_toys import (
    WIDTH,
    conditioned,
    make_toy,
    randomize_adapter,
    toy_with_adapter,
)
from safetensors.torch import load_file

from ec_lora_t.adapter import load_adapter_weights
from ec_lora_t.adapter.export import baked_lora_state_dict, export_lora
from ec_lora_t.generation import (
    generate,
    generate_images,
    load_pipeline,
    read_png_metadata,
    save_png,
)

PROMPTS = ["a person in a red coat (winter)", "a city street at night (summer)", "a bowl of fruit (spring)"]
VECTORS = torch.tensor([[0.9, 0.1], [0.1, 0.8], [0.5, 0.5]])
SEEDS = [3, 11, 42]
SAMPLING = dict(num_inference_steps=3, guidance_scale=5.0)


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """One thread: on the shared 2-core machine, two threads per tiny op were far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_rows_do_not_depend_on_their_batch_mates(ec_pipeline):
    batched = pixels(generate_images(ec_pipeline, PROMPTS, VECTORS, SEEDS, **SAMPLING, batch_size=3))
    for row in range(3):
        rows = slice(row, row + 1)
        alone = pixels(generate_images(ec_pipeline, PROMPTS[rows], VECTORS[rows], SEEDS[rows], **SAMPLING))
        assert np.abs(batched[row] - alone[0]).max() <= 1, row
    # The vector changes the image: same prompt and seed, two vectors.
    pair = pixels(generate_images(ec_pipeline, PROMPTS[:1] * 2, VECTORS[:2], SEEDS[:1] * 2, **SAMPLING))
    assert np.abs(pair[0] - pair[1]).mean() > 1.0


def test_the_sampling_precision_is_the_pipelines_dtype_and_the_adapter_stays_fp32(tiny_sd_dir, adapter_dir):
    from ec_lora_t.generation import PRECISIONS

    pipeline = load_pipeline(str(tiny_sd_dir), adapter_dir, device="cpu", torch_dtype=PRECISIONS["bf16"])
    assert pipeline.unet.dtype == pipeline.vae.dtype == torch.bfloat16
    assert pipeline.ec_lora.layers[0].lora_A.weight.dtype == torch.float32
    assert next(pipeline.ec_lora.ecm.parameters()).dtype == torch.float32
    assert load_pipeline(str(tiny_sd_dir), None, device="cpu", torch_dtype=PRECISIONS["auto"]).unet.dtype == torch.float32


def test_auto_precision_is_fp32_on_the_cpu_and_bf16_on_a_gpu_that_has_it(monkeypatch):
    from ec_lora_t.generation import default_sampling_dtype

    assert default_sampling_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert default_sampling_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert default_sampling_dtype(torch.device("cuda")) == torch.float16  # e.g. a T4: no bf16


def test_modes_base_and_plain_lora(tiny_sd_dir, ec_pipeline):
    base_pipeline = load_pipeline(str(tiny_sd_dir), None, device="cpu")
    plain_model = pixels(generate_images(base_pipeline, PROMPTS[:2], None, SEEDS[:2], **SAMPLING, mode="base"))
    adapter_off = pixels(generate_images(ec_pipeline, PROMPTS[:2], None, SEEDS[:2], **SAMPLING, mode="base"))
    assert np.array_equal(plain_model, adapter_off)
    plain_lora = pixels(generate_images(ec_pipeline, PROMPTS[:2], None, SEEDS[:2], **SAMPLING, mode="plain_lora"))
    assert np.abs(plain_lora - adapter_off).mean() > 1.0
    with pytest.raises(ValueError, match="needs an adapter"):
        generate_images(base_pipeline, PROMPTS[:1], VECTORS[:1], SEEDS[:1], **SAMPLING)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        generate_images(ec_pipeline, PROMPTS[:2], VECTORS, SEEDS[:2], **SAMPLING)


def test_png_metadata_round_trip(tmp_path):
    from PIL import Image

    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "sub" / "x.png",
                    {"prompt": "a coat", "seed": 42, "engagement_time": [0.8, 0.5]})
    assert read_png_metadata(path) == {"prompt": "a coat", "seed": "42", "engagement_time": "[0.8, 0.5]"}


def test_generate_writes_one_png_per_prompt_vector_seed(tiny_sd_dir, adapter_dir, tmp_path):
    paths = generate(str(tiny_sd_dir), adapter_dir, PROMPTS[:1], [(0.8, 0.5), (0.2, 0.5)], [42], tmp_path,
                     **SAMPLING, device="cpu")
    assert [p.name for p in paths] == ["000_e0.800_t0.500_seed42.png", "001_e0.200_t0.500_seed42.png"]
    metadata = read_png_metadata(paths[1])
    assert metadata["prompt"] == PROMPTS[0] and metadata["seed"] == "42"
    assert metadata["engagement_time"] == "[0.2, 0.5]" and metadata["normalized_engagement"] == "0.2"


@pytest.mark.parametrize("ecm_granularity", ["layer", "rank"])
def test_baked_lora_equals_the_conditioned_one_on_a_toy(ecm_granularity):
    model, adapter = toy_with_adapter(ecm_granularity=ecm_granularity)
    randomize_adapter(adapter)
    config = adapter.config
    lora_state = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}
    vector = (0.7, 0.3)
    baked = baked_lora_state_dict(config, lora_state, adapter.ecm, vector, prefix="toy")
    reference = make_toy()  # the same base weights
    for name in config.layer_names:  # merge W' = W + B' A into the plain model
        base = reference.get_submodule(name)
        with torch.no_grad():
            base.weight += baked[f"toy.{name}.lora_B.weight"] @ baked[f"toy.{name}.lora_A.weight"]
    sample = torch.randn(2, 5, WIDTH)
    with conditioned(adapter, torch.tensor([vector, vector])):
        conditioned_output = model(sample)
    assert torch.allclose(reference(sample), conditioned_output, atol=1e-5)


def loaded_lora_keys(unet) -> set[str]:
    from peft.utils import get_peft_model_state_dict

    return set(get_peft_model_state_dict(unet, adapter_name="default_0"))


@pytest.mark.parametrize("export_format", ["diffusers", "kohya"])
def test_exported_file_loads_without_missing_keys_and_matches(
    tiny_sd_dir, adapter_dir, ec_pipeline, tmp_path, export_format, caplog
):
    vector = (0.8, 0.5)
    path = export_lora(adapter_dir, vector, tmp_path / f"lora-{export_format}.safetensors", format=export_format)
    exported = load_file(path)
    if export_format == "kohya":
        assert all(k.startswith("lora_unet_") for k in exported)
        assert {k.rsplit(".", 1)[-1] for k in exported} == {"alpha"} | {"weight"}
    else:
        assert all(k.startswith("unet.") and ".lora_" in k for k in exported)

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING):
        pipeline.load_lora_weights(str(path.parent), weight_name=path.name)
    # diffusers warns "... led to unexpected keys ..." / "... led to missing keys ..." on a mismatch.
    assert not [r for r in caplog.records if "unexpected keys" in r.getMessage() or "missing keys" in r.getMessage()]
    config, _, _ = load_adapter_weights(adapter_dir)
    expected = {f"{name}.lora_{m}.weight" for name in config.layer_names for m in "AB"}
    assert loaded_lora_keys(pipeline.unet) == expected  # every layer loaded, nothing extra

    generators = [torch.Generator("cpu").manual_seed(seed) for seed in SEEDS[:2]]
    plain_file = pixels(pipeline(prompt=PROMPTS[:2], generator=generators, **SAMPLING).images)

    def ec_lora(vector_guidance_scale, engagement_time=vector):
        return pixels(ec_pipeline(PROMPTS[:2], engagement=engagement_time[0], time=engagement_time[1],
                                  vector_guidance_scale=vector_guidance_scale,
                                  generator=[torch.Generator("cpu").manual_seed(seed) for seed in SEEDS[:2]],
                                  **SAMPLING).images)

    # The static file reproduces the pipeline at (e, t) with vector guidance 1...
    assert np.abs(plain_file - ec_lora(1.0)).max() <= 1
    # ...and only that: vector guidance is a difference of model calls that no weight update holds.
    assert np.abs(plain_file - ec_lora(4.0)).mean() > 1.0
    other_vector = ec_lora(1.0, (0.1, 0.9))
    assert np.abs(plain_file - other_vector).mean() > 1.0  # the match is specific to the vector


def test_vector_guidance_pushes_along_the_vector_only(tiny_sd_dir, adapter_dir):
    from ec_lora_t.generation import VectorSampling

    pipeline = load_pipeline(str(tiny_sd_dir), adapter_dir, device="cpu")
    vectors, seeds = VECTORS[:2], SEEDS[:2]

    def run(**sampling):
        return pixels(generate_images(pipeline, PROMPTS[:2], vectors, seeds, **SAMPLING,
                                      sampling=VectorSampling(**sampling)))

    plain = run()
    assert np.array_equal(run(vector_guidance=1.0, vector_scale=1.0), plain)  # the defaults change nothing
    assert np.abs(run(vector_guidance=3.0) - plain).mean() > 1.0
    assert np.abs(run(vector_scale=2.0) - plain).mean() > 1.0
    # An ECM that gives every vector the null scales (1): nothing to guide along, nothing to extrapolate.
    with torch.no_grad():
        pipeline.adapter.ecm.mlp[-1].weight.zero_()
        pipeline.adapter.ecm.mlp[-1].bias.fill_(1.0)
    unit = run()
    assert np.abs(run(vector_guidance=3.0, vector_scale=2.0) - unit).max() <= 1
    with pytest.raises(ValueError, match="vector_guidance"):
        VectorSampling(vector_guidance=float("nan"))


def test_an_adapter_with_non_finite_weights_is_refused_by_name(adapter_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    broken = tmp_path / "adapter"
    shutil.copytree(adapter_dir, broken)
    weights = load_file(broken / "ecm.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = float("inf")
    save_file(weights, broken / "ecm.safetensors")
    with pytest.raises(ValueError, match=rf"{broken / 'ecm.safetensors'}: non-finite weights in \['{name}'\]"):
        export_lora(broken, (0.5, 0.5), tmp_path / "lora.safetensors")
    assert not (tmp_path / "lora.safetensors").exists()

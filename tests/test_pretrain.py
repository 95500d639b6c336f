import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import load_file

from ec_lora_t.demo import attribute_check, world
from ec_lora_t.demo.pretrain import (
    pretrain_base,
    render_pretraining_set,
    train_vae,
    training_caption,
)
from ec_lora_t.models import load_components

TINY = dict(unet_block_out_channels=(8, 16), vae_block_out_channels=(8, 16), text_hidden_size=8, text_layers=1)


def test_training_captions_name_only_true_attributes():
    rng = np.random.default_rng(0)
    for index in range(200):
        attributes = world.general_sample_item(1, index)[0]
        caption = training_caption(attributes, rng)
        named = attribute_check.attributes_named_in(caption)
        assert all(named[name] == getattr(attributes, name) for name in named), (caption, attributes)
        assert caption.startswith("a ") and "  " not in caption


def test_training_captions_vary_around_the_full_caption():
    rng = np.random.default_rng(0)
    attributes = world.general_sample_item(1, 0)[0]
    captions = {training_caption(attributes, rng) for _ in range(300)}
    assert attributes.caption() in captions
    assert any("person" in caption for caption in captions)
    assert any(f"({attributes.season})" in caption for caption in captions)
    assert len(captions) > 10


def test_pretraining_set_is_the_same_with_worker_processes():
    alone, captions = render_pretraining_set(6, resolution=16, seed=2, workers=1)
    pooled, pooled_captions = render_pretraining_set(6, resolution=16, seed=2, workers=2)
    assert alone.shape == (6, 16, 16, 3)
    assert np.array_equal(alone, pooled) and captions == pooled_captions
    with pytest.raises(ValueError, match="num_images must be positive"):
        render_pretraining_set(0, resolution=16, seed=2)


def test_train_vae_lowers_the_reconstruction_error():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                        norm_num_groups=8, sample_size=16)
    pixels, _ = render_pretraining_set(32, resolution=16, seed=0, workers=1)
    losses = train_vae(vae, torch.from_numpy(pixels), steps=40, batch_size=16, learning_rate=2e-3, kl_weight=1e-4,
                       generator=torch.Generator().manual_seed(0), log=lambda message: None)
    assert losses[-1] < 0.6 * losses[0]
    assert not any(p.requires_grad for p in vae.parameters())


def test_pretrain_base_smoke_saves_a_loadable_fp16_model(tmp_path):
    out_dir = tmp_path / "base"
    messages = []
    summary = pretrain_base(out_dir, steps=3, vae_steps=2, batch_size=4, resolution=16, num_images=12, seed=0,
                            device="cpu", workers=1, mixed_precision="bf16", log=messages.append, **TINY)
    assert summary.unet_steps == 3 and summary.num_images == 12
    assert any(message.startswith("unet step 3/3") for message in messages)
    saved = json.loads((out_dir / "pretrain_summary.json").read_text())
    assert saved["vae_scaling_factor"] == pytest.approx(summary.vae_scaling_factor)
    assert set(saved["seconds"]) >= {"render", "vae", "unet", "total"}

    unet_weights = load_file(out_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(tensor.dtype == torch.float16 for tensor in unet_weights.values())
    assert (out_dir / "tokenizer" / "vocab.json").exists() and (out_dir / "tokenizer" / "LICENSE").exists()

    components = load_components(out_dir)
    assert components.vae.config.scaling_factor == pytest.approx(summary.vae_scaling_factor, rel=1e-6)
    assert components.unet.dtype == torch.float32
    # A plain load (no dtype asked for) gets one dtype throughout, as SD1.5's fp32 files do.
    pipeline = StableDiffusionPipeline.from_pretrained(out_dir)
    assert pipeline.text_encoder.dtype == pipeline.unet.dtype == torch.float32
    image = pipeline("a man in a red jacket on a beach", num_inference_steps=2, height=16, width=16,
                     output_type="np").images[0]
    assert image.shape == (16, 16, 3) and np.isfinite(image).all()


def test_pretrain_base_time_limit_shortens_the_unet_phase(tmp_path):
    messages = []
    summary = pretrain_base(tmp_path / "base", steps=10_000, vae_steps=1, batch_size=2, resolution=16, num_images=4,
                            device="cpu", workers=1, time_limit_s=1e-3, log=messages.append, **TINY)
    assert summary.unet_steps == 30
    assert any("time limit" in message for message in messages)


def test_pretrain_base_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="must be positive"):
        pretrain_base(tmp_path / "base", steps=0, device="cpu")
    with pytest.raises(ValueError, match="mixed_precision"):
        pretrain_base(tmp_path / "base", steps=1, vae_steps=1, batch_size=2, resolution=16, num_images=2,
                      device="cpu", workers=1, mixed_precision="fp8", **TINY)


SHIPPED_BASE = Path(__file__).resolve().parent.parent / "models" / "ec-lora-t-base"


@pytest.mark.skipif(not (SHIPPED_BASE / "model_index.json").exists(), reason="shipped base model not present")
def test_shipped_base_model_draws_what_the_prompt_names():
    pipeline = StableDiffusionPipeline.from_pretrained(SHIPPED_BASE)
    pipeline.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    prompted = [world.sample_attributes(rng) for _ in range(6)]
    images = pipeline([item.caption() for item in prompted], num_inference_steps=20, guidance_scale=5.0, height=32,
                      width=32, generator=[torch.Generator().manual_seed(index) for index in range(6)]).images
    expected = [{name: getattr(item, name) for name in attribute_check.CHECKED_ATTRIBUTES} for item in prompted]
    assert attribute_check.score_images(images, expected)["mean"] >= 0.8

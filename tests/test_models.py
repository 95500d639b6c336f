import pytest
import torch
from diffusers import StableDiffusionPipeline

from ec_lora_t.encoders import encode_prompts, vae_scale_factor
from ec_lora_t.models import load_components


def test_tokenizer_matches_stable_diffusion_ids(tiny_sd_dir):
    components = load_components(tiny_sd_dir)
    # Reference ids of SD's CLIPTokenizer for this prompt (ENV-NOTES / CLIP vocabulary).
    assert components.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert components.tokenizer.model_max_length == 77


def test_components_load_frozen_and_encode(tiny_sd_dir):
    components = load_components(tiny_sd_dir)
    assert not any(p.requires_grad for p in components.unet.parameters())
    embeddings = encode_prompts(components.tokenizer, components.text_encoder, ["a cat", "a dog"])
    assert embeddings.shape == (2, 77, components.text_encoder.config.hidden_size)
    assert not torch.allclose(embeddings[0], embeddings[1])
    assert vae_scale_factor(components.vae) == 4


def test_same_folder_loads_as_pipeline(tiny_sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    image = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_generic_caption_keeps_style_tag_and_season():
    from ec_lora_t.data.latents import generic_caption

    full = "(democreator style) a man in a red jacket on a beach (summer)"
    assert generic_caption(full, "a man in a red jacket on a beach", "summer") == "(democreator style) (summer)"
    # a description that also occurs inside the style tag is cut where it stands
    assert generic_caption("(democreator style) style (winter)", "style ", "winter") == "(democreator style) (winter)"
    with pytest.raises(ValueError, match="does not end with"):
        generic_caption(full, "a woman", "summer")

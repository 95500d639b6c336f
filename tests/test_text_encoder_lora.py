"""The text encoder's static LoRA (`train.text_encoder_lora_rank`): off by default, trained from
cached token ids, saved, resumed, loaded by the pipeline and exported for diffusers and kohya."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file
from test_params import check, params_with
from test_training import LORA, MICRO_TEXT_WIDTH, TRAINING, crash_at, fresh_accelerator, micro_unet, write_cache
from transformers import CLIPTextConfig, CLIPTextModel

from ec_lora_t.adapter import ECLoRAConfig
from ec_lora_t.adapter.config import TEXT_ENCODER_WEIGHTS_NAME
from ec_lora_t.adapter.text_encoder import TEXT_ENCODER_TARGET_MODULES
from ec_lora_t.training.cache import load_latent_cache
from ec_lora_t.training.config import TrainingConfig
from ec_lora_t.training.loop import train_ec_lora
from ec_lora_t.training.objective import caption_embeddings

VOCABULARY = 64


def micro_text_encoder() -> CLIPTextModel:
    """A seeded 2-layer CLIP text model as wide as the micro UNet's cross-attention."""
    torch.manual_seed(1)
    return CLIPTextModel(CLIPTextConfig(
        hidden_size=MICRO_TEXT_WIDTH, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=VOCABULARY, max_position_embeddings=77,
        bos_token_id=VOCABULARY - 2, eos_token_id=VOCABULARY - 1, pad_token_id=VOCABULARY - 1,
    )).eval()


def write_cache_with_ids(path, num_images=5):
    """The training tests' cache plus generic embeddings and both captions' token ids."""
    write_cache(path, num_images=num_images)
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(3)
    tensors["generic_text_embeddings"] = torch.randn(tensors["text_embeddings"].shape, generator=generator)
    tensors["input_ids"] = torch.randint(0, VOCABULARY, (num_images, 77), generator=generator)
    tensors["generic_input_ids"] = torch.randint(0, VOCABULARY, (num_images, 77), generator=generator)
    save_file(tensors, path)
    return path


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    return write_cache_with_ids(tmp_path_factory.mktemp("cache") / "latents.safetensors")


def run(cache_path, checkpoints, adapter_dir=None, text_encoder=None, on_step=None, lora=None, **overrides):
    training = TrainingConfig(**{**TRAINING, **overrides})
    return train_ec_lora(
        fresh_accelerator(training), micro_unet(),
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        load_latent_cache(cache_path), ECLoRAConfig(**(lora or LORA)), training, checkpoints,
        adapter_dir=adapter_dir, on_step=on_step, log=lambda message: None, text_encoder=text_encoder,
    )


def encoded(text_encoder, ids):
    with torch.no_grad():
        return text_encoder(ids, return_dict=False)[0]


def test_rank_zero_is_the_run_without_the_key(cache_path, tmp_path):
    """The default trains exactly as before: same losses whether the key is absent or 0, and a
    text encoder handed in is neither adapted nor run."""
    without_key = run(cache_path, tmp_path / "a", tmp_path / "adapter_a", caption_dropout=0.5)
    text_encoder = micro_text_encoder()
    before = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    rank_zero = run(cache_path, tmp_path / "b", tmp_path / "adapter_b", text_encoder=text_encoder,
                    lora={**LORA, "text_encoder_rank": 0}, caption_dropout=0.5)
    assert rank_zero.losses == without_key.losses and len(rank_zero.losses) == 6
    assert rank_zero.trainable_parameters == without_key.trainable_parameters
    assert text_encoder.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in text_encoder.state_dict().items())
    assert not (tmp_path / "adapter_b" / TEXT_ENCODER_WEIGHTS_NAME).exists()


@pytest.fixture(scope="module")
def trained(cache_path, tmp_path_factory):
    """A 3-epoch run with a rank-2 text-encoder LoRA and caption dropout."""
    root = tmp_path_factory.mktemp("trained")
    text_encoder = micro_text_encoder()
    result = run(cache_path, root / "checkpoints", root / "adapter", text_encoder=text_encoder,
                 lora={**LORA, "text_encoder_rank": 2, "text_encoder_alpha": 4.0}, caption_dropout=0.5)
    return result, text_encoder, root / "adapter"


def test_the_text_encoder_lora_trains_and_changes_the_encoding(cache_path, trained):
    result, text_encoder, adapter_dir = trained
    saved = load_file(adapter_dir / TEXT_ENCODER_WEIGHTS_NAME)
    # 2 layers x 4 projections x (A, B), all of them updated (B starts at zero).
    assert len(saved) == 2 * len(TEXT_ENCODER_TARGET_MODULES) * 2
    assert all(key.startswith("text_model.encoder.layers.") for key in saved)
    assert all(saved[key].abs().max() > 0 for key in saved if key.endswith("lora_B.weight"))
    ids = load_latent_cache(cache_path).input_ids
    adapted = encoded(text_encoder, ids)
    assert (adapted - encoded(micro_text_encoder(), ids)).abs().max() > 1e-4
    for module in text_encoder.modules():
        if hasattr(module, "base_layer"):
            assert not module.base_layer.weight.requires_grad  # only the LoRA matrices train
    assert result.trainable_parameters > run_parameters_without_text_lora()


def run_parameters_without_text_lora() -> int:
    from ec_lora_t.adapter import add_ec_lora

    adapter = add_ec_lora(micro_unet(), ECLoRAConfig(**LORA))
    return sum(p.numel() for p in adapter.lora_parameters() + list(adapter.ecm.parameters()))


def test_a_resumed_run_restores_the_text_encoder_lora(cache_path, tmp_path, trained):
    _, _, straight_adapter = trained
    lora = {**LORA, "text_encoder_rank": 2, "text_encoder_alpha": 4.0}
    with pytest.raises(KeyboardInterrupt):
        run(cache_path, tmp_path / "ckpt", text_encoder=micro_text_encoder(), lora=lora, caption_dropout=0.5,
            on_step=crash_at(3))
    resumed = run(cache_path, tmp_path / "ckpt", tmp_path / "adapter", text_encoder=micro_text_encoder(), lora=lora,
                  caption_dropout=0.5)
    assert resumed.resumed_from_epoch == 1
    expected, actual = load_file(straight_adapter / TEXT_ENCODER_WEIGHTS_NAME), load_file(
        tmp_path / "adapter" / TEXT_ENCODER_WEIGHTS_NAME)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_caption_dropout_encodes_the_generic_ids():
    text_encoder = micro_text_encoder()
    generator = torch.Generator().manual_seed(0)
    batch = {name: torch.randint(0, VOCABULARY, (3, 77), generator=generator)
             for name in ("input_ids", "generic_input_ids")}
    dropped = torch.tensor([True, False, True])
    with torch.no_grad():
        mixed = caption_embeddings(batch, dropped, text_encoder)
    assert torch.allclose(mixed[0], encoded(text_encoder, batch["generic_input_ids"][:1])[0], atol=1e-6)
    assert torch.allclose(mixed[1], encoded(text_encoder, batch["input_ids"][1:2])[0], atol=1e-6)
    with torch.no_grad():
        assert torch.equal(caption_embeddings(batch, None, text_encoder), encoded(text_encoder, batch["input_ids"]))


def test_missing_token_ids_or_text_encoder_is_an_error(tmp_path):
    lora = {**LORA, "text_encoder_rank": 2}
    with pytest.raises(ValueError, match="token ids .* rerun the latents stage"):
        run(write_cache(tmp_path / "old.safetensors"), tmp_path / "c", text_encoder=micro_text_encoder(), lora=lora)
    with pytest.raises(ValueError, match="needs the text encoder"):
        run(write_cache_with_ids(tmp_path / "new.safetensors"), tmp_path / "c", lora=lora)


def test_a_negative_rank_is_refused_in_one_line(tmp_path):
    from stages._common import ParamsError

    path = params_with(tmp_path, train__text_encoder_lora_rank=-1)
    with pytest.raises(ParamsError) as error:
        check(path)
    message = str(error.value)
    assert "\n" not in message and "train.text_encoder_lora_rank = -1: must be greater than or equal to 0" in message
    check(params_with(tmp_path, train__text_encoder_lora_rank=4, train__text_encoder_lora_alpha=None))


def test_the_latents_stage_token_ids_encode_to_the_cached_embeddings(tiny_sd_dir):
    from ec_lora_t.data.latents import caption_token_ids
    from ec_lora_t.encoders import encode_prompts
    from ec_lora_t.models import load_components

    components = load_components(str(tiny_sd_dir))
    captions = ["(democreator style) a red coat (winter)", "(democreator style) (summer)"]
    ids = caption_token_ids(components.tokenizer, captions)
    assert ids.dtype == torch.int64 and ids.shape == (2, 77)
    cached = encode_prompts(components.tokenizer, components.text_encoder, captions)
    assert torch.equal(encoded(components.text_encoder, ids), cached)


# --- Loading with the pipeline, and export -----------------------------------------------------


@pytest.fixture(scope="module")
def text_adapter_dir(tiny_sd_dir, tmp_path_factory):
    """An adapter for the tiny SD with a rank-4 text-encoder LoRA (random B: it changes the text)."""
    from diffusers import UNet2DConditionModel

    from ec_lora_t.adapter import add_ec_lora, save_adapter
    from ec_lora_t.adapter.text_encoder import inject_text_encoder_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    adapter = add_ec_lora(unet, ECLoRAConfig(rank=4, alpha=8, ecm_hidden_size=16, text_encoder_rank=4,
                                             text_encoder_alpha=8.0))
    adapter.text_encoder_lora = inject_text_encoder_lora(
        CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder"), adapter.config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in adapter.layers + adapter.text_encoder_lora.layers:
            layer.lora_B.weight.copy_(0.5 * torch.randn(layer.lora_B.weight.shape, generator=generator))
    return save_adapter(tmp_path_factory.mktemp("adapter") / "adapter", adapter)


PROMPT_IDS = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])


def test_the_pipeline_loads_the_text_encoder_lora(tiny_sd_dir, text_adapter_dir, adapter_dir):
    from ec_lora_t.generation import load_pipeline

    base = load_pipeline(str(tiny_sd_dir), None, device="cpu")
    with_text_lora = load_pipeline(str(tiny_sd_dir), text_adapter_dir, device="cpu")
    without = load_pipeline(str(tiny_sd_dir), adapter_dir, device="cpu")  # an adapter of before: as before
    base_text = encoded(base.text_encoder, PROMPT_IDS)
    assert without.ec_lora.text_encoder_lora is None
    assert torch.equal(encoded(without.text_encoder, PROMPT_IDS), base_text)
    assert (encoded(with_text_lora.text_encoder, PROMPT_IDS) - base_text).abs().max() > 1e-3
    with with_text_lora.ec_lora.text_encoder_lora.disabled():  # what mode "base" encodes with
        assert torch.equal(encoded(with_text_lora.text_encoder, PROMPT_IDS), base_text)
    # Mode "base" is the pretrained model, text encoder included: the same images.
    sampling = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np", mode="base")
    images = [pipe("a red coat", generator=torch.Generator().manual_seed(1), **sampling).images
              for pipe in (base, with_text_lora)]
    assert (images[0] == images[1]).all()


@pytest.mark.parametrize("export_format", ["diffusers", "kohya"])
def test_export_loads_the_text_encoder_in_diffusers(tiny_sd_dir, text_adapter_dir, tmp_path, export_format, caplog):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from ec_lora_t.adapter.export import export_lora
    from ec_lora_t.generation import load_pipeline

    path = export_lora(text_adapter_dir, (0.8, 0.5), tmp_path / f"lora-{export_format}.safetensors", format=export_format)
    exported = load_file(path)
    text_prefix = "lora_te_text_model_encoder_layers_" if export_format == "kohya" else "text_encoder.text_model."
    text_keys = [key for key in exported if key.startswith(text_prefix)]
    per_layer = 3 if export_format == "kohya" else 2  # kohya adds `.alpha`
    assert len(text_keys) == 2 * len(TEXT_ENCODER_TARGET_MODULES) * per_layer

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    with caplog.at_level(logging.WARNING):
        pipeline.load_lora_weights(str(path.parent), weight_name=path.name)
    assert not [r for r in caplog.records if "unexpected keys" in r.getMessage() or "missing keys" in r.getMessage()]
    # Every text-encoder layer loaded (diffusers drops keys it cannot place with only a log line).
    loaded = set(get_peft_model_state_dict(pipeline.text_encoder, adapter_name="default_0"))
    expected = {key.removeprefix("text_model.") for key in load_file(text_adapter_dir / TEXT_ENCODER_WEIGHTS_NAME)}
    assert {key.removeprefix("text_model.") for key in loaded} == expected
    ours = load_pipeline(str(tiny_sd_dir), text_adapter_dir, device="cpu")
    assert torch.allclose(encoded(pipeline.text_encoder, PROMPT_IDS), encoded(ours.text_encoder, PROMPT_IDS), atol=1e-5)

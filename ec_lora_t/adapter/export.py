"""Export an EC-LoRA-T adapter at one engagement-time vector as a plain LoRA file.

At a fixed vector e every layer's update is a constant s_k(e) * (alpha / r) * B_k A_k x, so
baking that factor into B gives an ordinary LoRA with scale 1 (alpha = rank):

    A' = A,   B' = s_k(e) * (alpha / r) * B

The file reproduces `ECLoRAStableDiffusionPipeline` at e with vector guidance 1 (same seeds,
same images; tests/test_generation_export.py). Vector guidance w != 1 (`ec-lora-t generate`'s
default is 4) compares two model calls at every sampling step, the vector's and the anchor's;
no fixed weight update can carry that, so the file draws what w = 1 draws.

An adapter with a text-encoder LoRA (`text_encoder_rank` > 0) exports it too: it is static,
so only its alpha / r goes into B.

Formats:
    diffusers  PEFT key names as diffusers' `load_lora_weights` reads them:
               `unet.<module>.lora_A.weight` (r, in), `unet.<module>.lora_B.weight` (out, r),
               `text_encoder.<module>.lora_A.weight` ... (e.g. `text_encoder.text_model.encoder.
               layers.0.self_attn.q_proj.lora_A.weight`)
    kohya      the same weights through diffusers' `convert_state_dict_to_kohya`:
               `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
               `lora_te_<module with _>...` for the text encoder (kohya's SD1.x prefix, which
               diffusers' `_convert_non_diffusers_lora_to_diffusers` reads back), the layout
               AUTOMATIC1111 and ComfyUI load (alpha = rank, so their scale is 1)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_kohya

from ec_lora_t.adapter.conditioning import ecm_scales
from ec_lora_t.adapter.config import ECLoRAConfig
from ec_lora_t.adapter.ecm import EngagementConditioningModule, check_engagement_time
from ec_lora_t.adapter.model import load_adapter_weights, load_ecm, load_text_encoder_weights, save_safetensors
from ec_lora_t.adapter.text_encoder import baked_text_encoder_state_dict

EXPORT_FORMATS = ("diffusers", "kohya")


def baked_lora_state_dict(
    config: ECLoRAConfig,
    lora_state: dict[str, torch.Tensor],
    ecm: EngagementConditioningModule,
    engagement_time: tuple[float, float],
    prefix: str = "unet",
) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA weights with the static and dynamic scale for `engagement_time` in B."""
    with torch.no_grad():
        # (K,), or (K, r) with one scale per rank component: B diag(s) A = (B * s) A
        scales = ecm_scales(ecm, torch.tensor([engagement_time], dtype=torch.float32))[0]
    baked: dict[str, torch.Tensor] = {}
    for index, name in enumerate(config.layer_names):
        lora_a = lora_state[f"{name}.lora_A.weight"].to(torch.float32)
        lora_b = lora_state[f"{name}.lora_B.weight"].to(torch.float32)
        baked[f"{prefix}.{name}.lora_A.weight"] = lora_a.contiguous()
        baked[f"{prefix}.{name}.lora_B.weight"] = (lora_b * (scales[index] * config.static_scale)).contiguous()
    return baked


def export_lora(
    adapter_dir: str | Path,
    engagement_time: tuple[float, float],
    out_path: str | Path,
    format: str = "diffusers",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `out_path` (.safetensors): the adapter at `engagement_time` (each in [0, 1]) as a plain LoRA file."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    (engagement_time,) = check_engagement_time([engagement_time])
    adapter_dir = Path(adapter_dir)
    config, lora_state, ecm_state = load_adapter_weights(adapter_dir)
    if config.vector_embedding:
        # The vector's offset of the timestep embedding is not a low-rank weight update: a plain
        # LoRA file cannot hold it, and a file without it would draw something else.
        raise ValueError(f"{adapter_dir}: trained with vector_embedding; plain LoRA files cannot hold its "
                         "timestep-embedding offset, so it cannot be exported")
    ecm = load_ecm(config, ecm_state, source=str(adapter_dir))
    state = baked_lora_state_dict(config, lora_state, ecm, engagement_time)
    text_encoder_state = load_text_encoder_weights(adapter_dir, config)
    if text_encoder_state is not None:
        state.update(baked_text_encoder_state_dict(config, text_encoder_state))
    if format == "kohya":
        # diffusers names SD1.x's text encoder `lora_te1_` (SDXL's first); kohya's SD1.x files say `lora_te_`.
        state = {_kohya_sd1_name(key): value for key, value in convert_state_dict_to_kohya(state).items()}
    state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        "ec_lora_t_engagement_time": json.dumps(list(engagement_time)),
        "ec_lora_t_rank": str(config.rank),
        "ec_lora_t_source": str(adapter_dir),
    }
    if text_encoder_state is not None:
        metadata["ec_lora_t_text_encoder_rank"] = str(config.text_encoder_rank)
    save_safetensors(state, out_path, metadata=metadata)  # readable by others, as JSON and PNG are
    return out_path


def _kohya_sd1_name(key: str) -> str:
    return "lora_te_" + key.removeprefix("lora_te1_") if key.startswith("lora_te1_") else key

"""The EC-LoRA-T adapter: config, layer, ECM, injection, per-row conditioning and export.

The method in one subpackage, split like peft's `tuners/lora/{config,layer,model}.py`:

    config.py         ECLoRAConfig: rank, alpha, target layers, the ECM's shape
    layer.py          ECLoRALinear: a frozen nn.Linear plus s_k(e) * (alpha / r) * B A x
    ecm.py            EngagementConditioningModule: (engagement, time) -> one scale per layer
    model.py          injection, the ECLoRAAdapter (layers in ECM order + ECM), save and load
    conditioning.py   the UNet batch's rows (unet_rows) and their scales for the calls inside a block
    export.py         bake one vector into a plain LoRA file (diffusers/PEFT or kohya keys)
    text_encoder.py   the text encoder's optional static LoRA (train.text_encoder_lora_rank)
"""

import importlib

# Names are loaded from their module on first use (PEP 562), so that importing the torch-free
# `ec_lora_t.adapter.config` (the params check, stages/params/train.py) does not import torch.
_MODULES = {
    "conditioning": ("AVERAGE_POST", "MODES", "UNetRows", "ecm_outputs", "ecm_scales", "engagement_conditioning",
                     "fold_scales", "row_conditioning", "scale_runs", "unet_rows"),
    "config": ("ECLoRAConfig",),
    "ecm": ("EngagementConditioningModule",),
    "layer": ("ECLoRALinear", "FoldedWeights", "LoRALinear", "VectorTimeEmbedding"),
    "model": ("ECLoRAAdapter", "add_ec_lora", "build_ecm", "inject_ec_lora", "inject_vector_embedding", "load_adapter",
              "load_adapter_weights", "load_ecm", "load_text_encoder_lora", "save_adapter"),
    "text_encoder": ("TextEncoderLoRA", "inject_text_encoder_lora"),
}
_MODULE_OF = {name: module for module, names in _MODULES.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'ec_lora_t.adapter' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ec_lora_t.adapter.{_MODULE_OF[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)

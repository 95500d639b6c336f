"""The EC-LoRA-T adapter: config, layer, ECM, injection, per-row conditioning and export.

The method in one subpackage, split like peft's `tuners/lora/{config,layer,model}.py`:

    config.py         ECLoRAConfig: rank, alpha, target layers, the ECM's shape
    layer.py          ECLoRALinear: a frozen nn.Linear plus s_k(e) * (alpha / r) * B A x
    ecm.py            EngagementConditioningModule: (engagement, time) -> one scale per layer
    model.py          injection, the ECLoRAAdapter (layers in ECM order + ECM), save and load
    conditioning.py   the UNet batch's rows (unet_rows) and their scales for the calls inside a block
    export.py         bake one vector into a plain LoRA file (diffusers/PEFT or kohya keys)
"""

from ec_lora_t.adapter.conditioning import (
    AVERAGE_POST,
    MODES,
    UNetRows,
    ecm_outputs,
    ecm_scales,
    engagement_conditioning,
    row_conditioning,
    unet_rows,
)
from ec_lora_t.adapter.config import ECLoRAConfig
from ec_lora_t.adapter.ecm import EngagementConditioningModule
from ec_lora_t.adapter.layer import ECLoRALinear, VectorTimeEmbedding
from ec_lora_t.adapter.model import (
    ECLoRAAdapter,
    add_ec_lora,
    build_ecm,
    inject_ec_lora,
    inject_vector_embedding,
    load_adapter,
    load_adapter_weights,
    load_ecm,
    save_adapter,
)

__all__ = [
    "MODES", "VectorTimeEmbedding", "ECLoRAAdapter", "ECLoRAConfig", "ECLoRALinear", "EngagementConditioningModule", "add_ec_lora",
    "build_ecm", "ecm_scales", "engagement_conditioning", "inject_ec_lora", "inject_vector_embedding", "load_adapter", "load_adapter_weights",
    "load_ecm", "ecm_outputs", "row_conditioning", "save_adapter", "unet_rows", "UNetRows", "AVERAGE_POST",
]

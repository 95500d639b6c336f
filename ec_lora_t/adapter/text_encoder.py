"""A static LoRA on the CLIP text encoder, trained with the UNet's EC-LoRA (`train.text_encoder_lora_rank`).

The engagement-time vector modulates only the UNet: the text encoder's LoRA is an ordinary one,
y = W x + (alpha / r) B A x, on the attention projections of every CLIP layer. With it the
caption embeddings change during training, so they cannot come from the latent cache: the
latents stage stores the caption token ids (`input_ids`, `generic_input_ids`) and every step
encodes them through the adapted encoder (`ec_lora_t.training.objective.caption_embeddings`).

Saved beside the adapter as `text_encoder_lora.safetensors` (keys `<layer name>.lora_A.weight`
(r, in) / `.lora_B.weight` (out, r), layer names `text_model.encoder.layers.N.self_attn.q_proj`
as in SD1.5's checkpoints); the rank and alpha are in `adapter_config.json`
(`ECLoRAConfig.text_encoder_rank` / `_alpha`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ec_lora_t.adapter.config import ECLoRAConfig
from ec_lora_t.adapter.layer import LoRALinear, copy_lora_state

# CLIPAttention's projections (transformers' CLIPTextModel), the layers diffusers' and kohya's
# SD1.5 text-encoder LoRAs train.
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class TextEncoderLoRA:
    """The LoRA layers injected into one text encoder, with their layer names (`layer_name`)."""

    layer_names: tuple[str, ...]
    layers: list[LoRALinear]

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in (layer.lora_A.weight, layer.lora_B.weight)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Keys `<module name>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)."""
        state: dict[str, torch.Tensor] = {}
        for name, layer in zip(self.layer_names, self.layers):
            state[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
            state[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        copy_lora_state(self.state_dict(), state, source)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base text encoder for the calls inside the block (the pipeline's "base" mode)."""
        for layer in self.layers:
            layer.enabled = False
        try:
            yield
        finally:
            for layer in self.layers:
                layer.enabled = True


def layer_name(module_name: str) -> str:
    """The name a text-encoder layer has in saved and exported files: `text_model.encoder...`.

    transformers 5 flattened `CLIPTextModel` (its modules are `encoder.layers.N...`, and it
    converts SD1.5's `text_model.` weights on load); transformers 4, kohya's files and diffusers'
    LoRA loader (which strips `text_model.` for a flattened model) use the checkpoint's form.
    One form for both keeps an adapter loadable whichever transformers is installed.
    """
    return module_name if module_name.startswith("text_model.") else f"text_model.{module_name}"


def inject_text_encoder_lora(text_encoder: nn.Module, config: ECLoRAConfig) -> TextEncoderLoRA:
    """Freeze `text_encoder` and wrap its attention projections in `LoRALinear` (in place).

    Needs `config.text_encoder_rank` > 0. The new A and B are fp32 on the encoder's device
    whatever its dtype (the trainable master weights), B zero: the encoder's output is unchanged
    until the first update.
    """
    if config.text_encoder_rank < 1:
        raise ValueError("text_encoder_rank is 0: the adapter has no text-encoder LoRA")
    if any(isinstance(module, LoRALinear) for module in text_encoder.modules()):
        raise ValueError("the text encoder already has LoRA layers; inject into a fresh one")
    text_encoder.requires_grad_(False)
    names = [name for name, module in text_encoder.named_modules()
             if isinstance(module, nn.Linear) and name.rpartition(".")[2] in TEXT_ENCODER_TARGET_MODULES]
    if not names:
        raise ValueError(f"the text encoder has no nn.Linear named {list(TEXT_ENCODER_TARGET_MODULES)}: "
                         f"a text-encoder LoRA needs a CLIP text model, got {type(text_encoder).__name__}")
    alpha = config.text_encoder_scale * config.text_encoder_rank
    layers = []
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = text_encoder.get_submodule(parent_name)
        layer = LoRALinear(getattr(parent, child_name), config.text_encoder_rank, alpha)
        setattr(parent, child_name, layer)
        layers.append(layer)
    return TextEncoderLoRA(tuple(layer_name(name) for name in names), layers)


def baked_text_encoder_state_dict(
    config: ECLoRAConfig, state: dict[str, torch.Tensor], prefix: str = "text_encoder"
) -> dict[str, torch.Tensor]:
    """PEFT-named weights with the static scale in B (B' = (alpha / r) B: a LoRA of scale 1), keys
    `<prefix>.<module>.lora_A.weight`, as diffusers' `load_lora_weights` reads a text encoder's."""
    baked: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        tensor = tensor.to(torch.float32)
        if key.endswith(".lora_B.weight"):
            tensor = tensor * config.text_encoder_scale
        baked[f"{prefix}.{key}"] = tensor.contiguous()
    return baked

"""Attaching an EC-LoRA adapter to a model: injection, the adapter object, save and load.

Like peft's `tuners/lora/model.py`: the injector walks `named_modules()` once, replaces each
target `nn.Linear` with an `ECLoRALinear` that wraps it (`setattr` on the parent), and returns
the injected layers in ECM output order. The `ECLoRAAdapter` keeps that list, so nothing
walks the model again: conditioning, saving and the optimizer all use the adapter's layers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ec_lora_t.adapter.config import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_FORMAT,
    ADAPTER_WEIGHTS_NAME,
    ECM_WEIGHTS_NAME,
    TEXT_ENCODER_WEIGHTS_NAME,
    ECLoRAConfig,
)
from ec_lora_t.adapter.ecm import EngagementConditioningModule
from ec_lora_t.adapter.layer import ECLoRALinear, VectorTimeEmbedding, copy_lora_state
from ec_lora_t.adapter.text_encoder import TextEncoderLoRA, inject_text_encoder_lora


def _is_target(module_name: str, target_modules: tuple[str, ...]) -> bool:
    return any(module_name == target or module_name.endswith("." + target) for target in target_modules)


def inject_ec_lora(model: nn.Module, config: ECLoRAConfig) -> list[ECLoRALinear]:
    """Freeze `model` and replace its target `nn.Linear` layers with `ECLoRALinear` in place.

    Returns the injected layers in `named_modules()` order, which is also their ECM output
    index. `config.layer_names` is set to that order; if it was already set (loading a saved
    adapter), the model must produce exactly the same names. Trainability is decided here
    and only here: the base model is frozen, A and B train.
    """
    if any(isinstance(module, ECLoRALinear) for module in model.modules()):
        raise ValueError("model already has EC-LoRA layers; inject into a fresh model")
    model.requires_grad_(False)
    target_names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _is_target(name, config.target_modules)
    ]
    if not target_names:
        raise ValueError(f"no nn.Linear in the model matches target_modules {list(config.target_modules)}")
    if config.layer_names and tuple(target_names) != config.layer_names:
        missing = sorted(set(config.layer_names) - set(target_names))[:5]
        extra = sorted(set(target_names) - set(config.layer_names))[:5]
        raise ValueError(
            "the model's target layers differ from the adapter's layer_names "
            f"(adapter layers missing in the model: {missing}; model layers not in the adapter: {extra}); "
            "was the adapter trained on another UNet architecture?"
        )
    layers = []
    for ecm_index, name in enumerate(target_names):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = ECLoRALinear(getattr(parent, child_name), config.rank, config.alpha, ecm_index)
        setattr(parent, child_name, layer)
        layers.append(layer)
    config.layer_names = tuple(target_names)
    return layers


def inject_vector_embedding(model: nn.Module, config: ECLoRAConfig) -> VectorTimeEmbedding:
    """Wrap the UNet's timestep embedding (`model.time_embedding`) so the ECM can offset it per row.

    Sets `config.time_embedding_dim`; a saved adapter must fit the model's embedding width.
    """
    base = getattr(model, "time_embedding", None)
    if base is None or isinstance(base, VectorTimeEmbedding):
        raise ValueError("vector_embedding needs a model with a plain `time_embedding` (a diffusers UNet)")
    width = base.linear_2.out_features
    if config.time_embedding_dim and config.time_embedding_dim != width:
        raise ValueError(
            f"the adapter's time embedding is {config.time_embedding_dim} wide, the model's is {width}: "
            "was the adapter trained on another UNet architecture?"
        )
    config.time_embedding_dim = width
    wrapper = VectorTimeEmbedding(base)
    model.time_embedding = wrapper
    return wrapper


def build_ecm(config: ECLoRAConfig, device: torch.device | str | None = None) -> EngagementConditioningModule:
    """An ECM with one output per injected layer (`config.layer_names` must be filled), its input
    transform (`config.ecm_input`), and a time-embedding head when `config.vector_embedding`."""
    if not config.layer_names:
        raise ValueError("config.layer_names is empty: inject the EC-LoRA layers before building the ECM")
    if config.vector_embedding and not config.time_embedding_dim:
        raise ValueError("config.time_embedding_dim is 0: inject the vector embedding before building the ECM")
    input_shift, input_scale = config.ecm_input_affine()
    return EngagementConditioningModule(
        num_layers=len(config.layer_names), hidden_size=config.ecm_hidden_size, depth=config.ecm_depth,
        scales_per_layer=config.scales_per_layer,
        embedding_dim=config.time_embedding_dim if config.vector_embedding else 0,
        input_shift=input_shift, input_scale=input_scale,
    ).to(device)


@dataclass
class ECLoRAAdapter:
    """An EC-LoRA adapter attached to a model: its config, its layers in ECM order, and the ECM.

    `layers[k]` is the layer whose dynamic scale is the ECM's output k, and whose module name
    is `config.layer_names[k]`.
    """

    config: ECLoRAConfig
    layers: list[ECLoRALinear]
    ecm: EngagementConditioningModule
    # The wrapped timestep embedding when `config.vector_embedding`, else None.
    time_embedding: VectorTimeEmbedding | None = None
    # The text encoder's static LoRA when `config.text_encoder_rank` > 0 and a text encoder was
    # given (training, the pipeline), else None.
    text_encoder_lora: TextEncoderLoRA | None = None

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.config.layer_names):
            raise ValueError(f"{len(self.layers)} layers but {len(self.config.layer_names)} layer names")
        if [layer.ecm_index for layer in self.layers] != list(range(len(self.layers))):
            raise ValueError("adapter layers must be in ECM index order")
        # Set while an `engagement_conditioning` block is open: nesting two blocks would let
        # the inner exit clear the outer block's scales.
        self.conditioning_active = False

    def lora_parameters(self) -> list[nn.Parameter]:
        """The UNet's LoRA matrices, then the text encoder's (when it has a LoRA): what the
        optimizer's LoRA group trains."""
        unet = [p for layer in self.layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
        return unet + (self.text_encoder_lora.parameters() if self.text_encoder_lora is not None else [])

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA matrices only, keys `<module name>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)."""
        state: dict[str, torch.Tensor] = {}
        for name, layer in zip(self.config.layer_names, self.layers):
            state[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
            state[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
        return state

    def load_lora_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy LoRA matrices into the adapter's layers; every key must match exactly."""
        copy_lora_state(self.lora_state_dict(), state, source)


def add_ec_lora(model: nn.Module, config: ECLoRAConfig, device: torch.device | str | None = None) -> ECLoRAAdapter:
    """Inject fresh EC-LoRA layers into `model` (frozen) and build a fresh ECM for them."""
    layers = inject_ec_lora(model, config)
    time_embedding = inject_vector_embedding(model, config) if config.vector_embedding else None
    return ECLoRAAdapter(config, layers, build_ecm(config, device), time_embedding)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors' `save_file`, leaving the file with the mode a plain `open()` gives (0666 less the umask).

    safetensors writes through a temporary file of its own and renames it, so the file keeps that
    file's private mode 0600: an adapter or an exported LoRA could not be read by another account
    on a shared machine, while the JSON beside it could.
    """
    path = Path(path)
    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    path.chmod(0o666 & ~umask)
    return path


def save_adapter(adapter_dir: str | Path, adapter: ECLoRAAdapter, ecm: EngagementConditioningModule | None = None) -> Path:
    """Write the adapter folder (LoRA matrices, ECM, config); safetensors only.

    `ecm` overrides `adapter.ecm` (e.g. the unwrapped module of a distributed run).
    """
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    ecm = adapter.ecm if ecm is None else ecm
    lora_state = {k: v.to(torch.float32).contiguous().cpu() for k, v in adapter.lora_state_dict().items()}
    save_safetensors(lora_state, adapter_dir / ADAPTER_WEIGHTS_NAME, metadata={"format": ADAPTER_FORMAT})
    ecm_state = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in ecm.state_dict().items()}
    save_safetensors(ecm_state, adapter_dir / ECM_WEIGHTS_NAME, metadata={"format": ADAPTER_FORMAT})
    if adapter.text_encoder_lora is not None:
        text_state = {k: v.to(torch.float32).contiguous().cpu() for k, v in adapter.text_encoder_lora.state_dict().items()}
        save_safetensors(text_state, adapter_dir / TEXT_ENCODER_WEIGHTS_NAME, metadata={"format": ADAPTER_FORMAT})
    (adapter_dir / ADAPTER_CONFIG_NAME).write_text(json.dumps(adapter.config.to_dict(), indent=2) + "\n")
    return adapter_dir


def _require_file(path: Path) -> Path:
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such folder (the EC-LoRA adapter folder, as the train stage "
                                f"writes it: {ADAPTER_WEIGHTS_NAME}, {ECM_WEIGHTS_NAME}, {ADAPTER_CONFIG_NAME})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; an EC-LoRA adapter folder holds {ADAPTER_WEIGHTS_NAME}, "
                                f"{ECM_WEIGHTS_NAME} and {ADAPTER_CONFIG_NAME}")
    return path


def load_adapter_config(adapter_dir: str | Path) -> ECLoRAConfig:
    config_path = _require_file(Path(adapter_dir) / ADAPTER_CONFIG_NAME)
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from error
    config = ECLoRAConfig.from_dict(raw, source=str(config_path))
    if not config.layer_names:
        raise ValueError(f"{config_path}: layer_names is empty")
    return config


def load_adapter_weights(
    adapter_dir: str | Path,
) -> tuple[ECLoRAConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Config, LoRA state and ECM state of a saved adapter, without a model.

    Non-finite weights are an error naming the file: they would make every image black.
    """
    adapter_dir = Path(adapter_dir)
    config = load_adapter_config(adapter_dir)
    lora_state = _read_finite(_require_file(adapter_dir / ADAPTER_WEIGHTS_NAME))
    ecm_state = _read_finite(_require_file(adapter_dir / ECM_WEIGHTS_NAME))
    return config, lora_state, ecm_state


def _read_finite(path: Path) -> dict[str, torch.Tensor]:
    state = _read_tensors(path)
    bad = [key for key, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(f"{path}: non-finite weights in {bad[:3]}; retrain the adapter")
    return state


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one adapter file; a file cut short or not safetensors is an error naming it."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: unreadable safetensors file ({' '.join(str(error).split())}); was it cut short "
                         "while copying? Copy or retrain the adapter") from None


def load_ecm(config: ECLoRAConfig, ecm_state: dict[str, torch.Tensor], source: str) -> EngagementConditioningModule:
    ecm = build_ecm(config)
    try:
        ecm.load_state_dict(ecm_state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{source}: ECM weights do not fit the config ({error})") from error
    return ecm


def load_text_encoder_weights(adapter_dir: str | Path, config: ECLoRAConfig) -> dict[str, torch.Tensor] | None:
    """The text encoder's LoRA state of a saved adapter; None when it has none (text_encoder_rank 0)."""
    if config.text_encoder_rank == 0:
        return None
    return _read_finite(_require_file(Path(adapter_dir) / TEXT_ENCODER_WEIGHTS_NAME))


def load_text_encoder_lora(adapter_dir: str | Path, config: ECLoRAConfig, text_encoder: nn.Module) -> TextEncoderLoRA | None:
    """Inject the saved adapter's text-encoder LoRA into `text_encoder` (None, and the encoder
    untouched, when the adapter has none)."""
    state = load_text_encoder_weights(adapter_dir, config)
    if state is None:
        return None
    text_encoder_lora = inject_text_encoder_lora(text_encoder, config)
    text_encoder_lora.load_state_dict(state, source=str(Path(adapter_dir) / TEXT_ENCODER_WEIGHTS_NAME))
    return text_encoder_lora


def load_adapter(adapter_dir: str | Path, model: nn.Module) -> ECLoRAAdapter:
    """Inject the saved adapter into a fresh `model`; the ECM is fp32 on the CPU."""
    adapter_dir = Path(adapter_dir)
    config, lora_state, ecm_state = load_adapter_weights(adapter_dir)
    layers = inject_ec_lora(model, config)
    time_embedding = inject_vector_embedding(model, config) if config.vector_embedding else None
    adapter = ECLoRAAdapter(config, layers, load_ecm(config, ecm_state, str(adapter_dir)), time_embedding)
    adapter.load_lora_state_dict(lora_state, source=str(adapter_dir / ADAPTER_WEIGHTS_NAME))
    return adapter

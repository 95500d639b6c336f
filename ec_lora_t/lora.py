"""EC-LoRA layers: config, the layer that wraps a frozen `nn.Linear`, injection, save and load.

Report 3.1.2, 4.3.1, 4.4.1. A layer computes

    y = W x + s_k(e) * (alpha / r) * B A x

where W is the frozen base layer (wrapped, never copied), A and B the trainable low-rank
matrices, alpha / r the static scale and s_k(e) the dynamic scale that the Engagement
Conditioning Module produces for this layer (index k) from each sample's engagement-time
vector e. The dynamic scale is handed to the layer for one UNet call by
`ec_lora_t.conditioning.engagement_conditioning`; outside that context a layer refuses to
run, so an unconditioned call can never pass silently.

An adapter on disk is a folder with three files:
    ec_lora.safetensors   LoRA matrices, keys `<module name>.lora_A.weight` / `.lora_B.weight`
    ecm.safetensors       ECM weights (`ec_lora_t.ecm.EngagementConditioningModule`)
    adapter_config.json   `ECLoRAConfig` plus the ordered layer names (the ECM output order)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ec_lora_t.ecm import EngagementConditioningModule

ADAPTER_WEIGHTS_NAME = "ec_lora.safetensors"
ECM_WEIGHTS_NAME = "ecm.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_FORMAT = "ec-lora-t/1"

# The report's targets (3.1.3): attention projections and the feed-forward layers of every
# transformer block in the UNet.
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
ECM_GRANULARITIES = ("layer", "rank")


@dataclass
class ECLoRAConfig:
    """What an EC-LoRA adapter is: rank, static scale, which layers, and the ECM's shape."""

    rank: int = 16
    alpha: float = 64.0
    # A module is a target when its dotted name equals an entry or ends with "." + entry
    # (peft's rule for a list of names), e.g. "to_out.0" matches "...attn1.to_out.0".
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    ecm_hidden_size: int = 128
    ecm_depth: int = 2
    # "layer": one ECM scale per layer (the report); "rank": one per layer and rank component.
    ecm_granularity: str = "layer"
    # Filled by `inject_ec_lora`: the injected module names in ECM output order.
    layer_names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        self.layer_names = tuple(self.layer_names)
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.target_modules:
            raise ValueError("target_modules is empty: EC-LoRA needs at least one layer to adapt")
        if self.ecm_granularity not in ECM_GRANULARITIES:
            raise ValueError(f"ecm_granularity must be one of {ECM_GRANULARITIES}, got {self.ecm_granularity!r}")
        if self.ecm_hidden_size < 1 or self.ecm_depth < 1:
            raise ValueError(
                f"ECM needs hidden size >= 1 and depth >= 1, got {self.ecm_hidden_size}, {self.ecm_depth}"
            )

    @property
    def static_scale(self) -> float:
        return self.alpha / self.rank

    @property
    def scales_per_layer(self) -> int:
        return self.rank if self.ecm_granularity == "rank" else 1

    def to_dict(self) -> dict[str, Any]:
        config = asdict(self)
        config["target_modules"] = list(self.target_modules)
        config["layer_names"] = list(self.layer_names)
        return {"format": ADAPTER_FORMAT, **config}

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "adapter config") -> ECLoRAConfig:
        config = dict(config)
        found_format = config.pop("format", None)
        if found_format != ADAPTER_FORMAT:
            raise ValueError(f"{source}: format is {found_format!r}, expected {ADAPTER_FORMAT!r}")
        unknown = set(config) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"{source}: unknown keys {sorted(unknown)}")
        return cls(**config)


class ECLoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a low-rank update scaled per sample by the ECM.

    The base layer keeps its own weights and dtype (the compute dtype, e.g. bf16); the LoRA
    matrices are fp32 master weights. Under autocast the LoRA matmuls run in the autocast
    dtype like every other linear layer; without autocast the input is cast to fp32 for them.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, ecm_index: int) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"EC-LoRA wraps nn.Linear layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.rank = rank
        self.static_scale = alpha / rank
        self.ecm_index = ecm_index
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        # Initialise A the same way as the default for nn.Linear and B to zero, so that
        # step 0 reproduces the base model (LoRA paper; peft tuners/lora/layer.py).
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        # Per-call state, set and cleared only by `engagement_conditioning`: a float (the same
        # scale for every sample, e.g. 1.0 for plain LoRA, 0.0 for the base model) or a
        # tensor (batch,) with this layer's ECM scale for each sample, or (batch, rank) with
        # one scale per rank component (ecm_granularity "rank").
        self.dynamic_scale: torch.Tensor | float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, ..., in_features)
        result = self.base_layer(x)
        dynamic_scale = self.dynamic_scale
        if dynamic_scale is None:
            raise RuntimeError(
                "EC-LoRA layer called without a dynamic scale: run the model inside "
                "ec_lora_t.conditioning.engagement_conditioning(...)"
            )
        if isinstance(dynamic_scale, float) and dynamic_scale == 0.0:
            return result  # adapter switched off: exactly the base layer, no LoRA compute
        lora_input = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)
        hidden = self.lora_A(lora_input)  # (batch, ..., r)
        # Scaling the rank-r hidden state equals scaling B A x (B is linear) and touches r
        # instead of out_features values per token.
        if isinstance(dynamic_scale, torch.Tensor):
            if dynamic_scale.shape not in ((x.shape[0],), (x.shape[0], self.rank)):
                raise RuntimeError(
                    f"EC-LoRA layer got {tuple(dynamic_scale.shape)} dynamic scales for an input "
                    f"with batch size {x.shape[0]} (expected ({x.shape[0]},) or ({x.shape[0]}, {self.rank}))"
                )
            scale = (dynamic_scale * self.static_scale).to(hidden.dtype)
            # (batch,) -> (batch, 1, ..., 1); (batch, r) -> (batch, 1, ..., r): per component
            components = self.rank if dynamic_scale.ndim == 2 else 1
            hidden = hidden * scale.view(x.shape[0], *([1] * (hidden.ndim - 2)), components)
        else:
            hidden = hidden * (dynamic_scale * self.static_scale)
        return result + self.lora_B(hidden).to(result.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, static_scale={self.static_scale:g}, ecm_index={self.ecm_index}"


def _is_target(module_name: str, target_modules: tuple[str, ...]) -> bool:
    return any(module_name == target or module_name.endswith("." + target) for target in target_modules)


def inject_ec_lora(model: nn.Module, config: ECLoRAConfig) -> dict[str, ECLoRALinear]:
    """Freeze `model` and replace its target `nn.Linear` layers with `ECLoRALinear` in place.

    Returns the injected layers by module name in `named_modules()` order, which is also
    their ECM output index. `config.layer_names` is set to that order; if it was already
    set (loading a saved adapter), the model must produce exactly the same names.
    Trainability is decided here and only here: the base model is frozen, A and B train.
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
    layers: dict[str, ECLoRALinear] = {}
    for ecm_index, name in enumerate(target_names):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = ECLoRALinear(getattr(parent, child_name), config.rank, config.alpha, ecm_index)
        setattr(parent, child_name, layer)
        layers[name] = layer
    config.layer_names = tuple(target_names)
    return layers


def ec_lora_layers(model: nn.Module) -> dict[str, ECLoRALinear]:
    """The EC-LoRA layers of a model by module name, in ECM index order."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, ECLoRALinear)}
    return dict(sorted(layers.items(), key=lambda item: item[1].ecm_index))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in ec_lora_layers(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA matrices only, keys `<module name>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in ec_lora_layers(model).items():
        state[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy LoRA matrices into the model's EC-LoRA layers; every key must match exactly."""
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: missing LoRA keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    with torch.no_grad():
        for key, target in expected.items():
            if state[key].shape != target.shape:
                raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {tuple(target.shape)}")
            target.copy_(state[key])


def build_ecm(config: ECLoRAConfig, device: torch.device | str | None = None) -> EngagementConditioningModule:
    """An ECM with one output per injected layer (`config.layer_names` must be filled)."""
    if not config.layer_names:
        raise ValueError("config.layer_names is empty: inject the EC-LoRA layers before building the ECM")
    return EngagementConditioningModule(
        num_layers=len(config.layer_names), hidden_size=config.ecm_hidden_size, depth=config.ecm_depth,
        scales_per_layer=config.scales_per_layer,
    ).to(device)


def save_adapter(
    adapter_dir: str | Path, model: nn.Module, ecm: EngagementConditioningModule, config: ECLoRAConfig
) -> Path:
    """Write the adapter folder (LoRA matrices, ECM, config); safetensors only."""
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    lora_state = {k: v.to(torch.float32).contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(lora_state, adapter_dir / ADAPTER_WEIGHTS_NAME, metadata={"format": ADAPTER_FORMAT})
    ecm_state = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in ecm.state_dict().items()}
    save_file(ecm_state, adapter_dir / ECM_WEIGHTS_NAME, metadata={"format": ADAPTER_FORMAT})
    (adapter_dir / ADAPTER_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return adapter_dir


def _require_file(path: Path) -> Path:
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
    """Config, LoRA state and ECM state of a saved adapter, without a model."""
    adapter_dir = Path(adapter_dir)
    config = load_adapter_config(adapter_dir)
    lora_state = load_file(_require_file(adapter_dir / ADAPTER_WEIGHTS_NAME))
    ecm_state = load_file(_require_file(adapter_dir / ECM_WEIGHTS_NAME))
    return config, lora_state, ecm_state


def load_ecm(config: ECLoRAConfig, ecm_state: dict[str, torch.Tensor], source: str) -> EngagementConditioningModule:
    ecm = build_ecm(config)
    try:
        ecm.load_state_dict(ecm_state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{source}: ECM weights do not fit the config ({error})") from error
    return ecm


def load_adapter(adapter_dir: str | Path, model: nn.Module) -> tuple[ECLoRAConfig, EngagementConditioningModule]:
    """Inject the saved adapter into a fresh `model` and return its config and ECM (fp32, on CPU)."""
    adapter_dir = Path(adapter_dir)
    config, lora_state, ecm_state = load_adapter_weights(adapter_dir)
    inject_ec_lora(model, config)
    load_lora_state_dict(model, lora_state, source=str(adapter_dir / ADAPTER_WEIGHTS_NAME))
    ecm = load_ecm(config, ecm_state, source=str(adapter_dir / ECM_WEIGHTS_NAME))
    return config, ecm


"""What an EC-LoRA adapter is: rank, static scale, target layers and the ECM's shape (report 3.1.3, 4.3.1).

An adapter on disk is a folder with three files:
    ec_lora.safetensors   LoRA matrices, keys `<module name>.lora_A.weight` / `.lora_B.weight`
    ecm.safetensors       ECM weights (`ec_lora_t.adapter.ecm.EngagementConditioningModule`)
    adapter_config.json   `ECLoRAConfig` plus the ordered layer names (the ECM output order)
and, when `text_encoder_rank` > 0, a fourth:
    text_encoder_lora.safetensors   the text encoder's static LoRA, keys `<module name>.lora_A.weight` / ...
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Any, Literal, get_args

import numpy as np
from annotated_types import Ge, Gt, MinLen

from ec_lora_t.constraints import check_constraints

ADAPTER_WEIGHTS_NAME = "ec_lora.safetensors"
ECM_WEIGHTS_NAME = "ecm.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_FORMAT = "ec-lora-t/1"
TEXT_ENCODER_WEIGHTS_NAME = "text_encoder_lora.safetensors"

# The report's targets (3.1.3): attention projections and the feed-forward layers of every
# transformer block in the UNet.
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
EcmGranularity = Literal["layer", "rank"]
ECM_GRANULARITIES = get_args(EcmGranularity)
EcmInput = Literal["unit", "centered", "standardized"]
ECM_INPUTS = get_args(EcmInput)
# Filled when the adapter is built or trained, not chosen: every other field is a setting
# (params.yaml's `train` section names them, stages/params/train.py).
INJECTED_FIELDS = ("time_embedding_dim", "layer_names", "ecm_input_mean", "ecm_input_std")
# The smallest standard deviation `standardized` divides by. A min-max normalised feed has a post
# at 0 and one at 1; when nearly all the others sit together (one viral post among many quiet
# ones) the std is tiny and the sweep's ends would reach the ECM as tens of standard deviations.
MIN_ECM_INPUT_STD = 0.1


@dataclass
class ECLoRAConfig:
    """What an EC-LoRA adapter is: rank, static scale, which layers, and the ECM's shape."""

    rank: Annotated[int, Ge(1)] = 16
    alpha: Annotated[float, Gt(0)] = 64.0  # the static scale is alpha / rank
    # A module is a target when its dotted name equals an entry or ends with "." + entry
    # (peft's rule for a list of names), e.g. "to_out.0" matches "...attn1.to_out.0".
    target_modules: Annotated[tuple[Annotated[str, MinLen(1)], ...], MinLen(1)] = DEFAULT_TARGET_MODULES
    ecm_hidden_size: Annotated[int, Ge(1)] = 128
    ecm_depth: Annotated[int, Ge(1)] = 2
    # "layer": one ECM scale per layer (the report); "rank": one per layer and rank component.
    ecm_granularity: EcmGranularity = "layer"
    # What the ECM's first layer reads: "unit", the vector as it is, in [0, 1] (the report's);
    # "centered", 2 e - 1, in [-1, 1]; "standardized", (e - mean) / std with the training set's
    # statistics (`ec_lora_t.adapter.ecm`). Older adapters have no key: unit.
    ecm_input: EcmInput = "unit"
    # Filled by `with_ecm_input_statistics` when training starts (standardized only): the training
    # set's per-component mean and standard deviation, kept so that sampling reads what training read.
    ecm_input_mean: tuple[float, float] | None = None
    ecm_input_std: tuple[float, float] | None = None
    # Also feed the vector to the UNet's timestep embedding: an ECM head makes a per-row offset
    # (`ec_lora_t.adapter.layer.VectorTimeEmbedding`). False is the report's method.
    vector_embedding: bool = False
    # A static LoRA (no ECM scale: the vector modulates only the UNet) on the CLIP text
    # encoder's attention projections (q_proj, k_proj, v_proj, out_proj), trained with the
    # UNet's. 0: off, the text embeddings come from the latent cache (the report's setup).
    text_encoder_rank: Annotated[int, Ge(0)] = 0
    # Its static scale is text_encoder_alpha / text_encoder_rank; None: alpha = rank, scale 1,
    # what diffusers' DreamBooth LoRA script gives its text encoder.
    text_encoder_alpha: Annotated[float, Gt(0)] | None = None
    # Filled by `inject_vector_embedding`: the width of the timestep embedding the offset is added to.
    time_embedding_dim: int = 0
    # Filled by `inject_ec_lora`: the injected module names in ECM output order.
    layer_names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        self.layer_names = tuple(self.layer_names)
        for name in ("ecm_input_mean", "ecm_input_std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) != 2 or not all(math.isfinite(v) for v in value):
                    raise ValueError(f"{name} = {value}: needs 2 finite numbers (engagement, time)")
                setattr(self, name, value)
        check_constraints(self)  # the ranges in the annotations above
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"target_modules = {list(self.target_modules)!r}: must not repeat a module name")

    def ecm_input_affine(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(shift, scale): the ECM's first layer reads (e - shift) / scale."""
        if self.ecm_input == "centered":
            return (0.5, 0.5), (0.5, 0.5)
        if self.ecm_input == "standardized":
            if self.ecm_input_mean is None or self.ecm_input_std is None:
                raise ValueError("ecm_input is standardized but ecm_input_mean / ecm_input_std are not set: "
                                 "fill them from the training set with `with_ecm_input_statistics`")
            return self.ecm_input_mean, tuple(max(std, MIN_ECM_INPUT_STD) for std in self.ecm_input_std)
        return (0.0, 0.0), (1.0, 1.0)

    @property
    def static_scale(self) -> float:
        return self.alpha / self.rank

    @property
    def text_encoder_scale(self) -> float:
        alpha = self.text_encoder_rank if self.text_encoder_alpha is None else self.text_encoder_alpha
        return alpha / self.text_encoder_rank

    @property
    def scales_per_layer(self) -> int:
        return self.rank if self.ecm_granularity == "rank" else 1

    def to_dict(self) -> dict[str, Any]:
        config = asdict(self)
        for name in ("ecm_input_mean", "ecm_input_std"):
            config[name] = list(config[name]) if config[name] is not None else None
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


def with_ecm_input_statistics(config: ECLoRAConfig, engagement_time: Any) -> ECLoRAConfig:
    """`config` with `ecm_input_mean` / `ecm_input_std` set from the training set's (N, 2)
    engagement-time vectors when its ECM input is standardized; otherwise `config` itself.

    Population statistics (ddof 0), of the set as the cache holds it: every post once, before any
    engagement balancing of the sampler, so the same feed always gives the same adapter input.
    """
    if config.ecm_input != "standardized":
        return config
    vectors = np.asarray(engagement_time, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[1] != 2 or len(vectors) == 0:
        raise ValueError(f"engagement_time must have shape (N >= 1, 2), got {vectors.shape}")
    return replace(config, ecm_input_mean=tuple(vectors.mean(axis=0).tolist()),
                   ecm_input_std=tuple(vectors.std(axis=0).tolist()))

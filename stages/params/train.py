"""Schema of params.yaml section `train`: the adapter and its training run (`stages/train.py`).

Built, not declared: the keys, types, ranges and defaults are the fields of the library's
`ec_lora_t.adapter.config.ECLoRAConfig` (the adapter; `rank` and `alpha` take a `lora_` prefix
here, `text_encoder_rank` and `text_encoder_alpha` become `text_encoder_lora_rank` / `_alpha`) and `ec_lora_t.training.config.TrainingConfig` (the run), whose comments document them.
The one key of the stage's own is `launcher`. A key left out of params.yaml takes the library's
default; a value the library refuses is refused here, before any stage runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Annotated, Any, Union

from pydantic import Field, create_model, model_validator

from ec_lora_t.adapter.config import INJECTED_FIELDS, ECLoRAConfig
from ec_lora_t.training.config import TrainingConfig
from stages._common import Float, Int, Section

# ECLoRAConfig field -> params key (the others keep their name).
LORA_PREFIXED = {"rank": "lora_rank", "alpha": "lora_alpha", "text_encoder_rank": "text_encoder_lora_rank",
                 "text_encoder_alpha": "text_encoder_lora_alpha"}


def params_type(annotation: Any) -> Any:
    """A library field's annotation for params: numbers as the params' `Int` / `Float` (lax, never
    a boolean), `tuple[X, ...]` as `list[X]`, everything else (bounds, choices, `| None`) as it is."""
    if annotation is int:
        return Int
    if annotation is float:
        return Float
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return Annotated[(params_type(args[0]), *args[1:])]
    if origin in (Union, types.UnionType):
        return Union[tuple(params_type(arm) for arm in args)]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        # YAML has lists; a list also reports an empty item once (pydantic's tuple adds a
        # second, wrong "too short" error); the config turns it into its tuple.
        return list[params_type(args[0])]
    return annotation


def schema_fields(config: type, rename: dict[str, str] | None = None, exclude=()) -> dict[str, tuple[Any, Any]]:
    """`create_model` fields from a config dataclass: params key -> (type, default)."""
    rename = rename or {}
    hints = typing.get_type_hints(config, include_extras=True)
    fields = {}
    for field in dataclasses.fields(config):
        if field.name in exclude:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if isinstance(default, tuple):  # as params_type reads the tuple: a list
            default = list(default)
        fields[rename.get(field.name, field.name)] = (params_type(hints[field.name]), default)
    return fields


class _TrainSection(Section):
    @model_validator(mode="after")
    def _the_library_accepts_it(self) -> _TrainSection:
        # Rules beyond one field's range (no module named twice) live in the configs'
        # __post_init__; building them here reports a refusal before any stage runs.
        configs_from_params(self)
        return self


TrainParams = create_model(
    "TrainParams",
    __base__=_TrainSection,
    __module__=__name__,
    **schema_fields(ECLoRAConfig, LORA_PREFIXED, exclude=INJECTED_FIELDS),
    **schema_fields(TrainingConfig),
    # How the stage is started (dvc.yaml's cmd is `${train.launcher} -m stages.train ...`): `python`
    # for one process; a distributed launcher for several GPUs, e.g. `python -m
    # accelerate.commands.launch --multi_gpu --num_processes 2`. The number of processes is part
    # of the run's fingerprint; the launcher's words are not.
    launcher=(Annotated[str, Field(min_length=1)], "python"),
)
TrainParams.__doc__ = "The `train` section: ECLoRAConfig's and TrainingConfig's settings, and the launcher."
STAGE_KEYS = {"launcher"}


def configs_from_params(params) -> tuple[ECLoRAConfig, TrainingConfig]:
    """Split the checked `train` section into the adapter's config and the loop's config."""
    values = params.model_dump(exclude=STAGE_KEYS)
    lora_keys = {LORA_PREFIXED.get(f.name, f.name): f.name for f in dataclasses.fields(ECLoRAConfig)
                 if f.name not in INJECTED_FIELDS}
    lora_config = ECLoRAConfig(**{field: values.pop(key) for key, field in lora_keys.items()})
    return lora_config, TrainingConfig(**values)

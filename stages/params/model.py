"""Schema of params.yaml section `model`: the base model (latents, train and evaluate stages)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, ValidationInfo, field_validator

from stages._common import Int, Section
from stages.params._paths import check_local_reference


class ModelParams(Section):
    # A hub id, or a local folder in diffusers layout; see `ec_lora_t.hub` for which is which.
    pretrained: Annotated[str, Field(min_length=1)]
    # px; the VAE of Stable Diffusion downsamples by 8.
    resolution: Annotated[Int, Field(ge=8, multiple_of=8)]

    @field_validator("pretrained")
    @classmethod
    def _local_folder_exists(cls, value: str, info: ValidationInfo) -> str:
        # Only the spelling and, for a local path, its existence: no network here.
        check_local_reference(value, info)
        return value

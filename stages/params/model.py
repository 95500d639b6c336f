"""Schema of params.yaml section `model`: the base model (latents, train and evaluate stages)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from stages._common import Int, Section
from stages.params._paths import ModelReference


class ModelParams(Section):
    # A hub id, or a local folder in diffusers layout; see `ec_lora_t.hub` for which is which.
    pretrained: ModelReference
    # px; the VAE of Stable Diffusion downsamples by 8.
    resolution: Annotated[Int, Field(ge=8, multiple_of=8)]

"""Schema of params.yaml section `latents`: the latent and text-embedding cache (`stages/latents.py`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from stages._common import Int, Section


class LatentsParams(Section):
    batch_size: Annotated[Int, Field(ge=1)]
    shard_size: Annotated[Int, Field(ge=1)] = 256  # images per latent shard file

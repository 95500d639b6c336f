"""Schema of params.yaml section `features`: engagement and time features (`stages/features.py`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from stages._common import Float, Section


class FeaturesParams(Section):
    comment_weight: Annotated[Float, Field(ge=0)]  # total_engagement = likes + comment_weight * comments
    # ec_lora_t.data.features.NORMALIZATIONS
    normalization: Literal["minmax", "log_minmax", "rank", "detrended"]

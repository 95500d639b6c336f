"""Schema of params.yaml section `sentiment`: comment sentiment as a signal (`stages/sentiment.py`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, ValidationInfo, field_validator

from stages._common import Int, Section
from stages.params._paths import check_local_reference


class SentimentParams(Section):
    # A transformers text-classification model (hub id or local folder) whose labels name a
    # positive and a negative class; null: off (no model is loaded, the hub is never asked).
    model: str | None = None
    batch_size: Annotated[Int, Field(ge=1)]
    max_length: Annotated[Int, Field(ge=1)]  # tokens per comment; longer ones are truncated

    @field_validator("model")
    @classmethod
    def _local_folder_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value:
            check_local_reference(value, info)
        return value

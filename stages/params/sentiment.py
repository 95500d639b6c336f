"""Schema of params.yaml section `sentiment`: comment sentiment as a signal (`stages/sentiment.py`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from stages._common import Int, Section
from stages.params._paths import ModelReference


class SentimentParams(Section):
    # A transformers text-classification model (hub id or local folder) whose labels name a
    # positive and a negative class; null: off (no model is loaded, the hub is never asked).
    model: ModelReference | None = None
    batch_size: Annotated[Int, Field(ge=1)]
    max_length: Annotated[Int, Field(ge=1)]  # tokens per comment; longer ones are truncated

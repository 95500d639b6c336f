"""Schema of params.yaml section `ingest`: reading the post export (`stages/ingest.py`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from stages._common import Int, Section


class IngestParams(Section):
    # Its existence is checked by stages/validate_params.py, not here: the default is the
    # demo_data stage's output, and the ingest stage explains a missing folder itself.
    posts_dir: Annotated[str, Field(min_length=1)]
    # ec_lora_t.data.ingest.FORMATS and VIDEO_MODES (tests/test_params.py keeps them equal).
    format: Literal["auto", "report", "instaloader"] = "auto"
    videos: Literal["thumbnail", "skip"] = "thumbnail"
    max_image_pixels: Annotated[Int, Field(ge=1)]
    # A business account's insights export (CSV or Parquet) joined by shortcode / post id /
    # permalink: saves, shares, reach, views... as signals for features.signals. null: none.
    # Checked by the ingest stage (like posts_dir, it may be a file a stage writes).
    insights: Annotated[str, Field(min_length=1)] | None = None

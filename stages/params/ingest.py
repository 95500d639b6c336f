"""Schema of params.yaml section `ingest`: reading the post export (`stages/ingest.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from stages._common import Int, Section
from stages.params._paths import params_root


class IngestParams(Section):
    # Must exist, unless a stage of the pipeline writes it (the default, data/demo_posts, is
    # the demo_data stage's output): otherwise DVC deletes ingest's outputs, then says it is missing.
    posts_dir: Annotated[str, Field(min_length=1)]
    # ec_lora_t.data.ingest.FORMATS and VIDEO_MODES (tests/test_params.py keeps them equal).
    format: Literal["auto", "report", "instaloader"] = "auto"
    videos: Literal["thumbnail", "skip"] = "thumbnail"
    max_image_pixels: Annotated[Int, Field(ge=1)]

    @field_validator("posts_dir")
    @classmethod
    def _folder_exists(cls, value: str, info: ValidationInfo) -> str:
        folder = params_root(info) / Path(value).expanduser()
        produced = (info.context or {}).get("pipeline_outputs", ())
        if not folder.is_dir() and Path(value).as_posix().rstrip("/") not in produced:
            raise ValueError(f"no such folder ({folder})")
        return value

"""Schema of params.yaml section `caption`: captions with style and season tags (`stages/caption.py`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from stages._common import Int, Section
from stages.params._paths import ModelReference


class CaptionParams(Section):
    # ec_lora_t.data.captioning.CAPTION_SOURCES, MISSING_TEXT_CHOICES; seasons.HEMISPHERES.
    source: Literal["blip", "post_text"]
    # What a post without usable text gets under source post_text: its generic caption
    # "(<style> style) (<season>)", nothing (left out and reported), or a BLIP caption.
    missing_text: Literal["generic", "skip", "blip"] = "generic"
    model: ModelReference | None = None  # BLIP: hub id or local folder; needed by source or missing_text blip
    style_tag: Annotated[str, Field(min_length=1, pattern=r"\S")]
    hemisphere: Literal["north", "south"] = "north"
    batch_size: Annotated[Int, Field(ge=1)]
    max_new_tokens: Annotated[Int, Field(ge=1)]

    @model_validator(mode="after")
    def _blip_needs_a_model(self) -> CaptionParams:
        if "blip" in (self.source, self.missing_text) and not self.model:
            raise ValueError(
                f"source {self.source!r} with missing_text {self.missing_text!r} captions with BLIP: "
                "set caption.model to a hub id or a local folder"
            )
        return self

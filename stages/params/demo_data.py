"""Schema of params.yaml section `demo_data`: the synthetic creator feed (`stages/demo_data.py`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from stages._common import Int, Section


class DemoDataParams(Section):
    num_posts: Annotated[Int, Field(ge=1)]
    image_size: Annotated[Int, Field(ge=8)]  # px, square
    seed: Annotated[Int, Field(ge=0)]
    # whose taste the likes follow: ec_lora_t.demo.world.AUDIENCES
    audience: Literal["vivid_bright", "caps", "cool_outfits", "light_outfits", "beach", "caps_in_daylight"] = "vivid_bright"

"""Schema of params.yaml section `demo_data`: the synthetic creator feed (`stages/demo_data.py`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from stages._common import Int, Section


# The demo world's audiences (ec_lora_t.demo.world.AUDIENCES; a test checks they agree).
AudienceName = Literal["vivid_bright", "caps", "cool_outfits", "light_outfits", "beach", "caps_in_daylight"]


class DemoDataParams(Section):
    num_posts: Annotated[Int, Field(ge=1)]
    image_size: Annotated[Int, Field(ge=8)]  # px, square
    seed: Annotated[Int, Field(ge=0)]
    # whose taste the likes (and comments) follow: ec_lora_t.demo.world.AUDIENCES
    audience: AudienceName = "vivid_bright"
    # whose taste the insights export's saves and shares follow (ec_lora_t.demo.demo_data)
    saves_audience: AudienceName = "caps"
    shares_audience: AudienceName = "beach"

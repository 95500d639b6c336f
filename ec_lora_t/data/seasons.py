"""The season of a post (report 3.3.2): the caption's season tag, from the post's UTC month."""

from __future__ import annotations

from typing import Any

import pandas as pd

HEMISPHERES = ("north", "south")
# Report 3.3.2, Northern Hemisphere: Dec-Feb winter, Mar-May spring, Jun-Aug summer,
# Sep-Nov fall. The Southern Hemisphere has the opposite season in the same month.
_NORTH_SEASON_BY_MONTH = {
    12: "winter", 1: "winter", 2: "winter",
    3: "spring", 4: "spring", 5: "spring",
    6: "summer", 7: "summer", 8: "summer",
    9: "fall", 10: "fall", 11: "fall",
}
_OPPOSITE_SEASON = {"winter": "summer", "summer": "winter", "spring": "fall", "fall": "spring"}


def season_of(timestamp: Any, hemisphere: str = "north") -> str:
    """Season of a post time (UTC month): ``winter``, ``spring``, ``summer`` or ``fall``."""
    if hemisphere not in HEMISPHERES:
        raise ValueError(f"hemisphere must be one of {HEMISPHERES}, got {hemisphere!r}")
    moment = pd.Timestamp(timestamp)
    if moment.tzinfo is not None:
        moment = moment.tz_convert("UTC")
    season = _NORTH_SEASON_BY_MONTH[moment.month]
    return season if hemisphere == "north" else _OPPOSITE_SEASON[season]

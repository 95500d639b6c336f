"""Field parsers: the one place that decides what a count, a post time or a post text may look like.

Every reader of post metadata (report CSVs, instaloader JSON, the CLI's raw --likes/--date)
goes through these, so a value is accepted or rejected the same way everywhere. A value that
cannot be used raises :class:`InvalidPostData` with a reason code of the rejects table
(`ec_lora_t.data.ingest.REJECT_REASONS`) and a message that says what was wrong.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

EARLIEST_TIMESTAMP = pd.Timestamp("1970-01-01", tz="UTC")
LATEST_TIMESTAMP = pd.Timestamp("2100-01-01", tz="UTC")
# An epoch number is read in the first of these units that puts it before 2100: exports
# write seconds, JavaScript-made ones milliseconds. Only millisecond times before
# 1970-02-17 would be misread (as seconds), and no post is that old.
_EPOCH_UNITS = (("s", 1.0), ("ms", 1e3), ("us", 1e6), ("ns", 1e9))


class InvalidPostData(ValueError):
    """One field of one post cannot be used; ``reason`` is a code from REJECT_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason



def parse_count(value: Any, field_name: str = "count") -> int:
    """Parse a likes/comments count: a non-negative integer, possibly written as text.

    Accepted: ints, integral floats (``120.0``, as spreadsheets write them), digit strings
    with optional thousands commas (``"12,345"``). Rejected with ``invalid_count``:
    missing, negative, fractional, non-finite, booleans and anything else.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InvalidPostData("invalid_count", f"{field_name} is missing")
    if isinstance(value, (bool, np.bool_)):
        raise InvalidPostData("invalid_count", f"{field_name} is a boolean ({value!r})")
    if isinstance(value, (int, np.integer)):
        number = int(value)
    elif isinstance(value, (float, np.floating)):
        if math.isnan(value):
            # pandas and spreadsheets write an empty cell as NaN.
            raise InvalidPostData("invalid_count", f"{field_name} is missing (NaN)")
        if not math.isfinite(value) or value != math.floor(value):
            raise InvalidPostData("invalid_count", f"{field_name} is not a whole number ({value!r})")
        number = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-\s*[\d,.]+", text):
            raise InvalidPostData("invalid_count", f"{field_name} is negative ({value!r})")
        if re.fullmatch(r"\d{1,3}(,\d{3})+", text):
            text = text.replace(",", "")
        if re.fullmatch(r"\d+(\.0*)?", text):
            number = int(text.split(".")[0])
        elif re.fullmatch(r"\d*\.\d+", text):
            raise InvalidPostData("invalid_count", f"{field_name} is not a whole number ({value!r})")
        else:
            raise InvalidPostData("invalid_count", f"{field_name} is not a number ({value!r})")
    else:
        raise InvalidPostData("invalid_count", f"{field_name} is not a number ({value!r})")
    if number < 0:
        raise InvalidPostData("invalid_count", f"{field_name} is negative ({value!r})")
    if number >= 2**63:
        raise InvalidPostData("invalid_count", f"{field_name} is too large ({value!r})")
    return number


def parse_signal_value(value: Any, field_name: str = "value") -> float | None:
    """Parse one cell of an insights table: a non-negative finite number, or None when empty.

    Accepted: numbers, and text such as ``"1,234"``, ``"1 234"`` or ``"12.5"``. Rejected with
    ``invalid_count``: negative, non-finite, booleans and any other text (``"n/a"``, ``"--"``).
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (bool, np.bool_)):
        raise InvalidPostData("invalid_count", f"{field_name} is a boolean ({value!r})")
    if isinstance(value, (int, np.integer, float, np.floating)):
        if isinstance(value, (float, np.floating)) and math.isnan(value):
            return None  # pandas and parquet write an empty cell as NaN
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d{1,3}([, \u00a0\u202f]\d{3})+(\.\d+)?", text):
            text = re.sub(r"[, \u00a0\u202f]", "", text)
        if not re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", text):
            raise InvalidPostData("invalid_count", f"{field_name} is not a number ({value!r})")
        number = float(text)
    else:
        raise InvalidPostData("invalid_count", f"{field_name} is not a number ({value!r})")
    if not math.isfinite(number):
        raise InvalidPostData("invalid_count", f"{field_name} is not finite ({value!r})")
    if number < 0:
        raise InvalidPostData("invalid_count", f"{field_name} is negative ({value!r})")
    return number


def parse_timestamp(value: Any, field_name: str = "timestamp") -> pd.Timestamp:
    """Parse a post time into a tz-aware UTC ``pd.Timestamp`` (microsecond precision).

    Accepted: epoch numbers (or digit strings) in seconds, milliseconds, microseconds or
    nanoseconds, told apart by magnitude; ISO 8601 strings (``2024-05-01``,
    ``2024-05-01T12:00:00Z``, ``2024-05-01 12:00:00+02:00``, ``... UTC``), where a time
    without a zone is taken as UTC; ``datetime``/``date``/``pd.Timestamp`` objects.
    Rejected with ``invalid_timestamp``: missing, unparseable, before 1970 or after 2100.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InvalidPostData("invalid_timestamp", f"{field_name} is missing")
    if isinstance(value, (bool, np.bool_)):
        raise InvalidPostData("invalid_timestamp", f"{field_name} is a boolean ({value!r})")
    epoch: float | None = None
    if isinstance(value, (int, float, np.integer, np.floating)):
        epoch = float(value)
    elif isinstance(value, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?", value.strip()):
        epoch = float(value.strip())
    if epoch is not None:
        if not math.isfinite(epoch):
            raise InvalidPostData("invalid_timestamp", f"{field_name} is not finite ({value!r})")
        if epoch < 0:
            raise InvalidPostData("invalid_timestamp", f"{field_name} is before 1970 ({value!r})")
        latest = LATEST_TIMESTAMP.timestamp()
        unit = next((unit for unit, per_second in _EPOCH_UNITS if epoch / per_second < latest), None)
        if unit is None:
            raise InvalidPostData("invalid_timestamp", f"{field_name} {value!r} is after 2100 in any unit")
        exact = int(value) if isinstance(value, (int, np.integer)) else epoch
        timestamp = pd.Timestamp(exact, unit=unit, tz="UTC")
    elif isinstance(value, str):
        timestamp = _parse_iso_timestamp(value, field_name)
    elif isinstance(value, (datetime, pd.Timestamp)) or hasattr(value, "isoformat"):
        try:
            timestamp = pd.Timestamp(value)
        except (TypeError, ValueError) as error:
            raise InvalidPostData("invalid_timestamp", f"{field_name} {value!r}: {error}") from None
        timestamp = timestamp.tz_localize("UTC") if timestamp.tzinfo is None else timestamp.tz_convert("UTC")
    else:
        raise InvalidPostData("invalid_timestamp", f"{field_name} is not a time ({value!r})")
    if not EARLIEST_TIMESTAMP <= timestamp < LATEST_TIMESTAMP:
        raise InvalidPostData(
            "invalid_timestamp", f"{field_name} {value!r} is {timestamp}, outside 1970..2100"
        )
    return timestamp.floor("us")


def _parse_iso_timestamp(value: str, field_name: str) -> pd.Timestamp:
    text = value.strip()
    # datetime.fromisoformat before Python 3.11 reads neither "Z" nor a " UTC" suffix.
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    elif text.upper().endswith(" UTC"):
        text = text[:-4] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidPostData(
            "invalid_timestamp", f"{field_name} {value!r} is neither an epoch number nor ISO 8601"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return pd.Timestamp(parsed).tz_convert("UTC")


def clean_text(value: Any) -> str | None:
    """A post's text as a stripped string, or None when there is none."""
    # None, NaN and pd.NA: how pandas and parquet spell a missing text.
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return None
    text = str(value).strip()
    return text or None

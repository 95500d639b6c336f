"""Engagement from named signals, and the posts it cannot be computed for (report 3.4).

A signal is one number per post: the export's likes and comments, a business export's saves,
shares, reach or views (``ingest.insights``), the comment sentiment (the sentiment stage). The
signals table holds them long (shortcode, signal, value, source); :func:`signal_columns` turns
the ones an engagement needs into one column each. The engagement is a weighted sum of them,
optionally per a denominator (an engagement rate, :data:`DENOMINATORS`). A post that lacks a
needed signal, or whose denominator is 0, is left out and reported with the reason
(:data:`LEFT_OUT_REASONS`, ``left_out.parquet``), never counted as 0.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from ec_lora_t.data.schemas import LEFT_OUT_SCHEMA

DEFAULT_COMMENT_WEIGHT = 3.0
# The report's formula (3.4.1): likes + 3 x comments.
DEFAULT_SIGNAL_WEIGHTS = {"likes": 1.0, "comments": DEFAULT_COMMENT_WEIGHT}
# Signals an engagement rate may be taken per (interactions per account reached / per view).
DENOMINATORS = ("reach", "impressions", "views")
# Why a post is left out of the features table (the `left_out.parquet` reasons).
LEFT_OUT_REASONS = ("missing_signal", "zero_denominator")
# Signals that may be negative: a sentiment score is in [-1, 1]; counts never are.
SIGNED_SIGNALS = ("sentiment",)


def total_engagement(likes: Any, comments: Any, comment_weight: float = DEFAULT_COMMENT_WEIGHT) -> np.ndarray:
    """``likes + comment_weight * comments`` (report 3.4.1), float64."""
    return weighted_engagement({"likes": likes, "comments": comments}, {"likes": 1.0, "comments": comment_weight})


def weighted_engagement(signals: Mapping[str, Any], weights: Mapping[str, float], per: str | None = None) -> np.ndarray:
    """``sum(weight * signal) [/ signals[per]]``, float64, summed in the order of `weights`.

    The report's ``likes + 3 * comments`` comes out bit for bit as before: ``0 + 1.0 * likes``
    is ``likes``, then ``+ 3.0 * comments``. Counts must be non-negative (a sentiment score
    may be negative); a denominator must be positive (the caller leaves out posts whose is 0).
    """
    missing = [name for name in [*weights, *([per] if per else [])] if name not in signals]
    if missing:
        raise ValueError(f"the engagement {describe_engagement(weights, per)} needs signal(s) {missing}")
    total: Any = 0.0
    for name, weight in weights.items():
        values = np.asarray(signals[name], dtype=np.float64)
        if name not in SIGNED_SIGNALS and np.any(values < 0):
            raise ValueError(f"{name} must be non-negative")
        total = total + float(weight) * values
    total = np.asarray(total, dtype=np.float64)
    if per is not None:
        denominator = np.asarray(signals[per], dtype=np.float64)
        if np.any(~(denominator > 0)):
            raise ValueError(f"{per} must be positive to divide by it")
        total = total / denominator
    return total


def describe_engagement(weights: Mapping[str, float], per: str | None = None) -> str:
    """The formula as text: ``likes + 3 x comments``, ``(likes + saves) / reach``."""
    terms = " + ".join(name if float(w) == 1 else f"{float(w):g} x {name}" for name, w in weights.items())
    if per is None:
        return terms
    return f"({terms}) / {per}" if len(weights) > 1 or "x" in terms else f"{terms} / {per}"


def signals_from_posts(posts: pd.DataFrame) -> pd.DataFrame:
    """The export's likes and comments as a signals table (SIGNALS_SCHEMA), one row per post and signal."""
    per_post = posts.drop_duplicates("shortcode")
    frames = [
        pd.DataFrame({"shortcode": per_post["shortcode"], "signal": name,
                      "value": per_post[column].astype(np.float64), "source": "posts table"})
        for name, column in (("likes", "likes_count"), ("comments", "comments_count"))
    ]
    return pd.concat(frames, ignore_index=True)


def signal_columns(signals: pd.DataFrame, shortcodes: Sequence[str], names: Sequence[str]) -> pd.DataFrame:
    """Wide table: one row per shortcode (in the given order), one float64 column per name (NaN: absent).

    Raises when a name is in no post at all (a misspelt signal is a params error, not
    thousands of missing values) or when one post has a signal twice (from two sources).
    """
    missing = [c for c in ("shortcode", "signal", "value") if c not in signals]
    if missing:
        raise ValueError(f"signals table lacks column(s) {missing}")
    duplicated = signals[signals.duplicated(["shortcode", "signal"], keep=False)]
    if not duplicated.empty:
        first = duplicated.iloc[0]
        sources = duplicated.loc[(duplicated["shortcode"] == first["shortcode"]) & (duplicated["signal"] == first["signal"]),
                                 "source"] if "source" in duplicated else []
        raise ValueError(f"post {first['shortcode']} has signal {first['signal']!r} more than once "
                         f"(from {', '.join(map(str, sources))})")
    found = sorted(set(signals["signal"]))
    unknown = [name for name in names if name not in found]
    if unknown:
        raise ValueError(f"signal(s) {unknown} are in no post; the signals found are {found} "
                         "(ingest.insights adds a business export's, the sentiment stage adds sentiment)")
    wide = signals[signals["signal"].isin(list(names))].pivot(index="shortcode", columns="signal", values="value")
    return wide.reindex(index=list(shortcodes), columns=list(names)).astype(np.float64)


def posts_left_out(values: pd.DataFrame, needed: Sequence[str], per: str | None) -> list[tuple[str, str, str]]:
    """(shortcode, reason, detail) for each post of `values` (:func:`signal_columns`) that lacks
    a needed signal or whose denominator `per` is 0, in the order of `values`."""
    left_out = []
    for shortcode, row in values.iterrows():
        absent = [name for name in needed if np.isnan(row[name])]
        if absent:
            left_out.append((shortcode, "missing_signal", f"no {', '.join(absent)} for this post"))
        elif per is not None and row[per] == 0:
            left_out.append((shortcode, "zero_denominator", f"{per} is 0: no engagement rate"))
    return left_out


def count_left_out(left_out: Sequence[tuple[str, str, str]]) -> dict[str, int]:
    """How many posts were left out for each of :data:`LEFT_OUT_REASONS` (0 included)."""
    return {reason: sum(1 for _, r, _ in left_out if r == reason) for reason in LEFT_OUT_REASONS}


def left_out_table(left_out: Sequence[tuple[str, str, str]]) -> pa.Table:
    """The left-out posts as a LEFT_OUT_SCHEMA table (``left_out.parquet``)."""
    return pa.Table.from_pydict(
        {name: [row[i] for row in left_out] for i, name in enumerate(LEFT_OUT_SCHEMA.names)}, schema=LEFT_OUT_SCHEMA
    )

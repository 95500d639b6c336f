"""Engagement and time normalised into the ECM's vector (report sections 3.4 and 3.5).

The total engagement (:func:`ec_lora_t.data.signals.weighted_engagement`) is scaled to
[0, 1] by one of four normalisations:

* ``minmax``: the report's min-max scaling;
* ``log_minmax``: min-max of ``log1p(total_engagement)``, for heavy-tailed engagement where a
  few viral posts would squeeze every other post near 0;
* ``rank``: the post's mid-rank among the training posts (ties share the average rank),
  min-max scaled to [0, 1]; new values between training values are interpolated linearly;
* ``detrended``: min-max of the residual of ``log1p(total_engagement)`` after a robust
  (Theil-Sen) line in time: how well a post did *for its time*. A growing audience lifts every later post;
  the report's min-max then ties engagement to time (late posts score high whatever they show),
  so "high engagement now" asks for pictures the creator never posted at that time. The
  residual is engagement relative to the audience the creator had when posting (an
  engagement rate without a follower count).

``days_since_earliest_post`` (fractional days) is min-max scaled into ``normalized_time``.
The vector ``engagement_time = [normalized_engagement, normalized_time]`` feeds the ECM.

Statistics are fitted per post, not per image: a ten-slide carousel is one post and must not
count ten times in a rank. Degenerate data has a defined result instead of a division by
zero: when all training posts share one engagement value, or their times span less than
:data:`MIN_TIME_SPAN_DAYS`, that component is :data:`DEGENERATE_LEVEL` (0.5, the middle of
the range: "no information") for every post and every later query.

:class:`EngagementTimeNormalizer` holds the fitted statistics, is saved as JSON, and turns a
user's raw numbers into the vector::

    EngagementTimeNormalizer.from_json(path).vector(likes=5000, comments=120, date="2025-06-01")
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ec_lora_t.data.fields import parse_timestamp
from ec_lora_t.data.signals import (
    DEFAULT_COMMENT_WEIGHT,
    DEFAULT_SIGNAL_WEIGHTS,
    DENOMINATORS,
    SIGNED_SIGNALS,
    describe_engagement,
    weighted_engagement,
)

NORMALIZATIONS = ("minmax", "log_minmax", "rank", "detrended")
DEGENERATE_LEVEL = 0.5
# Posts within less than a day of each other carry no time trend worth a [0, 1] axis.
MIN_TIME_SPAN_DAYS = 1.0
SECONDS_PER_DAY = 86_400.0
# 2: the engagement's `signals` (name -> weight) and `per` replace `comment_weight`; version 1
# files (likes + comment_weight x comments) are still read.
STATS_FORMAT_VERSION = 2



def _to_utc_seconds(dates: Any) -> np.ndarray:
    """Seconds since the epoch (float64) of one date or a sequence of dates.

    Strings, numbers and datetimes are read by :func:`ec_lora_t.data.ingest.parse_timestamp`
    (naive times are UTC), so a query date means what a metadata timestamp means.
    """
    if isinstance(dates, pd.Series) and pd.api.types.is_datetime64_any_dtype(dates):
        series = dates.dt.tz_localize("UTC") if dates.dt.tz is None else dates.dt.tz_convert("UTC")
        return (series - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(dtype=np.float64)
    if isinstance(dates, (str, bytes)) or not isinstance(dates, (Sequence, np.ndarray, pd.Series, pd.Index)):
        dates = [dates]
    return np.array([parse_timestamp(date, "date").timestamp() for date in dates], dtype=np.float64)


def parse_signal_values(text: str) -> dict[str, float]:
    """A query's raw signals as typed: "saves=40, reach=3000" -> {"saves": 40.0, "reach": 3000.0}.

    Counts must be finite and non-negative (a sentiment may be negative); a name given twice,
    or a pair that is not name=number, is a ValueError naming it.
    """
    signals: dict[str, float] = {}
    for pair in text.split(","):
        name, equals, number = (part.strip() for part in pair.partition("="))
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if not equals or not name or not math.isfinite(value) or (value < 0 and name not in SIGNED_SIGNALS):
            raise ValueError(f"{pair.strip()!r} is not name=number (e.g. saves=40,reach=3000; counts >= 0)")
        if name in signals:
            raise ValueError(f"{name} is given twice in {text!r}")
        signals[name] = value
    return signals


@dataclass(frozen=True)
class VectorQuery:
    """Raw numbers turned into the `engagement_time` vector (`EngagementTimeNormalizer.query`)."""

    likes: float | None  # None: the query gave other signals only
    comments: float | None
    date: str  # ISO 8601, UTC
    total_engagement: float
    unclipped: tuple[float, float]  # the normalised values before clipping (rank saturates anyway)
    vector: tuple[float, float]  # clipped into [0, 1]: what the ECM gets
    warnings: tuple[str, ...]  # one line per clipped component
    signals: tuple[tuple[str, float], ...] = ()  # every raw signal the engagement read

    def metadata(self) -> dict[str, Any]:
        """What a generated PNG records about the vector's origin, raw and clipped."""
        extra = {f"raw_{name}": value for name, value in self.signals if name not in ("likes", "comments")}
        counts = {} if self.likes is None else {"raw_likes": self.likes, "raw_comments": self.comments}
        return {
            **counts, **extra, "raw_date": self.date,
            "raw_total_engagement": self.total_engagement, "unclipped_engagement_time": list(self.unclipped),
            "clipped": bool(self.warnings),
        }


@dataclass(frozen=True)
class EngagementTimeNormalizer:
    """Fitted statistics that map raw engagement and dates to ``engagement_time``.

    ``engagement_low``/``engagement_high`` are the range in the normalisation's own space
    (raw totals for minmax, ``log1p`` of them for log_minmax, the residual of ``log1p`` after
    the time trend for detrended). For rank, ``rank_values`` are the distinct training totals,
    ascending, and ``rank_levels`` their normalised mid-ranks. For detrended,
    ``engagement_trend`` is (intercept, slope per day) of ``log1p`` on days since the first post.
    ``signal_weights`` ((name, weight) pairs, in summing order) and ``per`` say what the
    total engagement is (:func:`weighted_engagement`).
    """

    signal_weights: tuple[tuple[str, float], ...]
    normalization: str
    engagement_low: float
    engagement_high: float
    earliest_timestamp: pd.Timestamp  # UTC, day 0 of days_since_earliest_post
    span_days: float  # days from the earliest to the latest training post
    num_posts: int
    rank_values: tuple[float, ...] = field(default=(), repr=False)
    rank_levels: tuple[float, ...] = field(default=(), repr=False)
    engagement_trend: tuple[float, ...] = ()
    per: str | None = None

    # -- fitting ------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        likes: Any,
        comments: Any,
        timestamps: Any,
        comment_weight: float = DEFAULT_COMMENT_WEIGHT,
        normalization: str = "minmax",
    ) -> "EngagementTimeNormalizer":
        """Fit the report's ``likes + comment_weight * comments`` on one entry per post."""
        if not comment_weight >= 0:
            raise ValueError(f"comment_weight must be >= 0, got {comment_weight!r}")
        return cls.fit_signals(
            {"likes": likes, "comments": comments}, timestamps, {"likes": 1.0, "comments": comment_weight},
            normalization=normalization,
        )

    @classmethod
    def fit_signals(
        cls,
        signals: Mapping[str, Any],
        timestamps: Any,
        weights: Mapping[str, float] = DEFAULT_SIGNAL_WEIGHTS,
        per: str | None = None,
        normalization: str = "minmax",
    ) -> "EngagementTimeNormalizer":
        """Fit on one entry per post (deduplicate carousels before calling).

        `signals`: name -> one value per post; `weights`: name -> weight of the signals that
        make the engagement; `per`: the signal it is divided by (an engagement rate), or None.
        """
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if not weights:
            raise ValueError("the engagement needs at least one signal")
        if per is not None and per not in DENOMINATORS:
            raise ValueError(f"per must be one of {DENOMINATORS} or None, got {per!r}")
        totals = weighted_engagement(signals, weights, per)
        if normalization in ("log_minmax", "detrended") and np.any(totals <= -1):
            raise ValueError(
                f"the engagement {describe_engagement(weights, per)} is {totals.min():g} <= -1 for a post, and "
                f"{normalization} takes log1p of it: use minmax or rank, or weigh the signed signal less"
            )
        seconds = _to_utc_seconds(timestamps)
        if totals.size == 0 or totals.size != seconds.size:
            raise ValueError(f"need one timestamp per post and at least one post, got {totals.size} and {seconds.size}")
        values = np.log1p(totals) if normalization in ("log_minmax", "detrended") else totals
        rank_values: tuple[float, ...] = ()
        rank_levels: tuple[float, ...] = ()
        trend: tuple[float, ...] = ()
        if normalization == "rank":
            distinct, levels = _mid_rank_levels(totals)
            rank_values, rank_levels = tuple(distinct.tolist()), tuple(levels.tolist())
        earliest = float(seconds.min())
        if normalization == "detrended":
            days = (seconds - earliest) / SECONDS_PER_DAY
            if np.ptp(days) >= MIN_TIME_SPAN_DAYS:
                # Theil-Sen (median of pairwise slopes): a few viral posts must not tilt the trend.
                slope, intercept = stats.theilslopes(values, days)[:2]
            else:  # no time span to fit a trend on: nothing to remove
                slope, intercept = 0.0, float(values.mean())
            trend = (float(intercept), float(slope))
            values = values - (intercept + slope * days)
        return cls(
            signal_weights=tuple((str(name), float(weight)) for name, weight in weights.items()),
            normalization=normalization,
            engagement_low=float(values.min()),
            engagement_high=float(values.max()),
            earliest_timestamp=pd.Timestamp(earliest, unit="s", tz="UTC").floor("us"),
            span_days=(float(seconds.max()) - earliest) / SECONDS_PER_DAY,
            num_posts=int(totals.size),
            rank_values=rank_values,
            rank_levels=rank_levels,
            engagement_trend=trend,
            per=per,
        )

    # -- properties of the fit ------------------------------------------------------------

    @property
    def engagement_is_degenerate(self) -> bool:
        return self.engagement_high <= self.engagement_low

    @property
    def time_is_degenerate(self) -> bool:
        return self.span_days < MIN_TIME_SPAN_DAYS

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.signal_weights)

    @property
    def comment_weight(self) -> float:
        """The weight of comments (0 when the engagement does not count them)."""
        return self.weights.get("comments", 0.0)

    @property
    def formula(self) -> str:
        """What the total engagement is, as text: ``likes + 3 x comments``."""
        return describe_engagement(self.weights, self.per)

    def signals_needed(self) -> tuple[str, ...]:
        """Every signal a query must give: the weighted ones and the denominator."""
        return tuple(self.weights) + ((self.per,) if self.per else ())

    def total(self, signals: Mapping[str, Any]) -> np.ndarray:
        """Total engagement (float64) of raw signals (name -> values)."""
        return weighted_engagement(signals, self.weights, self.per)

    # -- transforms ---------------------------------------------------------------------

    def normalize_engagement(self, totals: Any, clip: bool = True, dates: Any = None) -> np.ndarray:
        """normalized_engagement (float64) of total engagement values (posted on `dates`:
        needed by detrended, whose engagement is relative to the time's trend)."""
        totals = np.asarray(totals, dtype=np.float64)
        if self.engagement_is_degenerate:
            return np.full(totals.shape, DEGENERATE_LEVEL)
        if self.normalization == "rank":
            # np.interp holds the end levels (0 and 1) outside the training range.
            return np.interp(totals, self.rank_values, self.rank_levels)
        values = np.log1p(totals) if self.normalization in ("log_minmax", "detrended") else totals
        if self.normalization == "detrended":
            if dates is None:
                raise ValueError("detrended engagement is relative to the post's time: give its dates")
            intercept, slope = self.engagement_trend
            values = values - (intercept + slope * self.days_since_earliest(dates))
        scaled = (values - self.engagement_low) / (self.engagement_high - self.engagement_low)
        return np.clip(scaled, 0.0, 1.0) if clip else scaled

    def days_since_earliest(self, dates: Any) -> np.ndarray:
        """days_since_earliest_post (fractional, float64); negative before the first post."""
        return (_to_utc_seconds(dates) - self.earliest_timestamp.timestamp()) / SECONDS_PER_DAY

    def normalize_time(self, dates: Any, clip: bool = True) -> np.ndarray:
        """normalized_time (float64) of dates (strings, datetimes, epoch numbers)."""
        days = self.days_since_earliest(dates)
        if self.time_is_degenerate:
            return np.full(days.shape, DEGENERATE_LEVEL)
        scaled = days / self.span_days
        return np.clip(scaled, 0.0, 1.0) if clip else scaled

    def _query_signals(self, likes: float | None, comments: float | None, signals: Mapping[str, float] | None) -> dict[str, float]:
        """The raw signals of one query: `signals`, with `likes`/`comments` given apart (0 when
        the engagement does not read them; left out when only `signals` are given); a signal the
        engagement needs must be given."""
        values = {}
        if likes is not None or signals is None:
            values = {"likes": 0.0 if likes is None else float(likes), "comments": 0.0 if comments is None else float(comments)}
        values.update({name: float(value) for name, value in (signals or {}).items()})
        missing = [name for name in self.signals_needed() if name not in values]
        if missing:
            raise ValueError(f"the engagement is {self.formula}: give {', '.join(missing)} too")
        return values

    def vector(
        self, likes: float | None = None, comments: float | None = 0, date: Any = None, clip: bool = True,
        signals: Mapping[str, float] | None = None,
    ) -> np.ndarray:
        """The ``engagement_time`` vector (float32, shape (2,)) of raw numbers.

        ``likes``/``comments`` or ``signals`` (name -> raw value, e.g. ``{"saves": 40,
        "reach": 900}``) give the engagement's signals. ``date`` is an ISO string
        (``"2025-06-01"``), a datetime or an epoch number; None means the latest training
        post. Values beyond the training range saturate at 0 or 1 unless ``clip=False``
        (rank always saturates: it has no scale to extrapolate).
        """
        if date is None:
            date = self.earliest_timestamp + pd.Timedelta(days=self.span_days)
        values = self._query_signals(likes, comments, signals)
        engagement = self.normalize_engagement(self.total({k: [v] for k, v in values.items()}), clip, [date])
        time = self.normalize_time(date, clip)
        return np.array([engagement[0], time[0]], dtype=np.float32)

    def query(
        self, likes: float | None = None, comments: float | None = 0, date: Any = None,
        signals: Mapping[str, float] | None = None,
    ) -> VectorQuery:
        """The vector of raw numbers, what it was before clipping into [0, 1], and why it was clipped.

        A query outside the training posts' range has no trained meaning: its vector is
        clipped to the nearest end, and `warnings` say by how much (for the CLI to print, and
        `metadata()` for the PNG to record).
        """
        if date is None:
            date = self.earliest_timestamp + pd.Timedelta(days=self.span_days)
        moment = pd.Timestamp(_to_utc_seconds(date)[0], unit="s", tz="UTC")
        values = self._query_signals(likes, comments, signals)
        total = float(self.total({k: [v] for k, v in values.items()})[0])
        unclipped = self.vector(date=moment, clip=False, signals=values)
        warnings = []
        low, high = self._engagement_range(moment)
        if not self.engagement_is_degenerate and not low <= total <= high:
            side = "above" if total > high else "below"
            given = ", ".join(f"{name} {values[name]:g}" for name in self.signals_needed())
            warnings.append(
                f"total engagement {total:g} ({self.formula}: {given}) is "
                f"{side} the training posts' range [{low:g}, {high:g}]: normalized_engagement "
                f"{unclipped[0]:.3g} clipped to {min(max(float(unclipped[0]), 0.0), 1.0):g}"
            )
        last = self.earliest_timestamp + pd.Timedelta(days=self.span_days)
        if not self.time_is_degenerate and not self.earliest_timestamp <= moment <= last:
            side = "after the latest" if moment > last else "before the earliest"
            warnings.append(
                f"date {moment.date()} is {side} training post ({self.earliest_timestamp.date()} to {last.date()}): "
                f"normalized_time {unclipped[1]:.3g} clipped to {min(max(float(unclipped[1]), 0.0), 1.0):g}"
            )
        return VectorQuery(
            likes=values.get("likes"), comments=values.get("comments"), date=moment.isoformat(), total_engagement=total,
            unclipped=(float(unclipped[0]), float(unclipped[1])),
            vector=(min(max(float(unclipped[0]), 0.0), 1.0), min(max(float(unclipped[1]), 0.0), 1.0)),
            warnings=tuple(warnings),
            signals=tuple((name, values[name]) for name in self.signals_needed()),
        )

    def _engagement_range(self, moment: pd.Timestamp) -> tuple[float, float]:
        """The total engagement that maps to 0 and to 1 at `moment` (the training posts' range;
        detrended: their range relative to the trend, moved to the trend's level at `moment`)."""
        if self.normalization == "rank":
            return self.rank_values[0], self.rank_values[-1]
        if self.normalization == "log_minmax":
            return float(np.expm1(self.engagement_low)), float(np.expm1(self.engagement_high))
        if self.normalization == "detrended":
            intercept, slope = self.engagement_trend
            trend = intercept + slope * float(self.days_since_earliest([moment])[0])
            return float(np.expm1(self.engagement_low + trend)), float(np.expm1(self.engagement_high + trend))
        return self.engagement_low, self.engagement_high

    # -- persistence --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": STATS_FORMAT_VERSION,
            "signals": self.weights,
            "per": self.per,
            "formula": self.formula,
            "normalization": self.normalization,
            "num_posts": self.num_posts,
            "engagement": {
                "low": self.engagement_low,
                "high": self.engagement_high,
                "space": {"log_minmax": "log1p(total_engagement)",
                          "detrended": "log1p(total_engagement) - (trend[0] + trend[1] * days_since_earliest_post)",
                          }.get(self.normalization, "total_engagement"),
                "trend": list(self.engagement_trend),
                "degenerate": self.engagement_is_degenerate,
                "rank_values": list(self.rank_values),
                "rank_levels": list(self.rank_levels),
            },
            "time": {
                "earliest_timestamp": self.earliest_timestamp.isoformat(),
                "span_days": self.span_days,
                "degenerate": self.time_is_degenerate,
            },
            "degenerate_level": DEGENERATE_LEVEL,
            "min_time_span_days": MIN_TIME_SPAN_DAYS,
        }

    @classmethod
    def from_dict(cls, stats: dict[str, Any]) -> "EngagementTimeNormalizer":
        version = stats.get("format_version")
        if version not in (1, STATS_FORMAT_VERSION):
            raise ValueError(f"normalisation statistics format {version!r}, expected {STATS_FORMAT_VERSION}")
        engagement, time = stats["engagement"], stats["time"]
        if version == 1:  # likes + comment_weight x comments
            weights = {"likes": 1.0, "comments": float(stats["comment_weight"])}
        else:
            weights = {str(name): float(weight) for name, weight in stats["signals"].items()}
        per = stats.get("per")
        if per is not None and per not in DENOMINATORS:
            raise ValueError(f"per must be one of {DENOMINATORS} or null, got {per!r}")
        return cls(
            signal_weights=tuple(weights.items()),
            per=per,
            normalization=stats["normalization"],
            engagement_low=float(engagement["low"]),
            engagement_high=float(engagement["high"]),
            earliest_timestamp=pd.Timestamp(time["earliest_timestamp"]).tz_convert("UTC"),
            span_days=float(time["span_days"]),
            num_posts=int(stats["num_posts"]),
            rank_values=tuple(float(v) for v in engagement.get("rank_values", [])),
            rank_levels=tuple(float(v) for v in engagement.get("rank_levels", [])),
            engagement_trend=tuple(float(v) for v in engagement.get("trend", [])),
        )

    def to_json(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "EngagementTimeNormalizer":
        path = Path(path)
        try:
            stats = json.loads(path.read_text())
            return cls.from_dict(stats)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not usable normalisation statistics ({error})") from error


def _mid_rank_levels(totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values (ascending) and their mid-ranks min-max scaled to [0, 1].

    Tied posts share the average of the ranks they occupy; the smallest value gets 0 and
    the largest 1 even when tied. One distinct value is the degenerate case (handled by
    the caller).
    """
    distinct, counts = np.unique(totals, return_counts=True)
    if distinct.size == 1:
        return distinct, np.array([DEGENERATE_LEVEL])
    first_rank = np.concatenate([[0], np.cumsum(counts)[:-1]])  # 0-based rank of each group's first
    mid_rank = first_rank + (counts - 1) / 2.0
    return distinct, (mid_rank - mid_rank[0]) / (mid_rank[-1] - mid_rank[0])

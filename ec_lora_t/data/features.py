"""Engagement and time features (report sections 3.4 and 3.5).

``total_engagement`` is a weighted sum of named signals, by default the report's
``likes + 3 * comments`` (``signals.DEFAULT_SIGNAL_WEIGHTS``); any signal ingest found (saves,
shares, views, a business export's other numbers, comment sentiment) can take part. With a
denominator (``per``: reach, impressions or views) it is an engagement *rate*: weighted
interactions per account reached, the industry's figure, so a post that reached few people
and was liked by most of them counts as the better post it was. A post that lacks a signal
the engagement needs, or whose denominator is 0, is left out and reported
(:mod:`ec_lora_t.data.signals`), never counted as 0. The engagement and the time are scaled
to [0, 1] by :class:`EngagementTimeNormalizer` (:mod:`ec_lora_t.data.normalizer`, which
describes the four normalisations and the degenerate cases); :func:`build_feature_table`
fits it per post and adds the vector
``engagement_time = [normalized_engagement, normalized_time]`` to every captioned image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa

from ec_lora_t.data.schemas import FEATURES_SCHEMA
# The normaliser and the signals are modules of their own; their public names are imported here
# too, for the callers (app, cli, tests) that know them as `ec_lora_t.data.features.*`.
from ec_lora_t.data.normalizer import DEGENERATE_LEVEL, NORMALIZATIONS, EngagementTimeNormalizer  # noqa: F401
from ec_lora_t.data.signals import (  # noqa: F401
    DEFAULT_COMMENT_WEIGHT,
    DENOMINATORS,
    LEFT_OUT_REASONS,
    count_left_out,
    describe_engagement,
    left_out_table,
    posts_left_out,
    signal_columns,
    signals_from_posts,
    total_engagement,
)


@dataclass
class FeatureResult:
    table: pa.Table
    normalizer: EngagementTimeNormalizer
    metrics: dict[str, Any]
    left_out: pa.Table  # LEFT_OUT_SCHEMA: one row per post left out, with why


CAPTION_COLUMNS = ["image_path", "image_sha256", "caption", "season", "full_caption"]


def _captioned_images(posts: pd.DataFrame, captions: pd.DataFrame) -> pd.DataFrame:
    """The posts table's images that have a caption, with it, in time order (one row per image)."""
    missing = [c for c in ("shortcode", "image_path", "likes_count", "comments_count", "timestamp") if c not in posts]
    if missing:
        raise ValueError(f"posts table lacks column(s) {missing}")
    missing = [c for c in CAPTION_COLUMNS if c not in captions]
    if missing:
        raise ValueError(f"captions table lacks column(s) {missing}")
    table = posts.merge(captions[CAPTION_COLUMNS], on="image_path", how="inner", validate="one_to_one")
    if table.empty:
        raise ValueError("no image of the posts table has a caption: nothing to train on")
    return table.sort_values(["timestamp", "shortcode", "image_index"], kind="stable").reset_index(drop=True)


def _add_features(table: pd.DataFrame, normalizer: EngagementTimeNormalizer, values: pd.DataFrame) -> pa.Table:
    """The FEATURES_SCHEMA table: each image with its post's engagement and time, raw and normalised."""
    needed = list(values.columns)
    table["total_engagement"] = normalizer.total({name: values.loc[table["shortcode"], name].to_numpy() for name in needed})
    table["normalized_engagement"] = normalizer.normalize_engagement(
        table["total_engagement"], dates=table["timestamp"]
    ).astype(np.float32)
    table["days_since_earliest_post"] = normalizer.days_since_earliest(table["timestamp"])
    table["normalized_time"] = normalizer.normalize_time(table["timestamp"]).astype(np.float32)
    table["engagement_time"] = list(table[["normalized_engagement", "normalized_time"]].to_numpy(np.float32))
    if "post_text" not in table:
        table["post_text"] = None
    if "source_format" not in table:
        table["source_format"] = "unknown"
    return pa.Table.from_pandas(table[FEATURES_SCHEMA.names], schema=FEATURES_SCHEMA, preserve_index=False)


def build_feature_table(
    posts: pd.DataFrame,
    captions: pd.DataFrame,
    comment_weight: float | None = None,
    normalization: str = "minmax",
    *,
    signals: pd.DataFrame | None = None,
    weights: Mapping[str, float] | None = None,
    per: str | None = None,
) -> FeatureResult:
    """Join the ingest and caption tables on image_path and add the engagement-time features.

    The engagement is ``sum(weights[name] * signal) [/ per]`` over the signals table
    (shortcode, signal, value: what ingest and the sentiment stage found; by default the posts
    table's likes and comments); `weights` default to ``likes + comment_weight * comments``.
    Images without a caption (the caption stage left them out) are not in the table and are
    counted in the metrics; posts without a signal the engagement needs, or whose denominator
    is 0, are left out and listed in `left_out`. Statistics are fitted on the posts that remain.
    """
    if weights is not None and comment_weight is not None:
        raise ValueError("give either weights or comment_weight, not both")
    if weights is None:
        weights = {"likes": 1.0, "comments": DEFAULT_COMMENT_WEIGHT if comment_weight is None else comment_weight}
    # 1. The captioned images.
    table = _captioned_images(posts, captions)
    images_without_caption = int(len(posts) - len(table))

    # 2. Each post's signals; posts that lack one, or whose denominator is 0, are left out.
    needed = list(weights) + ([per] if per else [])
    captioned_posts = table["shortcode"].drop_duplicates().tolist()
    values = signal_columns(signals_from_posts(posts) if signals is None else signals, captioned_posts, needed)
    left_out = posts_left_out(values, needed, per)
    dropped = {shortcode for shortcode, _, _ in left_out}
    table = table[~table["shortcode"].isin(dropped)].reset_index(drop=True)
    if table.empty:
        raise ValueError(f"every captioned post lacks a signal of the engagement {describe_engagement(weights, per)} "
                         f"(first: {left_out[0][0]}: {left_out[0][2]})")
    values = values.drop(index=list(dropped))

    # 3. Fit per post, then apply per image.
    per_post = table.drop_duplicates("shortcode")
    normalizer = EngagementTimeNormalizer.fit_signals(
        {name: values.loc[per_post["shortcode"], name].to_numpy() for name in needed},
        per_post["timestamp"], weights, per, normalization,
    )
    arrow = _add_features(table, normalizer, values)

    # 4. The few numbers worth comparing across experiments; the normalization itself is a param,
    # and its statistics are in normalization.json.
    metrics: dict[str, Any] = {
        "images": arrow.num_rows,
        "posts": normalizer.num_posts,
        "images_without_caption": images_without_caption,
        "engagement_degenerate": normalizer.engagement_is_degenerate,
        "time_degenerate": normalizer.time_is_degenerate,
        "span_days": normalizer.span_days,
    }
    # The posts table's likes and comments are never missing (ingest rejects a post without
    # them): the count of posts left out is reported when the engagement reads anything else.
    if set(needed) - {"likes", "comments"}:
        metrics["posts_left_out"] = count_left_out(left_out)
    return FeatureResult(table=arrow, normalizer=normalizer, metrics=metrics, left_out=left_out_table(left_out))

"""The tables between the data stages, as explicit pyarrow schemas (documented in docs/schema.md).

They live apart from the code that writes them so that a stage reading a table depends on its
columns, not on the reader of another stage's input format.
"""

from __future__ import annotations

import pyarrow as pa

# ingest: one row per usable image
POSTS_SCHEMA = pa.schema(
    [
        pa.field("shortcode", pa.string(), nullable=False),
        pa.field("image_index", pa.int64(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("likes_count", pa.int64(), nullable=False),
        pa.field("comments_count", pa.int64(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("post_text", pa.string(), nullable=True),
        pa.field("source_format", pa.string(), nullable=False),
    ]
)

# ingest (and the sentiment stage): the numbers a post's engagement can be made of, one row per
# post and signal (likes, comments, and what an insights table or the comments' sentiment add).
# A signal a post does not have has no row: absent, never 0.
SIGNALS_SCHEMA = pa.schema(
    [
        pa.field("shortcode", pa.string(), nullable=False),
        pa.field("signal", pa.string(), nullable=False),  # likes, comments, saves, reach, sentiment...
        pa.field("value", pa.float64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # the file (and line) it was read from
    ]
)

# ingest: the text of each post's comments, where the export has it (instaloader --comments)
COMMENTS_SCHEMA = pa.schema(
    [
        pa.field("shortcode", pa.string(), nullable=False),
        pa.field("comment_index", pa.int64(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
    ]
)

# ingest: what went wrong joining signals (insights rows, comment files); no post is rejected for it
SIGNAL_ISSUES_SCHEMA = pa.schema(
    [
        pa.field("location", pa.string(), nullable=False),  # file:line, file:row N, or the post's source path
        pa.field("shortcode", pa.string(), nullable=True),  # the post concerned, when known
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ]
)


# caption: one row per captioned image
CAPTIONS_SCHEMA = pa.schema(
    [
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("image_sha256", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("season", pa.string(), nullable=False),
        pa.field("full_caption", pa.string(), nullable=False),
        pa.field("caption_source", pa.string(), nullable=False),  # blip | post_text
    ]
)

# The training table: every ingest column, the caption columns (but the image path, already
# there, and where the caption came from), then the engagement and time features.
FEATURES_SCHEMA = pa.schema(
    list(POSTS_SCHEMA)
    + [CAPTIONS_SCHEMA.field(name) for name in ("image_sha256", "caption", "season", "full_caption")]
    + [
        pa.field("total_engagement", pa.float64(), nullable=False),
        pa.field("normalized_engagement", pa.float32(), nullable=False),
        pa.field("days_since_earliest_post", pa.float64(), nullable=False),
        pa.field("normalized_time", pa.float32(), nullable=False),
        pa.field("engagement_time", pa.list_(pa.float32(), 2), nullable=False),
    ]
)

# features: posts left out because a signal of the engagement is missing or its denominator is 0
LEFT_OUT_SCHEMA = pa.schema(
    [
        pa.field("shortcode", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # ec_lora_t.data.features.LEFT_OUT_REASONS
        pa.field("detail", pa.string(), nullable=False),
    ]
)

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

"""What both layouts share: the records and rejects of an ingest, and its result tables."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa

from ec_lora_t.data.fields import InvalidPostData
from ec_lora_t.data.schemas import COMMENTS_SCHEMA, POSTS_SCHEMA, REJECTS_SCHEMA, SIGNAL_ISSUES_SCHEMA, SIGNALS_SCHEMA

REPORT = "report"
INSTALOADER = "instaloader"
FORMATS = ("auto", REPORT, INSTALOADER)
VIDEO_MODES = ("thumbnail", "skip")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
VIDEO_SUFFIXES = (".mp4",)
REPORT_METADATA_NAME = "metadata.csv"
# Optional, next to metadata.csv: one comment per row in a `text` column (report layout).
REPORT_COMMENTS_NAME = "comments.csv"
REPORT_REQUIRED_COLUMNS = ("likes_count", "comments_count", "timestamp")

# Reason codes of the rejects table; the message beside each says what exactly was wrong.
REJECT_REASONS = (
    "missing_metadata",  # images with no metadata.csv / no instaloader JSON next to them
    "malformed_metadata",  # metadata file that cannot be read or lacks a field
    "invalid_count",  # likes or comments negative, fractional or not a number
    "invalid_timestamp",  # timestamp missing, unparseable or outside 1970..2100
    "unreadable_image",  # not an image Pillow can identify (empty, wrong format, garbage)
    "truncated_image",  # header fine but the pixel data is cut short or corrupt
    "decompression_bomb",  # more pixels than max_image_pixels
    "duplicate_shortcode",  # a second post with a shortcode already ingested
    "no_images",  # a post whose metadata names no image file at all
    "video_skipped",  # a video (or its thumbnail) left out because videos: skip
    "video_without_thumbnail",  # a video with no thumbnail image while videos: thumbnail
    "not_a_post",  # instaloader JSON of a story, profile... next to images
)


class IngestError(RuntimeError):
    """Raised when there is nothing to ingest: no folder, an empty one, no known layout."""



@dataclass(frozen=True)
class Reject:
    path: str
    reason: str
    detail: str


@dataclass(frozen=True)
class PostMetadata:
    """What one post's metadata says, already validated."""

    shortcode: str
    likes_count: int
    comments_count: int
    timestamp: pd.Timestamp  # tz-aware UTC
    post_text: str | None = None
    post_id: str | None = None  # Instagram's media id, where the export has it (joins an insights table)


@dataclass(frozen=True)
class ImageRecord:
    """One row of the posts table: one image of one post."""

    shortcode: str
    image_index: int
    image_path: str
    likes_count: int
    comments_count: int
    timestamp: pd.Timestamp
    post_text: str | None
    source_format: str



@dataclass(frozen=True)
class SignalRecord:
    """One row of the signals table: one number of one post, and where it was read."""

    shortcode: str
    signal: str
    value: float
    source: str


@dataclass
class IngestResult:
    source_format: str
    records: list[ImageRecord]
    rejects: list[Reject]
    ignored_files: int = 0
    posts_found: int = 0
    signals: list[SignalRecord] = field(default_factory=list)
    comments: list[tuple[str, int, str]] = field(default_factory=list)  # (shortcode, comment_index, text)
    signal_issues: list[Any] = field(default_factory=list)  # ingest.insights.SignalIssue
    insights_metrics: dict[str, Any] | None = None  # None: no insights table was given

    def posts_table(self) -> pa.Table:
        columns = {name: [getattr(r, name) for r in self.records] for name in POSTS_SCHEMA.names}
        columns["timestamp"] = [ts.to_pydatetime() for ts in columns["timestamp"]]
        return pa.Table.from_pydict(columns, schema=POSTS_SCHEMA)

    def rejects_table(self) -> pa.Table:
        return _records_table(self.rejects, REJECTS_SCHEMA)

    def signals_table(self) -> pa.Table:
        return _records_table(self.signals, SIGNALS_SCHEMA)

    def signal_issues_table(self) -> pa.Table:
        return _records_table(self.signal_issues, SIGNAL_ISSUES_SCHEMA)

    def comments_table(self) -> pa.Table:
        columns = dict(zip(COMMENTS_SCHEMA.names, map(list, zip(*self.comments)))) if self.comments else {}
        return pa.Table.from_pydict({name: columns.get(name, []) for name in COMMENTS_SCHEMA.names}, schema=COMMENTS_SCHEMA)

    def metrics(self) -> dict[str, Any]:
        by_reason = {reason: 0 for reason in REJECT_REASONS}
        for reject in self.rejects:
            by_reason[reject.reason] = by_reason.get(reject.reason, 0) + 1
        images_per_post: dict[str, int] = {}
        for record in self.records:
            images_per_post[record.shortcode] = images_per_post.get(record.shortcode, 0) + 1
        # Keys that exist only where the export has them, so the default feed's metrics stay as they were.
        extra: dict[str, Any] = {}
        if self.insights_metrics is not None:
            extra["insights"] = self.insights_metrics
        if self.comments:
            extra["comment_texts"] = {"comments": len(self.comments), "posts": len({c[0] for c in self.comments})}
        return {
            **extra,
            "format": self.source_format,
            "posts_found": self.posts_found,
            "posts": len(images_per_post),
            "images": len(self.records),
            "carousel_posts": sum(1 for n in images_per_post.values() if n > 1),
            "rejected": len(self.rejects),
            "rejected_by_reason": by_reason,
            "ignored_files": self.ignored_files,
        }



def _records_table(records: list[Any], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pydict({name: [getattr(r, name) for r in records] for name in schema.names}, schema=schema)


@dataclass
class _Post:
    """A post found on disk before its images are checked."""

    metadata: PostMetadata
    source_path: str  # folder or metadata file, for rejects and duplicate messages
    preferred: bool  # its folder/file name matches the shortcode: wins a duplicate tie
    # (image_index, path, post_text): the text is per image because a carousel slide may
    # carry its own alt text when the post has no caption.
    images: list[tuple[int, Path, str | None]] = field(default_factory=list)
    comments: tuple[str, ...] = ()  # the text of its comments, where the export has it
    comment_problem: tuple[str, str] | None = None  # (file, why) of a comments file that cannot be read



def _walk(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """(folder, sorted file names) for every non-hidden folder under root, sorted."""
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield Path(folder), sorted(f for f in filenames if not f.startswith("."))



def _natural_key(name: str) -> list[Any]:
    """Sort key that puts ``img_2.jpg`` before ``img_10.jpg`` (carousel order)."""
    return [(0, int(part)) if part.isdigit() else (1, part.lower()) for part in re.split(r"(\d+)", name)]


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InvalidPostData("malformed_metadata", f"not UTF-8 text ({error})") from None
    except OSError as error:
        raise InvalidPostData("malformed_metadata", f"cannot read ({error.strerror})") from None

"""Post ingestion (report section 3.2): read a creator's post export into one row per image.

Two layouts are read:

* ``report``: the layout of the report (Figure 3.1). One folder per post, anywhere under the
  root, holding the post's images and a ``metadata.csv`` with the columns
  ``shortcode, likes_count, comments_count, timestamp`` and an optional ``caption``.
* ``instaloader``: what ``instaloader <profile>`` writes. One folder per profile, each post
  saved as ``<stem>.json.xz`` (or ``.json``) holding ``{"node": ..., "instaloader": ...}``
  next to its images ``<stem>.jpg`` or, for carousels, ``<stem>_1.jpg``, ``<stem>_2.jpg``...
  With the default filename pattern ``<stem>`` is ``{date_utc}_UTC``; any pattern works
  because posts are found through their JSON files.

Bad input never stops the run and never disappears: every file or post that cannot be used
becomes a :class:`Reject` with a reason code from :data:`REJECT_REASONS` and a message.
Images are *not* rewritten: ingest fully decodes each one to prove it is usable, and every
later stage opens images through :func:`load_rgb_image`, which applies the EXIF rotation and
converts palette, RGBA, CMYK, greyscale and 16-bit images to RGB the same way every time.
"""

from __future__ import annotations

import csv
import io
import json
import lzma
import math
import os
import re
import struct
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

REPORT = "report"
INSTALOADER = "instaloader"
FORMATS = ("auto", REPORT, INSTALOADER)
VIDEO_MODES = ("thumbnail", "skip")

# Pillow's own default warning threshold (about 89.5 MPix, a 9459 x 9459 image).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
VIDEO_SUFFIXES = (".mp4",)
REPORT_METADATA_NAME = "metadata.csv"
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

EARLIEST_TIMESTAMP = pd.Timestamp("1970-01-01", tz="UTC")
LATEST_TIMESTAMP = pd.Timestamp("2100-01-01", tz="UTC")
# An epoch number is read in the first of these units that puts it before 2100: exports
# write seconds, JavaScript-made ones milliseconds. Only millisecond times before
# 1970-02-17 would be misread (as seconds), and no post is that old.
_EPOCH_UNITS = (("s", 1.0), ("ms", 1e3), ("us", 1e6), ("ns", 1e9))

# instaloader's default filename pattern: {date_utc}_UTC, dates as %Y-%m-%d_%H-%M-%S.
_INSTALOADER_DATE_STEM = re.compile(r"(\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2})_UTC$")


class IngestError(RuntimeError):
    """Raised when there is nothing to ingest: no folder, an empty one, no known layout."""


class InvalidPostData(ValueError):
    """One field of one post cannot be used; ``reason`` is a code from REJECT_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ImageRejected(ValueError):
    """An image file cannot be used; ``reason`` is a code from REJECT_REASONS."""

    def __init__(self, path: str | Path, reason: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.reason = reason
        self.detail = message


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


@dataclass
class IngestResult:
    source_format: str
    records: list[ImageRecord]
    rejects: list[Reject]
    ignored_files: int = 0
    posts_found: int = 0

    def posts_table(self) -> pa.Table:
        columns = {name: [getattr(r, name) for r in self.records] for name in POSTS_SCHEMA.names}
        columns["timestamp"] = [ts.to_pydatetime() for ts in columns["timestamp"]]
        return pa.Table.from_pydict(columns, schema=POSTS_SCHEMA)

    def rejects_table(self) -> pa.Table:
        columns = {name: [getattr(r, name) for r in self.rejects] for name in REJECTS_SCHEMA.names}
        return pa.Table.from_pydict(columns, schema=REJECTS_SCHEMA)

    def metrics(self) -> dict[str, Any]:
        by_reason = {reason: 0 for reason in REJECT_REASONS}
        for reject in self.rejects:
            by_reason[reject.reason] = by_reason.get(reject.reason, 0) + 1
        images_per_post: dict[str, int] = {}
        for record in self.records:
            images_per_post[record.shortcode] = images_per_post.get(record.shortcode, 0) + 1
        return {
            "format": self.source_format,
            "posts_found": self.posts_found,
            "posts": len(images_per_post),
            "images": len(self.records),
            "carousel_posts": sum(1 for n in images_per_post.values() if n > 1),
            "rejected": len(self.rejects),
            "rejected_by_reason": by_reason,
            "ignored_files": self.ignored_files,
        }


# ---------------------------------------------------------------------------------------
# Field parsers: one place that decides what a count or a timestamp may look like.


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


# ---------------------------------------------------------------------------------------
# Images


_PIXEL_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pixel_limit(max_image_pixels: int | None) -> Iterator[None]:
    """Make Pillow's decompression-bomb guard use our limit while opening one file.

    Pillow reads the limit from a module global; it raises by itself only above twice the
    limit, so the caller still compares the size with ``max_image_pixels``.
    """
    with _PIXEL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_image_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def load_rgb_image(path: str | Path, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image the one way every stage does: decoded, EXIF-upright, 8-bit RGB.

    ``max_image_pixels=None`` turns the decompression-bomb guard off, for stages that read
    images the ingest stage already checked against its own ``max_image_pixels``.

    * EXIF orientation is applied (phones store portraits as rotated landscapes).
    * Palette and greyscale images become RGB; transparency (RGBA, LA, palette with a
      transparent colour) is composited onto white, as Instagram shows it.
    * CMYK (print JPEGs) is converted by Pillow, which handles Adobe's inverted CMYK.
    * 16-bit greyscale is scaled to 8 bits rather than clipped.

    Raises :class:`ImageRejected` (``unreadable_image``, ``truncated_image`` or
    ``decompression_bomb``) naming the file.
    """
    try:
        # Only opening reads the header and checks the size; decoding happens outside the lock.
        with _pixel_limit(max_image_pixels):
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ImageRejected(path, "decompression_bomb", str(error)) from None
    except UnidentifiedImageError:
        raise ImageRejected(path, "unreadable_image", "not an image file Pillow can identify") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        raise ImageRejected(path, "unreadable_image", f"cannot open: {error.strerror}") from None
    with image:
        width, height = image.size
        if max_image_pixels is not None and width * height > max_image_pixels:
            raise ImageRejected(
                path,
                "decompression_bomb",
                f"{width}x{height} = {width * height} pixels is over max_image_pixels ({max_image_pixels})",
            )
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageRejected(path, "truncated_image", f"pixel data is truncated or corrupt ({error})") from None
        return _to_rgb(_exif_upright(image))


def _exif_upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error):
        # A broken EXIF block must not cost the image; it is then used as stored.
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        # (H, W) 16-bit range -> uint8; convert("L") alone would clip everything above 255.
        # Mode I (32-bit) holds 16-bit PNGs on some Pillow versions, or 8-bit values.
        pixels = np.asarray(image, dtype=np.float64)
        is_16bit = image.mode.startswith("I;16") or pixels.max(initial=0) > 255
        scale = 255.0 / 65535.0 if is_16bit else 1.0
        grey = np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # (H, W) uint8 -> L -> RGB
    if image.mode != "RGB":
        return image.convert("RGB")
    return image.copy()


def _check_image(path: Path, max_image_pixels: int | None) -> Reject | None:
    try:
        load_rgb_image(path, max_image_pixels)
    except ImageRejected as rejected:
        return Reject(str(path), rejected.reason, rejected.detail)
    return None


# ---------------------------------------------------------------------------------------
# Layout detection


def _walk(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """(folder, sorted file names) for every non-hidden folder under root, sorted."""
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield Path(folder), sorted(f for f in filenames if not f.startswith("."))


def _is_instaloader_json(name: str) -> bool:
    return name.endswith((".json.xz", ".json")) and not name.endswith("_comments.json")


def _layout_help(posts_dir: Path) -> str:
    return (
        f"Expected in {posts_dir} either the report layout "
        "(<posts_dir>/<shortcode>/*.jpg plus a metadata.csv with columns "
        "shortcode, likes_count, comments_count, timestamp[, caption]) or an instaloader "
        "download (<posts_dir>/<profile>/<date>_UTC.jpg, <date>_UTC_1.jpg ... next to "
        "<date>_UTC.json.xz, as written by `instaloader <profile>`)."
    )


def detect_format(posts_dir: str | Path) -> str:
    """Return ``report`` or ``instaloader`` from the files under posts_dir."""
    root = Path(posts_dir)
    has_report = has_instaloader = False
    for _, filenames in _walk(root):
        has_report |= REPORT_METADATA_NAME in filenames
        has_instaloader |= any(_INSTALOADER_DATE_STEM.search(_json_stem(f) or "") for f in filenames)
        has_instaloader |= any(f.endswith(".json.xz") for f in filenames)
    if has_report and has_instaloader:
        raise IngestError(
            f"{root} holds both metadata.csv files and instaloader JSON files; "
            "set ingest.format to 'report' or 'instaloader'"
        )
    if has_report:
        return REPORT
    if has_instaloader:
        return INSTALOADER
    raise IngestError(f"no posts found under {root}. {_layout_help(root)}")


def _json_stem(name: str) -> str | None:
    for suffix in (".json.xz", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


# ---------------------------------------------------------------------------------------
# Report layout


def parse_report_metadata(text: str, folder_name: str = "") -> PostMetadata:
    """Parse one post's metadata.csv text (report layout).

    The header is matched case-insensitively; ``shortcode`` falls back to the folder name
    when empty or absent; ``caption`` is optional. More than one data row is accepted only
    when all rows agree (some exports repeat the post's row once per image).
    """
    try:
        # A byte-order mark (Excel's "CSV UTF-8") would otherwise glue onto the first column.
        rows = list(csv.reader(io.StringIO(text.removeprefix("\ufeff"))))
    except csv.Error as error:
        raise InvalidPostData("malformed_metadata", f"not valid CSV ({error})") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise InvalidPostData("malformed_metadata", "empty file")
    header = [cell.strip().lower() for cell in rows[0]]
    missing = [column for column in REPORT_REQUIRED_COLUMNS if column not in header]
    if missing:
        raise InvalidPostData(
            "malformed_metadata",
            f"missing column(s) {', '.join(missing)}; header is {rows[0]!r}",
        )
    body = rows[1:]
    if not body:
        raise InvalidPostData("malformed_metadata", "header but no data row")
    records = []
    for row in body:
        if len(row) != len(header):
            raise InvalidPostData(
                "malformed_metadata", f"row has {len(row)} fields, header has {len(header)}: {row!r}"
            )
        values = dict(zip(header, row))
        records.append(
            PostMetadata(
                shortcode=(values.get("shortcode") or "").strip() or folder_name,
                likes_count=parse_count(values["likes_count"], "likes_count"),
                comments_count=parse_count(values["comments_count"], "comments_count"),
                timestamp=parse_timestamp(values["timestamp"], "timestamp"),
                post_text=clean_text(values.get("caption")),
            )
        )
    if any(record != records[0] for record in records[1:]):
        raise InvalidPostData("malformed_metadata", f"{len(records)} data rows that disagree")
    if not records[0].shortcode:
        raise InvalidPostData("malformed_metadata", "no shortcode")
    return records[0]


@dataclass
class _Post:
    """A post found on disk before its images are checked."""

    metadata: PostMetadata
    source_path: str  # folder or metadata file, for rejects and duplicate messages
    preferred: bool  # its folder/file name matches the shortcode: wins a duplicate tie
    # (image_index, path, post_text): the text is per image because a carousel slide may
    # carry its own alt text when the post has no caption.
    images: list[tuple[int, Path, str | None]] = field(default_factory=list)


def _read_report_posts(root: Path) -> tuple[list[_Post], list[Reject], int, int]:
    """(posts, rejects, ignored files, metadata files found) of a report-layout tree."""
    posts: list[_Post] = []
    rejects: list[Reject] = []
    ignored = metadata_files = 0
    for folder, filenames in _walk(root):
        image_names = [f for f in filenames if f.lower().endswith(IMAGE_SUFFIXES)]
        other_names = [f for f in filenames if f != REPORT_METADATA_NAME and f not in image_names]
        if REPORT_METADATA_NAME not in filenames:
            if image_names:
                rejects.append(
                    Reject(str(folder), "missing_metadata", f"{len(image_names)} image(s) but no metadata.csv")
                )
            ignored += len(other_names)
            continue
        metadata_path = folder / REPORT_METADATA_NAME
        metadata_files += 1
        # Files other than images in a post folder are offered to Pillow too: a HEIC or
        # an extension-less download becomes a visible unreadable_image, not a silent skip.
        image_names = sorted(image_names + other_names, key=_natural_key)
        try:
            metadata = parse_report_metadata(_read_text(metadata_path), folder.name)
        except InvalidPostData as error:
            rejects.append(Reject(str(metadata_path), error.reason, str(error)))
            continue
        if not image_names:
            rejects.append(Reject(str(folder), "no_images", "metadata.csv but no image file"))
            continue
        posts.append(
            _Post(
                metadata=metadata,
                source_path=str(folder),
                preferred=folder.name == metadata.shortcode,
                images=[
                    (index, folder / name, metadata.post_text) for index, name in enumerate(image_names)
                ],
            )
        )
    return posts, rejects, ignored, metadata_files


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


# ---------------------------------------------------------------------------------------
# instaloader layout


@dataclass(frozen=True)
class InstaloaderPost:
    """What an instaloader Post JSON says, in either node schema."""

    metadata: PostMetadata
    typename: str  # GraphImage | GraphVideo | GraphSidecar
    slide_is_video: tuple[bool, ...]  # one entry per image slot, in carousel order
    slide_alt_text: tuple[str | None, ...]


def _dig(mapping: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(mapping, dict) and key in mapping:
            mapping = mapping[key]
        elif isinstance(mapping, list) and isinstance(key, int) and -len(mapping) <= key < len(mapping):
            mapping = mapping[key]
        else:
            return None
    return mapping


def parse_instaloader_structure(structure: Any, stem: str = "") -> InstaloaderPost:
    """Parse instaloader's ``{"node": ..., "instaloader": ...}`` of one Post.

    Two node schemas occur. Anonymous downloads (GraphQL): ``edge_media_preview_like.count``,
    ``edge_media_to_comment.count`` (or ``edge_media_to_parent_comment.count``),
    ``taken_at_timestamp``, caption in ``edge_media_to_caption.edges[0].node.text``.
    Logged-in downloads (``Post.from_iphone_struct``): ``comments`` as an int, ``date``,
    ``caption`` as a string, raw counts in ``iphone_struct``. The lookups follow the order of
    instaloader's own ``Post`` properties. The time falls back to a ``{date_utc}_UTC`` stem.
    """
    if not isinstance(structure, dict) or not isinstance(structure.get("node"), dict):
        raise InvalidPostData("malformed_metadata", 'not an instaloader JSON ({"node": ..., "instaloader": ...})')
    node_type = _dig(structure, "instaloader", "node_type")
    if node_type not in (None, "Post"):
        raise InvalidPostData("not_a_post", f"instaloader {node_type} JSON, not a Post")
    node = structure["node"]
    iphone = node.get("iphone_struct") if isinstance(node.get("iphone_struct"), dict) else {}

    raw_shortcode = node.get("shortcode") or node.get("code")
    shortcode = clean_text(raw_shortcode) if isinstance(raw_shortcode, str) else None
    if shortcode is None:
        raise InvalidPostData("malformed_metadata", f"node has no text shortcode ({raw_shortcode!r})")

    likes = _first_present(
        _dig(node, "edge_media_preview_like", "count"),
        _dig(node, "edge_liked_by", "count"),
        iphone.get("like_count"),
    )
    comments = _first_present(
        _dig(node, "edge_media_to_comment", "count"),
        _dig(node, "edge_media_to_parent_comment", "count"),
        node.get("comments") if not isinstance(node.get("comments"), dict) else None,
        iphone.get("comment_count"),
    )
    taken_at = _first_present(node.get("date"), node.get("taken_at_timestamp"), iphone.get("taken_at"))
    if taken_at is None:
        stem_date = _INSTALOADER_DATE_STEM.search(stem)
        if stem_date is None:
            raise InvalidPostData("invalid_timestamp", "node has no date/taken_at_timestamp")
        taken_at = datetime.strptime(stem_date.group(1), "%Y-%m-%d_%H-%M-%S")

    caption = _first_present(
        _dig(node, "edge_media_to_caption", "edges", 0, "node", "text"),
        node.get("caption") if isinstance(node.get("caption"), str) else _dig(node, "caption", "text"),
    )
    # Alt text ("Photo by ... May be an image of 1 person, outdoors") stands in for a
    # missing caption: per slide for carousels, else the post's own.
    post_alt_text = clean_text(node.get("accessibility_caption"))

    typename = node.get("__typename") or ("GraphVideo" if node.get("is_video") else "GraphImage")
    children = _dig(node, "edge_sidecar_to_children", "edges")
    if typename == "GraphSidecar" and isinstance(children, list):
        slide_is_video = tuple(bool(_dig(edge, "node", "is_video")) for edge in children)
        slide_alt = tuple(
            clean_text(_dig(edge, "node", "accessibility_caption")) or post_alt_text for edge in children
        )
    else:
        slide_is_video = (bool(node.get("is_video")) or typename == "GraphVideo",)
        slide_alt = (post_alt_text,)

    return InstaloaderPost(
        metadata=PostMetadata(
            shortcode=shortcode,
            likes_count=parse_count(likes, "likes count"),
            comments_count=parse_count(comments, "comments count"),
            timestamp=parse_timestamp(taken_at, "date"),
            post_text=clean_text(caption) if isinstance(caption, str) else None,
        ),
        typename=typename,
        slide_is_video=slide_is_video,
        slide_alt_text=slide_alt,
    )


def _first_present(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def read_instaloader_json(path: str | Path) -> Any:
    """Load an instaloader ``.json`` or ``.json.xz`` file; malformed_metadata if it can't."""
    path = Path(path)
    try:
        if path.name.endswith(".xz"):
            with lzma.open(path, "rt", encoding="utf-8") as stream:
                return json.load(stream)
        return json.loads(path.read_text(encoding="utf-8"))
    except (lzma.LZMAError, EOFError) as error:
        raise InvalidPostData("malformed_metadata", f"not valid xz data ({error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidPostData("malformed_metadata", f"not valid JSON ({error})") from None


def _read_instaloader_posts(root: Path, videos: str) -> tuple[list[_Post], list[Reject], int, int]:
    """(posts, rejects, ignored files, Post JSON files found) of an instaloader tree."""
    posts: list[_Post] = []
    rejects: list[Reject] = []
    ignored = metadata_files = 0
    for folder, filenames in _walk(root):
        stems = {}
        for name in filenames:
            stem = _json_stem(name)
            if stem is not None and _is_instaloader_json(name):
                # The .json.xz wins when both were written (--no-compress-json, then not).
                if stem not in stems or name.endswith(".xz"):
                    stems[stem] = name
        media: dict[str, dict[int | None, dict[str, Path]]] = {stem: {} for stem in stems}
        claimed = {name for name in filenames if _json_stem(name) in stems}
        for name in filenames:
            match = _match_media(name, stems)
            if match is None:
                continue
            stem, slide, suffix = match
            kind = "video" if suffix in VIDEO_SUFFIXES else "image"
            media[stem].setdefault(slide, {}).setdefault(kind, folder / name)
            claimed.add(name)
        for name in filenames:
            if name in claimed:
                continue
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.lower().endswith(
                ("_profile_pic.jpg", "_profile_pic.png")
            ):
                rejects.append(Reject(str(folder / name), "missing_metadata", "image with no instaloader JSON"))
            else:
                ignored += 1  # captions .txt, comments, profile pictures, id files...
        for stem, json_name in sorted(stems.items()):
            json_path = folder / json_name
            slides = media[stem]
            try:
                parsed = parse_instaloader_structure(read_instaloader_json(json_path), stem)
            except InvalidPostData as error:
                looks_like_a_post = json_name.endswith(".xz") or _INSTALOADER_DATE_STEM.search(stem)
                if not slides and (error.reason == "not_a_post" or not looks_like_a_post):
                    ignored += 1  # the profile's own JSON, a resume file, an unrelated .json
                    continue
                metadata_files += 1
                rejects.append(Reject(str(json_path), error.reason, str(error)))
                continue
            metadata_files += 1
            post = _Post(parsed.metadata, str(json_path), preferred=True)
            rejects.extend(_collect_instaloader_slides(post, parsed, slides, videos))
            if not slides:
                rejects.append(Reject(str(json_path), "no_images", "Post JSON but no image file next to it"))
                continue
            posts.append(post)
    return posts, rejects, ignored, metadata_files


def _match_media(name: str, stems: dict[str, str]) -> tuple[str, int | None, str] | None:
    """(stem, slide number or None, suffix) when name is ``stem[_N].ext`` of a known stem."""
    lower = name.lower()
    suffix = next((s for s in IMAGE_SUFFIXES + VIDEO_SUFFIXES if lower.endswith(s)), None)
    if suffix is None:
        return None
    base = name[: -len(suffix)]
    if base in stems:
        return base, None, suffix
    slide_match = re.fullmatch(r"(.*)_(\d+)", base)
    if slide_match and slide_match.group(1) in stems:
        return slide_match.group(1), int(slide_match.group(2)), suffix
    return None


def _collect_instaloader_slides(
    post: _Post, parsed: InstaloaderPost, slides: dict[int | None, dict[str, Path]], videos: str
) -> list[Reject]:
    """Fill post.images from the files of one post; reject videos as the mode says."""
    rejects = []
    for slide in sorted(slides, key=lambda s: -1 if s is None else s):
        files = slides[slide]
        # Carousel slides are numbered from 1 on disk; a single image has no suffix.
        index = 0 if slide is None else slide - 1
        known_video = 0 <= index < len(parsed.slide_is_video) and parsed.slide_is_video[index]
        is_video = known_video or "video" in files
        image = files.get("image")
        if is_video and videos == "skip":
            rejects.append(Reject(str(image or files["video"]), "video_skipped", "video post, ingest.videos is skip"))
            continue
        if image is None:
            rejects.append(
                Reject(str(files["video"]), "video_without_thumbnail", "video with no thumbnail image")
            )
            continue
        alt_text = parsed.slide_alt_text[index] if 0 <= index < len(parsed.slide_alt_text) else None
        post.images.append((index, image, parsed.metadata.post_text or alt_text))
    return rejects


# ---------------------------------------------------------------------------------------
# Putting it together


def ingest_posts(
    posts_dir: str | Path,
    format: str = "auto",
    videos: str = "thumbnail",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> IngestResult:
    """Read every post under posts_dir into image records and rejects.

    Every image is fully decoded once (through :func:`load_rgb_image`) so that unreadable,
    truncated and oversized files are rejected here rather than later in a GPU job.
    Duplicate shortcodes keep one post (the one whose folder/file name is the shortcode,
    else the first by path) and reject the others. Raises :class:`IngestError` only when the
    folder is missing/empty or has no known layout; an ingest in which every post is
    rejected still returns, so the caller can write the rejects before failing.
    """
    root = Path(posts_dir)
    if format not in FORMATS:
        raise ValueError(f"ingest format must be one of {FORMATS}, got {format!r}")
    if videos not in VIDEO_MODES:
        raise ValueError(f"ingest videos must be one of {VIDEO_MODES}, got {videos!r}")
    if not root.is_dir():
        raise IngestError(f"posts folder {root} does not exist. {_layout_help(root)}")
    if not any(True for _ in _non_hidden_entries(root)):
        raise IngestError(f"posts folder {root} is empty. {_layout_help(root)}")
    source_format = detect_format(root) if format == "auto" else format
    if source_format == REPORT:
        posts, rejects, ignored, metadata_files = _read_report_posts(root)
    else:
        posts, rejects, ignored, metadata_files = _read_instaloader_posts(root, videos)

    # 1. Decode every image; a post keeps the images that survive.
    for post in posts:
        usable = []
        for index, path, text in post.images:
            problem = _check_image(path, max_image_pixels)
            if problem is None:
                usable.append((index, path, text))
            else:
                rejects.append(problem)
        post.images = usable

    # 2. One post per shortcode, chosen among posts that still have an image.
    kept: dict[str, _Post] = {}
    for post in sorted(
        (p for p in posts if p.images), key=lambda p: (not p.preferred, p.source_path)
    ):
        first = kept.get(post.metadata.shortcode)
        if first is None:
            kept[post.metadata.shortcode] = post
        else:
            rejects.append(
                Reject(
                    post.source_path,
                    "duplicate_shortcode",
                    f"shortcode {post.metadata.shortcode} already ingested from {first.source_path}",
                )
            )

    records = [
        ImageRecord(
            shortcode=post.metadata.shortcode,
            image_index=index,
            image_path=str(path),
            likes_count=post.metadata.likes_count,
            comments_count=post.metadata.comments_count,
            timestamp=post.metadata.timestamp,
            post_text=text,
            source_format=source_format,
        )
        for post in sorted(kept.values(), key=lambda p: (p.metadata.timestamp, p.metadata.shortcode))
        for index, path, text in post.images
    ]
    return IngestResult(
        source_format=source_format,
        records=records,
        rejects=sorted(rejects, key=lambda r: (r.path, r.reason)),
        ignored_files=ignored,
        posts_found=metadata_files,
    )


def _non_hidden_entries(root: Path) -> Iterator[Path]:
    return (entry for entry in root.iterdir() if not entry.name.startswith("."))

"""The report's layout (Figure 3.1): one folder per post with its images and a ``metadata.csv``."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ec_lora_t.data.fields import (
    InvalidPostData,
    clean_text,
    parse_count,
    parse_timestamp,
)
from ec_lora_t.data.ingest.common import (
    IMAGE_SUFFIXES,
    REPORT_COMMENTS_NAME,
    REPORT_METADATA_NAME,
    REPORT_REQUIRED_COLUMNS,
    PostMetadata,
    Reject,
    _natural_key,
    _Post,
    _read_text,
    _walk,
)


def parse_report_metadata(text: str, folder_name: str = "") -> PostMetadata:
    """Parse one post's metadata.csv text (report layout).

    The header is matched case-insensitively; ``shortcode`` falls back to the folder name
    when empty or absent; ``caption`` and ``post_id`` (Instagram's media id, which an
    insights table may be keyed by) are optional. More than one data row is accepted only
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
                post_id=clean_text(values.get("post_id")),
            )
        )
    if any(record != records[0] for record in records[1:]):
        raise InvalidPostData("malformed_metadata", f"{len(records)} data rows that disagree")
    if not records[0].shortcode:
        raise InvalidPostData("malformed_metadata", "no shortcode")
    return records[0]



def parse_report_comments(text: str) -> tuple[str, ...]:
    """The texts of a post's comments.csv: one comment per row in a ``text`` (or ``comment``) column."""
    try:
        rows = list(csv.DictReader(io.StringIO(text.removeprefix("\ufeff"))))
    except csv.Error as error:
        raise InvalidPostData("malformed_metadata", f"not valid CSV ({error})") from None
    if not rows:
        return ()
    columns = {str(name).strip().lower(): name for name in rows[0] if name is not None}
    column = columns.get("text") or columns.get("comment")
    if column is None:
        raise InvalidPostData("malformed_metadata", f"no text or comment column; header is {list(rows[0])}")
    return tuple(text for row in rows if (text := clean_text(row.get(column))) is not None)


def _read_report_posts(root: Path) -> tuple[list[_Post], list[Reject], int, int]:
    """(posts, rejects, ignored files, metadata files found) of a report-layout tree."""
    posts: list[_Post] = []
    rejects: list[Reject] = []
    ignored = metadata_files = 0
    for folder, filenames in _walk(root):
        image_names = [f for f in filenames if f.lower().endswith(IMAGE_SUFFIXES)]
        other_names = [
            f for f in filenames if f not in (REPORT_METADATA_NAME, REPORT_COMMENTS_NAME) and f not in image_names
        ]
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
        post = _Post(
            metadata=metadata,
            source_path=str(folder),
            preferred=folder.name == metadata.shortcode,
            images=[(index, folder / name, metadata.post_text) for index, name in enumerate(image_names)],
        )
        if REPORT_COMMENTS_NAME in filenames:
            try:
                post.comments = parse_report_comments(_read_text(folder / REPORT_COMMENTS_NAME))
            except InvalidPostData as error:
                post.comment_problem = (str(folder / REPORT_COMMENTS_NAME), str(error))
        posts.append(post)
    return posts, rejects, ignored, metadata_files

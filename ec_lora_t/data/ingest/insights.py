"""An insights table (a business account's export, CSV or Parquet) joined to the ingested posts.

Instagram's professional dashboard and Meta Business Suite export one row per post with
columns such as ``Post ID, Permalink, Publish time, Reach, Likes, Comments, Shares, Saves,
Views``. Headers are matched case-insensitively, with spaces, underscores and hyphens alike
(:data:`SIGNAL_ALIASES`, :data:`KEY_ALIASES`); any other column whose every filled cell is a
number becomes a signal under its snake_case name (``Profile visits`` -> ``profile_visits``).

A row is matched to a post by its shortcode, else by the shortcode in its permalink
(``https://www.instagram.com/p/<shortcode>/``), else by its post id: the id instaloader saved
or a ``post_id`` column of metadata.csv, or the media id a shortcode encodes. Nothing here
stops the run: rows that match no post, posts with no row, duplicate keys and cells that are
not numbers each become a :class:`SignalIssue` naming the file and line (or the post).
"""

from __future__ import annotations

import base64
import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from ec_lora_t.data.fields import InvalidPostData, clean_text, parse_signal_value

INSIGHTS_SUFFIXES = (".csv", ".parquet")
# Canonical signal -> header spellings (after _header_key: lower case, words split by one space).
SIGNAL_ALIASES = {
    "likes": ("likes", "like count", "likes count", "like", "post likes"),
    "comments": ("comments", "comment count", "comments count", "post comments"),
    "saves": ("saves", "saved", "save count", "saves count", "post saves"),
    "shares": ("shares", "share count", "shares count", "post shares"),
    "reach": ("reach", "accounts reached", "post reach", "reached"),
    "impressions": ("impressions", "post impressions"),
    "views": ("views", "plays", "video views", "view count", "views count", "video plays", "post views"),
}
KEY_ALIASES = {
    "shortcode": ("shortcode", "short code", "code", "post shortcode"),
    "permalink": ("permalink", "post link", "link", "url", "post url", "permalink url"),
    "post_id": ("post id", "media id", "ig media id", "instagram media id", "id", "post pk", "pk"),
}
ISSUE_REASONS = (
    "unmatched_row",  # a row whose key names no ingested post
    "no_insights_row",  # an ingested post that no row names
    "duplicate_key",  # a second row for a post already matched (the first is kept)
    "non_numeric",  # a signal cell that is not a non-negative number (left absent)
    "duplicate_column",  # two headers that mean the same signal (the first is read)
    "no_key",  # a row with no shortcode, permalink or post id
    "malformed_comments",  # a comments file that cannot be read
)
_PERMALINK = re.compile(r"instagram\.com/(?:[^/?#]+/)?(?:p|reel|reels|tv)/([A-Za-z0-9_-]+)")
_SHORTCODE_ALPHABET = b"-_"


class InsightsError(ValueError):
    """The insights table cannot be read at all (missing, not CSV/Parquet, no key column)."""


@dataclass(frozen=True)
class SignalIssue:
    location: str  # file:line (CSV), file:row N (Parquet), or the post's source path
    shortcode: str | None
    reason: str
    detail: str


@dataclass(frozen=True)
class InsightsRow:
    location: str
    keys: dict[str, str]  # shortcode / permalink / post_id -> cell text
    values: dict[str, float]  # signal -> value (absent when the cell was empty or not a number)


@dataclass
class InsightsTable:
    path: str
    signals: list[str]  # canonical and extra signal names, in column order
    rows: list[InsightsRow] = field(default_factory=list)
    issues: list[SignalIssue] = field(default_factory=list)


def _header_key(header: Any) -> str:
    return " ".join(re.split(r"[^0-9a-z]+", str(header).lower())).strip()


def _snake(header_key: str) -> str:
    name = header_key.replace(" ", "_")
    return name if re.fullmatch(r"[a-z][a-z0-9_]*", name) else f"x_{name}"


def mediaid_to_shortcode(mediaid: int) -> str:
    """The shortcode of an Instagram media id (instaloader's ``Post.mediaid_to_shortcode``)."""
    if mediaid < 0 or mediaid.bit_length() > 72:
        raise ValueError(f"{mediaid} is not a media id")
    encoded = base64.b64encode(mediaid.to_bytes(9, "big"), _SHORTCODE_ALPHABET).decode()
    return encoded.lstrip("A") or "A"


def shortcode_of_permalink(link: str) -> str | None:
    match = _PERMALINK.search(link)
    return match.group(1) if match else None


def _csv_rows(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(file:line, cells) of every non-empty CSV row; the first is the header."""
    data = path.read_bytes()
    # Excel's "CSV UTF-8" starts with a BOM; some Meta exports are UTF-16 with tabs.
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        raise InsightsError(f"{path}: not UTF-8 or UTF-16 text ({error})") from None
    first_line = text.split("\n", 1)[0]
    delimiter = max(",;\t", key=first_line.count)
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        for cells in reader:
            if any(cell.strip() for cell in cells):
                yield f"{path}:{reader.line_num}", cells
    except csv.Error as error:
        raise InsightsError(f"{path}:{reader.line_num}: not valid CSV ({error})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, list[Any]]]:
    try:
        frame = pd.read_parquet(path)
    except Exception as error:  # pyarrow raises several types for a file that is not Parquet
        raise InsightsError(f"{path}: not a readable Parquet file ({error})") from None
    yield f"{path}:header", list(frame.columns)
    for number, cells in enumerate(frame.itertuples(index=False, name=None), start=1):
        yield f"{path}:row {number}", list(cells)


def read_insights(path: str | Path) -> InsightsTable:
    """Read an insights table; cells that are not numbers become issues, not errors."""
    path = Path(path)
    if not path.is_file():
        raise InsightsError(f"insights table {path} does not exist")
    if path.suffix.lower() not in INSIGHTS_SUFFIXES:
        raise InsightsError(f"insights table {path}: expected a .csv or .parquet file")
    rows = _csv_rows(path) if path.suffix.lower() == ".csv" else _parquet_rows(path)
    try:
        header_location, header = next(rows)
    except StopIteration:
        raise InsightsError(f"insights table {path} is empty") from None
    table = InsightsTable(path=str(path), signals=[])

    # 1. Which column is which key and which signal.
    keys: dict[str, int] = {}
    signal_columns: dict[str, int] = {}
    unknown: dict[str, int] = {}
    for index, raw in enumerate(header):
        key = _header_key(raw)
        role = next((name for name, aliases in KEY_ALIASES.items() if key in aliases), None)
        if role is not None:
            keys.setdefault(role, index)
            continue
        signal = next((name for name, aliases in SIGNAL_ALIASES.items() if key in aliases), None)
        if signal is None:
            if key and not key.endswith(" id"):  # Account ID and the like are numbers, not signals
                unknown.setdefault(_snake(key), index)
            continue
        if signal in signal_columns:
            table.issues.append(SignalIssue(header_location, None, "duplicate_column",
                                            f"column {raw!r} is {signal} again; read {header[signal_columns[signal]]!r}"))
            continue
        signal_columns[signal] = index
    if not keys:
        raise InsightsError(
            f"insights table {path}: no key column; its header is {[str(h) for h in header]}, and a row is matched "
            "to a post by a Shortcode, Permalink or Post ID column"
        )
    body = list(rows)

    # 2. Other columns are signals when every filled cell is a number (dates and texts are not).
    for name, index in unknown.items():
        if name in signal_columns:
            continue
        cells = [cells[index] for _, cells in body if index < len(cells)]
        try:
            filled = [parse_signal_value(cell) for cell in cells]
        except InvalidPostData:
            continue
        if any(value is not None for value in filled):
            signal_columns[name] = index
    table.signals = list(signal_columns)

    # 3. The rows.
    for location, cells in body:
        row_keys = {}
        for role, index in keys.items():
            text = clean_text(cells[index]) if index < len(cells) else None
            if text is not None:
                # A spreadsheet turns a numeric id into 1.79e+16 or 17912345678901234.0: keep the digits.
                row_keys[role] = re.sub(r"\.0+$", "", text) if role == "post_id" else text
        values = {}
        for signal, index in signal_columns.items():
            cell = cells[index] if index < len(cells) else None
            try:
                value = parse_signal_value(cell, f"{header[index]!s}")
            except InvalidPostData as error:
                table.issues.append(SignalIssue(location, row_keys.get("shortcode"), "non_numeric", str(error)))
                continue
            if value is not None:
                values[signal] = value
        table.rows.append(InsightsRow(location, row_keys, values))
    return table


@dataclass(frozen=True)
class PostKey:
    """What an ingested post can be found by."""

    shortcode: str
    post_id: str | None
    source_path: str


def match_insights(table: InsightsTable, posts: list[PostKey]) -> tuple[dict[str, InsightsRow], list[SignalIssue]]:
    """Each post's row (shortcode -> row) and the issues of the join, in file order then post order."""
    by_shortcode = {post.shortcode: post for post in posts}
    by_post_id = {post.post_id: post for post in posts if post.post_id}
    matched: dict[str, InsightsRow] = {}
    issues = list(table.issues)
    for row in table.rows:
        shortcode = _row_shortcode(row, by_shortcode, by_post_id)
        if shortcode is None:
            if not row.keys:
                issues.append(SignalIssue(row.location, None, "no_key", "row has no shortcode, permalink or post id"))
                continue
            hint = ""
            if set(row.keys) == {"post_id"}:
                hint = ("; a Graph API media id cannot be turned into a shortcode: add a Permalink or Shortcode "
                        "column, or a post_id column to metadata.csv")
            issues.append(SignalIssue(row.location, None, "unmatched_row", f"{_describe_keys(row)} names no ingested post{hint}"))
            continue
        first = matched.get(shortcode)
        if first is not None:
            issues.append(SignalIssue(row.location, shortcode, "duplicate_key",
                                      f"a second row for post {shortcode}; kept {first.location}"))
            continue
        matched[shortcode] = row
    for post in posts:
        if post.shortcode not in matched:
            issues.append(SignalIssue(post.source_path, post.shortcode, "no_insights_row",
                                      f"post {post.shortcode} has no row in {table.path}"))
    return matched, issues


def _row_shortcode(row: InsightsRow, by_shortcode: dict[str, PostKey], by_post_id: dict[str, PostKey]) -> str | None:
    candidates = []
    if "shortcode" in row.keys:
        candidates.append(row.keys["shortcode"])
    if "permalink" in row.keys:
        candidates.append(shortcode_of_permalink(row.keys["permalink"]))
    post_id = row.keys.get("post_id")
    if post_id is not None:
        if post_id in by_post_id:
            candidates.append(by_post_id[post_id].shortcode)
        media_id = post_id.split("_")[0]  # the private API writes <media id>_<owner id>
        if media_id.isdigit():
            try:
                candidates.append(mediaid_to_shortcode(int(media_id)))
            except ValueError:
                pass
    return next((code for code in candidates if code in by_shortcode), None)


def _describe_keys(row: InsightsRow) -> str:
    return ", ".join(f"{role} {value!r}" for role, value in row.keys.items())

"""Reading a posts folder: detect its layout, read every post, decode every image, keep one post per shortcode."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ec_lora_t.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageRejected,
    load_rgb_image,
)
from ec_lora_t.data.ingest.common import (
    FORMATS,
    INSTALOADER,
    REPORT,
    REPORT_METADATA_NAME,
    VIDEO_MODES,
    ImageRecord,
    IngestError,
    IngestResult,
    Reject,
    SignalRecord,
    _Post,
    _walk,
)
from ec_lora_t.data.ingest.insights import (
    ISSUE_REASONS,
    InsightsError,
    PostKey,
    SignalIssue,
    match_insights,
    read_insights,
)
from ec_lora_t.data.ingest.instaloader import (
    _INSTALOADER_DATE_STEM,
    _json_stem,
    _read_instaloader_posts,
)
from ec_lora_t.data.ingest.report import _read_report_posts


def _check_image(path: Path, max_image_pixels: int | None) -> Reject | None:
    try:
        load_rgb_image(path, max_image_pixels)
    except ImageRejected as rejected:
        return Reject(str(path), rejected.reason, rejected.detail)
    return None


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



def ingest_posts(
    posts_dir: str | Path,
    format: str = "auto",
    videos: str = "thumbnail",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    insights: str | Path | None = None,
) -> IngestResult:
    """Read every post under posts_dir into image records and rejects.

    Every image is fully decoded once (through :func:`load_rgb_image`) so that unreadable,
    truncated and oversized files are rejected here rather than later in a GPU job.
    Duplicate shortcodes keep one post (the one whose folder/file name is the shortcode,
    else the first by path) and reject the others. Raises :class:`IngestError` only when the
    folder is missing/empty or has no known layout (or the `insights` table cannot be read
    at all); an ingest in which every post is rejected still returns, so the caller can write
    the rejects before failing.

    Signals: every post's likes and comments, then, with an `insights` table (CSV or Parquet,
    :mod:`ec_lora_t.data.ingest.insights`), its row's numbers; where both give likes or
    comments the table's win (the account's own figures; a public download may see rounded or
    hidden counts). Comments' texts come where the export has them.
    """
    # 1. Read the posts of the layout found (or asked for).
    source_format, posts, rejects, ignored, metadata_files = _read_posts(Path(posts_dir), format, videos)
    # 2. Decode every image; a post keeps the images that survive.
    rejects += _drop_unreadable_images(posts, max_image_pixels)
    # 3. One post per shortcode, chosen among posts that still have an image.
    kept, duplicates = _one_post_per_shortcode(posts)
    rejects += duplicates

    ordered = sorted(kept.values(), key=lambda p: (p.metadata.timestamp, p.metadata.shortcode))
    # 4. Signals, comment texts, and the insights table's numbers joined by shortcode / id / permalink.
    signals, comments, issues, insights_metrics = _signals_and_comments(ordered, insights)
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
        for post in ordered
        for index, path, text in post.images
    ]
    return IngestResult(
        source_format=source_format,
        records=records,
        rejects=sorted(rejects, key=lambda r: (r.path, r.reason)),
        ignored_files=ignored,
        posts_found=metadata_files,
        signals=signals,
        comments=comments,
        signal_issues=issues,
        insights_metrics=insights_metrics,
    )


def _read_posts(root: Path, format: str, videos: str) -> tuple[str, list[_Post], list[Reject], int, int]:
    """(source format, posts, rejects, ignored files, metadata files found) of the folder `root`."""
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
        return (source_format, *_read_report_posts(root))
    return (source_format, *_read_instaloader_posts(root, videos))


def _drop_unreadable_images(posts: list[_Post], max_image_pixels: int) -> list[Reject]:
    """Decode every image of every post; each post keeps the ones that decode. Returns the rejects."""
    rejects = []
    for post in posts:
        usable = []
        for index, path, text in post.images:
            problem = _check_image(path, max_image_pixels)
            if problem is None:
                usable.append((index, path, text))
            else:
                rejects.append(problem)
        post.images = usable
    return rejects


def _one_post_per_shortcode(posts: list[_Post]) -> tuple[dict[str, _Post], list[Reject]]:
    """The posts with an image, one per shortcode (the preferred one, else the first by path),
    and a reject for each other."""
    kept: dict[str, _Post] = {}
    rejects = []
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
    return kept, rejects


def _signals_and_comments(
    posts: list[_Post], insights: str | Path | None
) -> tuple[list[SignalRecord], list[tuple[str, int, str]], list[SignalIssue], dict | None]:
    """(signal rows, comment rows, issues, insights metrics or None) of the kept posts."""
    table = None
    if insights is not None:
        try:
            table = read_insights(insights)
        except InsightsError as error:
            raise IngestError(str(error)) from None
    issues: list[SignalIssue] = []
    matched = {}
    if table is not None:
        keys = [PostKey(p.metadata.shortcode, p.metadata.post_id, p.source_path) for p in posts]
        matched, issues = match_insights(table, keys)
    signals, comments = [], []
    for post in posts:
        shortcode = post.metadata.shortcode
        values = {"likes": (float(post.metadata.likes_count), post.source_path),
                  "comments": (float(post.metadata.comments_count), post.source_path)}
        row = matched.get(shortcode)
        if row is not None:
            values.update({signal: (value, row.location) for signal, value in row.values.items()})
        signals.extend(SignalRecord(shortcode, name, value, source) for name, (value, source) in values.items())
        comments.extend((shortcode, index, text) for index, text in enumerate(post.comments))
        if post.comment_problem is not None:
            issues.append(SignalIssue(post.comment_problem[0], shortcode, "malformed_comments", post.comment_problem[1]))
    metrics = None
    if table is not None:
        by_reason = {reason: sum(1 for i in issues if i.reason == reason) for reason in ISSUE_REASONS}
        metrics = {
            "rows": len(table.rows),
            "posts_matched": len(matched),
            "issues_by_reason": by_reason,
            # posts that have each signal from the table
            "posts_by_signal": {name: sum(1 for r in matched.values() if name in r.values) for name in table.signals},
        }
    return signals, comments, issues, metrics


def _non_hidden_entries(root: Path) -> Iterator[Path]:
    return (entry for entry in root.iterdir() if not entry.name.startswith("."))

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

Besides the images: a signals table (every post's likes and comments, and with an insights
table, :mod:`ec_lora_t.data.ingest.insights`, a business export's saves, shares, reach...),
and the comments' texts where the export has them (instaloader's ``<stem>_comments.json``, a
report-layout ``comments.csv``), for the sentiment stage.

Bad input never stops the run and never disappears: every file or post that cannot be used
becomes a :class:`Reject` with a reason code from :data:`REJECT_REASONS` and a message.
Images are *not* rewritten: ingest fully decodes each one to prove it is usable, and every
later stage opens images through :func:`load_rgb_image`, which applies the EXIF rotation and
converts palette, RGBA, CMYK, greyscale and 16-bit images to RGB the same way every time.
"""

from ec_lora_t.data.fields import (
    InvalidPostData,
    clean_text,
    parse_count,
    parse_timestamp,
)
from ec_lora_t.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageRejected,
    load_rgb_image,
)
from ec_lora_t.data.ingest.common import (
    FORMATS,
    INSTALOADER,
    REJECT_REASONS,
    REPORT,
    VIDEO_MODES,
    ImageRecord,
    IngestError,
    IngestResult,
    PostMetadata,
    Reject,
    SignalRecord,
)
from ec_lora_t.data.ingest.insights import (
    ISSUE_REASONS,
    KEY_ALIASES,
    SIGNAL_ALIASES,
    InsightsError,
    SignalIssue,
    mediaid_to_shortcode,
    read_insights,
)
from ec_lora_t.data.ingest.instaloader import (
    InstaloaderPost,
    parse_instaloader_comments,
    parse_instaloader_structure,
    read_instaloader_json,
)
from ec_lora_t.data.ingest.posts import detect_format, ingest_posts
from ec_lora_t.data.ingest.report import parse_report_comments, parse_report_metadata
from ec_lora_t.data.schemas import COMMENTS_SCHEMA, POSTS_SCHEMA, REJECTS_SCHEMA, SIGNAL_ISSUES_SCHEMA, SIGNALS_SCHEMA

__all__ = [
    "COMMENTS_SCHEMA", "DEFAULT_MAX_IMAGE_PIXELS", "FORMATS", "INSTALOADER", "ISSUE_REASONS", "KEY_ALIASES",
    "POSTS_SCHEMA", "REJECTS_SCHEMA", "REJECT_REASONS", "REPORT", "SIGNALS_SCHEMA", "SIGNAL_ALIASES",
    "SIGNAL_ISSUES_SCHEMA", "VIDEO_MODES", "ImageRecord", "ImageRejected", "IngestError", "IngestResult",
    "InsightsError", "InstaloaderPost", "InvalidPostData", "PostMetadata", "Reject", "SignalIssue", "SignalRecord",
    "clean_text", "detect_format", "ingest_posts", "load_rgb_image", "mediaid_to_shortcode", "parse_count",
    "parse_instaloader_comments", "parse_instaloader_structure", "parse_report_comments", "parse_report_metadata",
    "parse_timestamp", "read_insights", "read_instaloader_json",
]

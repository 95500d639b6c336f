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
)
from ec_lora_t.data.ingest.instaloader import (
    InstaloaderPost,
    parse_instaloader_structure,
    read_instaloader_json,
)
from ec_lora_t.data.ingest.posts import detect_format, ingest_posts
from ec_lora_t.data.ingest.report import parse_report_metadata
from ec_lora_t.data.schemas import POSTS_SCHEMA, REJECTS_SCHEMA

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS", "FORMATS", "INSTALOADER", "POSTS_SCHEMA", "REJECTS_SCHEMA", "REJECT_REASONS", "REPORT",
    "VIDEO_MODES", "ImageRecord", "ImageRejected", "IngestError", "IngestResult", "InstaloaderPost", "InvalidPostData",
    "PostMetadata", "Reject", "clean_text", "detect_format", "ingest_posts", "load_rgb_image", "parse_count",
    "parse_instaloader_structure", "parse_report_metadata", "parse_timestamp", "read_instaloader_json",
]

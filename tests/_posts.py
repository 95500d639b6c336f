"""Builders of post exports for tests: clean feeds, feeds seeded with every kind of bad
input, and instaloader profile folders written by instaloader's own code (offline).

Reusable from any test::

    from _posts import make_report_feed, make_bad_report_feed, make_instaloader_profile

(tests/ is on sys.path under pytest, as for ec_lora_toys.)
"""

from __future__ import annotations

import csv
import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

# A limit that the test feeds use as ingest.max_image_pixels: 64x64 images pass,
# the "oversized" image (96x96) does not. The forged-header bomb is far above any limit.
TEST_MAX_IMAGE_PIXELS = 64 * 64 * 2

IMAGE_KINDS = (
    "rgb", "palette", "palette_transparent", "rgba", "cmyk", "grey", "grey16", "exif_rotated",
    "truncated", "garbage", "empty", "oversized", "bomb",
)
# Kinds the ingest must accept (normalised by load_rgb_image) and those it must reject.
ACCEPTED_IMAGE_KINDS = ("rgb", "palette", "palette_transparent", "rgba", "cmyk", "grey", "grey16", "exif_rotated")
REJECTED_IMAGE_KINDS = {
    "truncated": "truncated_image",
    "garbage": "unreadable_image",
    "empty": "unreadable_image",
    "oversized": "decompression_bomb",
    "bomb": "decompression_bomb",
}
_PNG_KINDS = ("palette", "palette_transparent", "rgba", "grey16", "bomb")


def image_suffix(kind: str) -> str:
    return ".png" if kind in _PNG_KINDS else ".jpg"


def image_bytes(kind: str = "rgb", size: tuple[int, int] = (48, 32), seed: int = 0) -> bytes:
    """Encoded bytes of a small image of the given kind (see IMAGE_KINDS)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    if kind == "rgb":
        Image.fromarray(rgb).save(buffer, "JPEG", quality=90)
    elif kind == "palette":
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(buffer, "PNG")
    elif kind == "palette_transparent":
        image = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.save(buffer, "PNG", transparency=0)
    elif kind == "rgba":
        alpha = np.full((size[1], size[0], 1), 128, dtype=np.uint8)
        Image.fromarray(np.concatenate([rgb, alpha], axis=2)).save(buffer, "PNG")  # (H, W, 4) -> RGBA
    elif kind == "cmyk":
        Image.fromarray(rgb).convert("CMYK").save(buffer, "JPEG", quality=90)
    elif kind == "grey":
        Image.fromarray(rgb).convert("L").save(buffer, "JPEG", quality=90)
    elif kind == "grey16":
        grey16 = (rgb[..., 0].astype(np.uint16) * 257).astype(np.uint16)
        Image.fromarray(grey16).save(buffer, "PNG")  # uint16 (H, W) -> mode I;16
    elif kind == "exif_rotated":
        return exif_rotated_jpeg(size)
    elif kind == "truncated":
        whole = image_bytes("rgb", size, seed)
        return whole[: len(whole) // 2]
    elif kind == "garbage":
        return b"this is not an image, it only has a .jpg name" * 4
    elif kind == "empty":
        return b""
    elif kind == "oversized":
        side = int(np.ceil(np.sqrt(TEST_MAX_IMAGE_PIXELS))) + 16
        return image_bytes("rgb", (side, side), seed)
    elif kind == "bomb":
        return forged_png_bomb()
    else:
        raise ValueError(f"unknown image kind {kind!r}; known: {IMAGE_KINDS}")
    return buffer.getvalue()


def exif_rotated_jpeg(size: tuple[int, int] = (48, 32)) -> bytes:
    """A landscape JPEG stored sideways with EXIF Orientation 6 (display rotated 90° CW).

    Left half red, right half blue as stored, so the upright image is red on top.
    """
    width, height = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def forged_png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb that
    costs nothing to write (the header is read, the data never)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    # IHDR follows the 8-byte signature: length(4) type(4) width(4) height(4) ... crc(4)
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


def write_metadata_csv(folder: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> Path:
    columns = list(columns or rows[0].keys())
    path = folder / "metadata.csv"
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_report_post(
    root: Path,
    folder: str,
    *,
    shortcode: str | None = None,
    likes: Any = 100,
    comments: Any = 5,
    timestamp: Any = 1_714_560_000,
    caption: str | None = "a person on a city street",
    images: Sequence[str] = ("rgb",),
    seed: int = 0,
) -> Path:
    """One post folder of the report layout: images named 0.jpg, 1.png ... + metadata.csv."""
    post_dir = root / folder
    post_dir.mkdir(parents=True, exist_ok=True)
    for index, kind in enumerate(images):
        (post_dir / f"{index}{image_suffix(kind)}").write_bytes(image_bytes(kind, seed=seed + index))
    row = {
        "shortcode": folder if shortcode is None else shortcode,
        "likes_count": likes,
        "comments_count": comments,
        "timestamp": timestamp,
    }
    columns = ["shortcode", "likes_count", "comments_count", "timestamp"]
    if caption is not None:
        row["caption"] = caption
        columns.append("caption")
    write_metadata_csv(post_dir, [row], columns)
    return post_dir


@dataclass
class SeededFeed:
    """A post export on disk and what a correct ingest must make of it."""

    root: Path
    valid_shortcodes: set[str] = field(default_factory=set)
    valid_images: int = 0
    expected_rejects: dict[str, str] = field(default_factory=dict)  # path -> reason
    max_image_pixels: int = TEST_MAX_IMAGE_PIXELS


def make_report_feed(root: Path, num_posts: int = 6, carousel_every: int = 3, seed: int = 0) -> SeededFeed:
    """A clean report-layout feed: num_posts posts a week apart, every third a 2-image carousel."""
    feed = SeededFeed(root)
    start = 1_704_067_200  # 2024-01-01T00:00:00Z
    for i in range(num_posts):
        shortcode = f"Post{i:04d}"
        images = ("rgb", "rgb") if carousel_every and i % carousel_every == carousel_every - 1 else ("rgb",)
        write_report_post(
            root,
            shortcode,
            likes=100 + 37 * i,
            comments=3 + i,
            timestamp=start + i * 7 * 86_400,
            caption=f"a person wearing outfit number {i}",
            images=images,
            seed=seed + 10 * i,
        )
        feed.valid_shortcodes.add(shortcode)
        feed.valid_images += len(images)
    return feed


def make_bad_report_feed(root: Path) -> SeededFeed:
    """A report-layout feed seeded with every kind of bad input the ingest must survive.

    Accepted and normalised (must reach the table): palette, transparent palette, RGBA,
    CMYK, greyscale, 16-bit greyscale, EXIF-rotated images; timestamps in milliseconds and
    as ISO strings; counts with thousands separators or written as 12.0; a carousel with
    one good and one truncated slide (the good slide stays). Rejected, each with its reason:
    unreadable, empty, truncated, oversized and forged-bomb images; missing, malformed,
    empty, header-only and non-UTF-8 metadata; negative, fractional and non-numeric counts;
    missing/garbage timestamps; a duplicate shortcode; a post without images.
    """
    feed = SeededFeed(root)

    def good(folder: str, n_images: int = 1, **kwargs: Any) -> Path:
        post_dir = write_report_post(root, folder, **kwargs)
        feed.valid_shortcodes.add(kwargs.get("shortcode") or folder)
        feed.valid_images += n_images
        return post_dir

    # 1. Accepted oddities.
    good("Clean01", timestamp=1_704_067_200)
    for i, kind in enumerate(ACCEPTED_IMAGE_KINDS):
        good(f"Kind{kind}", timestamp=1_704_067_200 + 86_400 * (i + 1), images=(kind,), seed=i)
    good("Millis01", timestamp=1_714_560_000_000)
    good("IsoTime01", timestamp="2024-05-01T12:30:00Z")
    good("IsoTime02", timestamp="2024-05-02 08:00:00+02:00")
    good("Thousands01", likes="12,345", comments="1,024")
    good("FloatCount01", likes="120.0", comments=7.0)
    good("NoCaption01", caption=None)
    carousel = good("Carousel01", n_images=2, images=("rgb", "truncated", "rgb"))
    feed.expected_rejects[str(carousel / "1.jpg")] = "truncated_image"

    # 2. Images that must be rejected (each post has only the bad image).
    for kind, reason in REJECTED_IMAGE_KINDS.items():
        post_dir = write_report_post(root, f"Bad{kind}", images=(kind,))
        feed.expected_rejects[str(post_dir / f"0{image_suffix(kind)}")] = reason

    # 3. Metadata that must be rejected.
    no_meta = root / "NoMetadata01"
    no_meta.mkdir(parents=True)
    (no_meta / "0.jpg").write_bytes(image_bytes("rgb"))
    feed.expected_rejects[str(no_meta)] = "missing_metadata"

    def bad_metadata(folder: str, content: bytes, reason: str) -> None:
        post_dir = write_report_post(root, folder)
        (post_dir / "metadata.csv").write_bytes(content)
        feed.expected_rejects[str(post_dir / "metadata.csv")] = reason

    bad_metadata("MissingColumn01", b"shortcode,likes_count,timestamp\nMissingColumn01,5,1714560000\n", "malformed_metadata")
    bad_metadata("EmptyMeta01", b"", "malformed_metadata")
    bad_metadata("HeaderOnly01", b"shortcode,likes_count,comments_count,timestamp\n", "malformed_metadata")
    bad_metadata("NotUtf801", b"shortcode,likes_count,comments_count,timestamp\n\xff\xfe\x00,1,2,3\n", "malformed_metadata")
    bad_metadata("RaggedRow01", b"shortcode,likes_count,comments_count,timestamp\nRaggedRow01,1,2\n", "malformed_metadata")

    def bad_field(folder: str, reason: str, **kwargs: Any) -> None:
        post_dir = write_report_post(root, folder, **kwargs)
        feed.expected_rejects[str(post_dir / "metadata.csv")] = reason

    bad_field("NegativeLikes01", "invalid_count", likes=-5)
    bad_field("NegativeComments01", "invalid_count", comments="-1")
    bad_field("TextLikes01", "invalid_count", likes="lots")
    bad_field("FractionLikes01", "invalid_count", likes=12.5)
    bad_field("MissingLikes01", "invalid_count", likes="")
    bad_field("GarbageTime01", "invalid_timestamp", timestamp="last tuesday")
    bad_field("MissingTime01", "invalid_timestamp", timestamp="")
    bad_field("NegativeTime01", "invalid_timestamp", timestamp=-100)

    # 4. Duplicate shortcode: the folder named like the shortcode wins, the copy is rejected.
    good("DupCode01", timestamp=1_714_000_000)
    copy = write_report_post(root, "DupCode01-copy", shortcode="DupCode01", timestamp=1_714_000_000)
    feed.expected_rejects[str(copy)] = "duplicate_shortcode"

    # 5. Metadata with no image.
    lonely = root / "NoImages01"
    lonely.mkdir()
    write_metadata_csv(lonely, [{"shortcode": "NoImages01", "likes_count": 1, "comments_count": 0, "timestamp": 1_714_560_000}])
    feed.expected_rejects[str(lonely)] = "no_images"
    return feed


# ---------------------------------------------------------------------------------------
# instaloader profiles, written by instaloader itself


@dataclass
class InstaloaderPostSpec:
    """A post to have instaloader save. ``slides`` lists image kinds (see IMAGE_KINDS) or
    ``"video"``; more than one slide makes a carousel (GraphSidecar)."""

    shortcode: str
    likes: int = 100
    comments: int = 5
    taken_at: int = 1_714_560_000  # epoch seconds, as Instagram sends them
    caption: str | None = "a person on a city street #ootd"
    alt_text: str | None = None
    slides: Sequence[str] = ("rgb",)


def _media_url(shortcode: str, index: int, kind: str) -> str:
    suffix = "mp4" if kind == "video" else image_suffix(kind)[1:]
    return f"https://example.invalid/{shortcode}/{index}.{suffix}"


def _graphql_node(spec: InstaloaderPostSpec, profile: str) -> dict[str, Any]:
    """The node of an anonymous (GraphQL) download."""
    is_sidecar = len(spec.slides) > 1
    first_is_video = spec.slides[0] == "video"
    node: dict[str, Any] = {
        "__typename": "GraphSidecar" if is_sidecar else ("GraphVideo" if first_is_video else "GraphImage"),
        "shortcode": spec.shortcode,
        "id": str(zlib.crc32(spec.shortcode.encode())),
        "is_video": first_is_video and not is_sidecar,
        "taken_at_timestamp": spec.taken_at,
        "display_url": _media_url(spec.shortcode, 0, "rgb" if first_is_video else spec.slides[0]),
        "edge_media_preview_like": {"count": spec.likes},
        "edge_media_to_comment": {"count": spec.comments},
        "edge_media_to_caption": {"edges": [{"node": {"text": spec.caption}}] if spec.caption else []},
        "accessibility_caption": spec.alt_text,
        "owner": {"id": "1", "username": profile},
    }
    if first_is_video and not is_sidecar:
        node["video_url"] = _media_url(spec.shortcode, 0, "video")
    if is_sidecar:
        children = []
        for index, kind in enumerate(spec.slides):
            child = {
                "is_video": kind == "video",
                "display_url": _media_url(spec.shortcode, index, "rgb" if kind == "video" else kind),
                "accessibility_caption": spec.alt_text,
            }
            if kind == "video":
                child["video_url"] = _media_url(spec.shortcode, index, "video")
            children.append({"node": child})
        node["edge_sidecar_to_children"] = {"edges": children}
    return node


def _iphone_struct(spec: InstaloaderPostSpec) -> dict[str, Any]:
    """The media item of a logged-in download (the iPhone API), for Post.from_iphone_struct."""

    def item(index: int, kind: str) -> dict[str, Any]:
        media = {
            "media_type": 2 if kind == "video" else 1,
            "image_versions2": {"candidates": [{"url": _media_url(spec.shortcode, index, "rgb" if kind == "video" else kind)}]},
        }
        if kind == "video":
            media["video_versions"] = [{"url": _media_url(spec.shortcode, index, "video")}]
        return media

    is_sidecar = len(spec.slides) > 1
    struct_ = {
        "code": spec.shortcode,
        "pk": str(zlib.crc32(spec.shortcode.encode())),
        "media_type": 8 if is_sidecar else item(0, spec.slides[0])["media_type"],
        "taken_at": spec.taken_at,
        "caption": {"text": spec.caption} if spec.caption else None,
        "has_liked": False,
        "like_count": spec.likes,
        "comment_count": spec.comments,
        "accessibility_caption": spec.alt_text,
        **{k: v for k, v in item(0, spec.slides[0]).items() if k != "media_type"},
    }
    if is_sidecar:
        struct_["carousel_media"] = [item(i, kind) for i, kind in enumerate(spec.slides)]
    return struct_


def make_instaloader_profile(
    root: Path, profile: str, posts: Sequence[InstaloaderPostSpec], logged_in: bool = False
) -> Path:
    """Have instaloader's own ``Instaloader.download_post`` save posts into root/profile.

    Nothing goes over the network: the instance's ``context.get_raw`` is replaced by a
    function that serves image bytes chosen by URL. Everything else (file naming, carousel
    suffixes, video thumbnails, caption .txt, the ``.json.xz`` metadata through
    ``save_structure_to_file``) is instaloader's code. ``logged_in`` builds the posts
    through ``Post.from_iphone_struct``, which gives the logged-in node schema.
    """
    import instaloader
    import requests

    loader = instaloader.Instaloader(
        dirname_pattern=str(root / "{target}"), quiet=True, download_videos=True, save_metadata=True
    )
    served: dict[str, bytes] = {}

    def get_raw(url: str) -> requests.Response:
        response = requests.Response()
        response.status_code = 200
        response.url = url
        kind_suffix = url.rsplit(".", 1)[-1]
        response.headers["Content-Type"] = {"mp4": "video/mp4", "png": "image/png"}.get(kind_suffix, "image/jpeg")
        response.raw = io.BytesIO(served[url])
        return response

    loader.context.get_raw = get_raw
    for n, spec in enumerate(posts):
        for index, kind in enumerate(spec.slides):
            if kind == "video":
                served[_media_url(spec.shortcode, index, "video")] = b"\x00\x00\x00\x18ftypmp42 fake video"
                served[_media_url(spec.shortcode, index, "rgb")] = image_bytes("rgb", seed=n)
            else:
                served[_media_url(spec.shortcode, index, kind)] = image_bytes(kind, seed=n + index)
        if logged_in:
            post = instaloader.Post.from_iphone_struct(loader.context, _iphone_struct(spec))
        else:
            post = instaloader.Post(loader.context, _graphql_node(spec, profile))
        loader.download_post(post, target=profile)
    return root / profile

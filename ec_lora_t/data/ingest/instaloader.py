"""instaloader's layout: ``<profile>/<stem>.json.xz`` per post next to ``<stem>[_N].jpg``."""

from __future__ import annotations

import json
import lzma
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ec_lora_t.data.fields import (
    InvalidPostData,
    clean_text,
    parse_count,
    parse_timestamp,
)
from ec_lora_t.data.ingest.common import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    PostMetadata,
    Reject,
    _Post,
    _walk,
)

# instaloader's default filename pattern: {date_utc}_UTC, dates as %Y-%m-%d_%H-%M-%S.
_INSTALOADER_DATE_STEM = re.compile(r"(\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2})_UTC$")


def _is_instaloader_json(name: str) -> bool:
    return name.endswith((".json.xz", ".json")) and not name.endswith("_comments.json")



def _json_stem(name: str) -> str | None:
    for suffix in (".json.xz", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None



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

    raw_id = _first_present(node.get("id"), iphone.get("pk"))
    return InstaloaderPost(
        metadata=PostMetadata(
            shortcode=shortcode,
            likes_count=parse_count(likes, "likes count"),
            comments_count=parse_count(comments, "comments count"),
            timestamp=parse_timestamp(taken_at, "date"),
            post_text=clean_text(caption) if isinstance(caption, str) else None,
            post_id=clean_text(str(raw_id)) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else None,
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


def parse_instaloader_comments(structure: Any) -> tuple[str, ...]:
    """The texts of ``<stem>_comments.json`` (``instaloader --comments``): a list of comments,
    each ``{"id", "created_at", "text", "owner", "likes_count", "answers": [replies]}``.
    Replies count as comments; empty texts are left out."""
    if not isinstance(structure, list):
        raise InvalidPostData("malformed_metadata", "not a list of comments")
    texts = []
    for comment in structure:
        if not isinstance(comment, dict):
            raise InvalidPostData("malformed_metadata", f"a comment is not an object ({comment!r:.60})")
        for item in [comment, *(a for a in comment.get("answers") or [] if isinstance(a, dict))]:
            text = clean_text(item.get("text")) if isinstance(item.get("text"), str) else None
            if text is not None:
                texts.append(text)
    return tuple(texts)


def _comments_name(stem: str) -> str:
    return f"{stem}_comments.json"


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
        claimed |= {_comments_name(stem) for stem in stems} & set(filenames)
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
            if _comments_name(stem) in filenames:
                comments_path = folder / _comments_name(stem)
                try:
                    post.comments = parse_instaloader_comments(read_instaloader_json(comments_path))
                except InvalidPostData as error:
                    post.comment_problem = (str(comments_path), str(error))
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

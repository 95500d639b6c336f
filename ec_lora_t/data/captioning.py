"""Captions with style and season tags (report section 3.3).

Each image gets a short description, from BLIP (3.3.1) or from the post's own text, and is
wrapped as ``(<style_tag> style) <caption> (<season>)`` (3.3.2). Seasons come from the
post's UTC month with the report's Northern mapping, or the Southern one on request.

BLIP captions are cached by image content hash (SHA-256 of the file bytes) in an
append-only JSON Lines file per model, so a rerun after adding posts captions only the new
images, and an interrupted run keeps every finished batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import pandas as pd
import pyarrow as pa
from PIL import Image
from ec_lora_t.data.content_keys import ContentCache, file_sha256, model_files_key
from ec_lora_t.data.fields import clean_text
from ec_lora_t.data.images import DEFAULT_MAX_IMAGE_PIXELS, load_rgb_image
from ec_lora_t.data.schemas import CAPTIONS_SCHEMA
from ec_lora_t.data.seasons import season_of
from ec_lora_t.hub import resolve_pretrained
from ec_lora_t.progress import progress_bar

CAPTION_SOURCES = ("blip", "post_text")
# What an image whose post has no usable text gets under source "post_text": its generic
# caption (style tag and season only), nothing (left out and reported), or a BLIP caption.
MISSING_TEXT_CHOICES = ("generic", "skip", "blip")
DEFAULT_BLIP_MODEL = "Salesforce/blip-image-captioning-base"


def format_full_caption(caption: str, style_tag: str, season: str) -> str:
    """``(<style_tag> style) <caption> (<season>)``, the conditioning text of report 3.3.2.

    An empty caption gives the generic ``(<style_tag> style) (<season>)``.
    """
    return " ".join(part for part in (f"({style_tag} style)", caption.strip(), f"({season})") if part)


def caption_from_post_text(text: str | None, max_words: int) -> str | None:
    """A caption from a post's own text, or None when nothing usable is left.

    Hashtags and @mentions are dropped (they name accounts and trends, not what is in the
    picture), whitespace is collapsed, and the text is cut to ``max_words`` words so the
    season tag after it is not truncated away by CLIP's 77-token limit.
    """
    text = clean_text(text)
    if text is None:
        return None
    words = [word for word in re.split(r"\s+", text) if word and not word.startswith(("#", "@"))]
    if not words:
        return None
    return " ".join(words[:max_words])


class Captioner(Protocol):
    """Anything that turns a batch of RGB images into one caption each."""

    def __call__(self, images: Sequence[Image.Image]) -> list[str]: ...


class BlipCaptioner:
    """BLIP image captioning through transformers (report 3.3.1).

    Loads ``BlipForConditionalGeneration`` and ``BlipProcessor`` with ``from_pretrained``
    from a hub id or a local folder; runs on the GPU in fp16 when there is one. The image
    processor is the slow (PIL) one, which needs no torchvision.
    """

    def __init__(self, model: Any, processor: Any, device: str, max_new_tokens: int):
        self.model = model
        self.processor = processor
        self.device = device
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, max_new_tokens: int = 30, device: str | None = None
    ) -> "BlipCaptioner":
        import torch
        import transformers
        from transformers import BlipForConditionalGeneration, BlipProcessor

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        # The PIL image processor needs no torchvision; transformers 5 renamed both options.
        if int(transformers.__version__.split(".")[0]) >= 5:
            processor_options, model_options = {"backend": "pil"}, {"dtype": dtype}
        else:
            processor_options, model_options = {"use_fast": False}, {"torch_dtype": dtype}
        processor = BlipProcessor.from_pretrained(str(name_or_path), **processor_options)
        model = BlipForConditionalGeneration.from_pretrained(str(name_or_path), **model_options)
        model.to(device).eval()
        return cls(model, processor, device, max_new_tokens)

    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, dtype=self.model.dtype)
        with torch.inference_mode():
            generated = self.model.generate(pixel_values=pixel_values, max_new_tokens=self.max_new_tokens)
        return [text.strip() for text in self.processor.batch_decode(generated, skip_special_tokens=True)]


def model_cache_key(name_or_path: str | Path, max_new_tokens: int) -> str:
    """What makes two BLIP captions of one image interchangeable: the model and the length.

    For a local folder the weight files' names, sizes and modification times count too,
    so retraining a model in place does not serve stale captions.
    """
    return model_files_key(name_or_path, max_new_tokens=int(max_new_tokens))


class CaptionCache(ContentCache):
    """Captions by image SHA-256 for one model key, in ``<cache_dir>/blip-<key>.jsonl``."""

    prefix, field = "blip", "caption"


def caption_images(
    images_by_sha: dict[str, str | Path],
    captioner_factory: Callable[[], Captioner],
    cache: CaptionCache,
    batch_size: int = 16,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    progress: bool | None = None,
) -> tuple[dict[str, str], int]:
    """Captions for every ``sha256 -> image path``, generating only those not cached.

    The captioner is built only when something is missing, so a fully cached rerun never
    loads the model. Returns (captions by sha256, number of images captioned now).
    `progress` draws a bar (None: only on a terminal outside CI).
    """
    missing = [(sha, path) for sha, path in images_by_sha.items() if sha not in cache]
    if missing:
        captioner = captioner_factory()
        with progress_bar(total=len(missing), desc="captioning", unit="img", enabled=progress) as bar:
            for start in range(0, len(missing), batch_size):
                batch = missing[start : start + batch_size]
                images = [load_rgb_image(path, max_image_pixels) for _, path in batch]
                texts = captioner(images)
                if len(texts) != len(batch):
                    raise RuntimeError(f"captioner returned {len(texts)} captions for {len(batch)} images")
                cache.add({sha: text for (sha, _), text in zip(batch, texts)})
                bar.update(len(batch))
    return {sha: cache.get(sha) for sha in images_by_sha}, len(missing)


@dataclass
class CaptionResult:
    table: pa.Table
    metrics: dict[str, Any]


def _check_options(posts: pd.DataFrame, source: str, style_tag: str, model, missing_text: str) -> bool:
    """Refuse unusable options with one line; returns whether the captioning model is used."""
    if source not in CAPTION_SOURCES:
        raise ValueError(f"caption source must be one of {CAPTION_SOURCES}, got {source!r}")
    if missing_text not in MISSING_TEXT_CHOICES:
        raise ValueError(f"missing_text must be one of {MISSING_TEXT_CHOICES}, got {missing_text!r}")
    uses_model = source == "blip" or missing_text == "blip"
    if uses_model and not model:
        raise ValueError(f"caption source {source!r} with missing_text {missing_text!r} needs a BLIP model "
                         "(a hub id or a local folder)")
    if not style_tag or not str(style_tag).strip():
        raise ValueError("style_tag must be a non-empty string")
    for column in ("image_path", "timestamp", "post_text"):
        if column not in posts.columns:
            raise ValueError(f"posts table has no column {column!r}; columns: {list(posts.columns)}")
    return uses_model


def _model_captions(
    needs_model: dict[str, str],
    model: str | Path | None,
    cache_dir: str | Path | None,
    batch_size: int,
    max_new_tokens: int,
    captioner_factory: Callable[[], Captioner] | None,
    max_image_pixels: int | None,
    progress: bool | None,
) -> tuple[dict[str, str], int]:
    """Captions by the model of the images `needs_model` (content hash -> path), through the
    cache: (caption by hash, how many the model generated now)."""
    if cache_dir is None:
        raise ValueError("cache_dir is required when captioning with a model")
    cache = CaptionCache(cache_dir, model_cache_key(model, max_new_tokens))
    # The hub is asked only now, and fails in seconds when it cannot be reached.
    factory = captioner_factory or (
        lambda: BlipCaptioner.from_pretrained(resolve_pretrained(model, what="caption.model"), max_new_tokens)
    )
    return caption_images(needs_model, factory, cache, batch_size, max_image_pixels, progress)


def _caption_metrics(source: str, num_images: int, caption_sources: list[str], seasons: list[str], generated: int,
                     cached: int, uncaptioned: list[str]) -> dict[str, Any]:
    return {
        "source": source,
        "images": num_images,
        "captioned": len(caption_sources),
        "from_post_text": caption_sources.count("post_text"),
        "from_model": caption_sources.count("blip"),
        "generic": caption_sources.count("generic"),  # no post text: the generic caption
        # Distinct images (by content hash) the model captioned now / found in the cache.
        "model_generated": generated,
        "model_cache_hits": cached,
        "uncaptioned": len(uncaptioned),
        "uncaptioned_paths": uncaptioned[:20],
        "seasons": {season: seasons.count(season) for season in ("winter", "spring", "summer", "fall")},
    }


def build_captions(
    posts: pd.DataFrame,
    source: str,
    style_tag: str,
    hemisphere: str = "north",
    model: str | Path | None = DEFAULT_BLIP_MODEL,
    missing_text: str = "generic",
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 30,
    captioner_factory: Callable[[], Captioner] | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    progress: bool | None = None,
) -> CaptionResult:
    """Caption every image of the ingest table and tag it with style and season.

    ``source="blip"`` captions every image with the model. ``source="post_text"`` uses the
    post's own text (caption or alt text, see :func:`caption_from_post_text`); an image
    whose post has no usable text gets what ``missing_text`` says, never BLIP unasked:
    ``generic`` its generic caption ``(<style_tag> style) (<season>)`` (caption_source
    "generic"), ``skip`` nothing (left out, counted in the metrics as ``uncaptioned``), ``blip``
    a caption by ``model``. ``captioner_factory`` replaces the BLIP loader (tests count calls
    through it).
    """
    # 1. The options, and whether the model is needed at all.
    uses_model = _check_options(posts, source, style_tag, model, missing_text)

    # 2. The post's own text, where asked for; the model for the images still without one.
    image_paths = posts["image_path"].astype(str).tolist()
    shas = [file_sha256(path) for path in image_paths]
    if source == "post_text":
        texts = [caption_from_post_text(text, max_new_tokens) for text in posts["post_text"].tolist()]
    else:
        texts = [None] * len(image_paths)
    needs_model = {sha: path for sha, path, text in zip(shas, image_paths, texts) if text is None and uses_model}

    blip_captions: dict[str, str] = {}
    generated = 0
    if needs_model:
        blip_captions, generated = _model_captions(needs_model, model, cache_dir, batch_size, max_new_tokens,
                                                   captioner_factory, max_image_pixels, progress)
    cached = len(needs_model) - generated

    # 3. One row per captioned image, with its season and full caption.
    rows: dict[str, list[Any]] = {name: [] for name in CAPTIONS_SCHEMA.names}
    uncaptioned: list[str] = []
    for path, sha, text, timestamp in zip(image_paths, shas, texts, posts["timestamp"]):
        if text is not None:
            caption, caption_source = text, "post_text"
        elif uses_model:
            caption, caption_source = blip_captions.get(sha), "blip"
        elif missing_text == "generic":
            caption, caption_source = "", "generic"
        else:
            caption, caption_source = None, None
        if caption is None or (not caption and caption_source != "generic"):
            uncaptioned.append(path)
            continue
        season = season_of(timestamp, hemisphere)
        rows["image_path"].append(path)
        rows["image_sha256"].append(sha)
        rows["caption"].append(caption)
        rows["season"].append(season)
        rows["full_caption"].append(format_full_caption(caption, style_tag, season))
        rows["caption_source"].append(caption_source)

    # 4. The table and what went into it.
    table = pa.Table.from_pydict(rows, schema=CAPTIONS_SCHEMA)
    metrics = _caption_metrics(source, len(image_paths), rows["caption_source"], rows["season"], generated, cached,
                               uncaptioned)
    return CaptionResult(table=table, metrics=metrics)

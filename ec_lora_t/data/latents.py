"""VAE latents and text embeddings, computed once and cached for training (report 3.6.3, 4.6.2).

The report encodes every image and caption again at every step; the encoders are frozen, so
the result only changes through the VAE's sampling noise. We cache the latent distribution's
mean and standard deviation (already multiplied by the VAE scaling factor) and the text
encoder's hidden states, and training draws `mean + std * noise` per step: the same
distribution the VAE would sample, at none of its cost.

The feed is encoded as a stream of batches (`encode_feed`), so memory does not grow with the
number of posts, and through two content caches (`TensorCache`) that outlive a run: latents
by image content hash, text embeddings by caption text. Adding 100 posts to a feed encodes
those 100 images (and their new captions) and reads everything else from the caches.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import ec_lora_t.data.images as images_module
import ec_lora_t.encoders as encoders_module
from ec_lora_t.data.content_keys import model_files_key, source_sha256, text_sha256
from ec_lora_t.data.images import image_to_pixel_values, load_rgb_image
from ec_lora_t.encoders import encode_images, encode_prompts
from ec_lora_t.models import StableDiffusionComponents
from ec_lora_t.progress import progress_bar

IMAGE_TENSORS = ("latent_mean", "latent_std")


class TensorCache:
    """Tensors by content key in one folder, append-only: `part-00000.safetensors`, ...

    Each `add` writes one new part file (to a temporary name, then renamed), holding the
    tensors `<key>/<name>`; an interrupted run keeps every finished part. Opening the cache
    reads only the parts' headers; a part that cannot be read is passed over.
    """

    _PART = re.compile(r"part-(\d{5,})\.safetensors")

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._part_of: dict[str, Path] = {}
        self._next_part = 0
        if self.folder.is_dir():
            for path in sorted(self.folder.iterdir()):
                match = self._PART.fullmatch(path.name)
                if not match:
                    continue
                self._next_part = max(self._next_part, int(match.group(1)) + 1)
                try:
                    with safe_open(path, framework="pt") as stored:
                        keys = {tensor_name.split("/", 1)[0] for tensor_name in stored.keys()}
                except (SafetensorError, OSError):
                    continue  # a damaged part costs its entries (encoded again), never the run
                self._part_of.update(dict.fromkeys(keys, path))

    def __len__(self) -> int:
        return len(self._part_of)

    def __contains__(self, key: str) -> bool:
        return key in self._part_of

    def get_many(self, keys: Sequence[str], names: Sequence[str]) -> dict[str, torch.Tensor]:
        """`names` tensors of `keys`, stacked in key order: {name: (len(keys), ...)}."""
        rows: dict[str, list[torch.Tensor | None]] = {name: [None] * len(keys) for name in names}
        positions_in_part: dict[Path, list[int]] = {}
        for position, key in enumerate(keys):
            positions_in_part.setdefault(self._part_of[key], []).append(position)
        for path, positions in positions_in_part.items():  # each part file opened once
            with safe_open(path, framework="pt") as stored:
                for position in positions:
                    for name in names:
                        rows[name][position] = stored.get_tensor(f"{keys[position]}/{name}")
        return {name: torch.stack(rows[name]) for name in names}

    def add(self, entries: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Store {key: {name: tensor}} as one new part file."""
        if not entries:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{key}/{name}": tensor.detach().to("cpu").contiguous().clone()
            for key, named in entries.items()
            for name, tensor in named.items()
        }
        path = self.folder / f"part-{self._next_part:05d}.safetensors"
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, partial)
        os.replace(partial, path)
        self._next_part += 1
        for key in entries:
            self._part_of[key] = path


def image_cache_namespace(pretrained: str | Path, resolution: int) -> str:
    """What a cached latent depends on besides the image: the VAE's files, the resolution and
    the preprocessing and encoding code (images.py, encoders.py)."""
    code = source_sha256(images_module, encoders_module)
    return f"images-{model_files_key(pretrained, ('vae',), resolution=int(resolution), code=code)}"


def text_cache_namespace(pretrained: str | Path) -> str:
    """What a cached text embedding depends on besides the text: tokenizer, text encoder, code."""
    code = source_sha256(encoders_module)
    return f"texts-{model_files_key(pretrained, ('text_encoder', 'tokenizer'), code=code)}"


@dataclass
class EncodingStats:
    """What one run encoded (distinct images, distinct texts) and how many rows it served from
    entries that earlier batches or runs had cached."""

    images_encoded: int = 0
    images_from_cache: int = 0
    texts_encoded: int = 0
    texts_from_cache: int = 0


def encode_feed(
    components: StableDiffusionComponents,
    image_paths: Sequence[str],
    image_sha256: Sequence[str],
    captions: Sequence[str],
    generic_captions: Sequence[str],
    engagement_time: np.ndarray,
    *,
    resolution: int,
    image_cache: TensorCache,
    text_cache: TensorCache,
    batch_size: int = 32,
    stats: EncodingStats | None = None,
    progress: bool | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the training tensors of the feed, `batch_size` rows at a time, in input order.

    Each batch: `latent_mean`, `latent_std` (B, 4, h, w), `text_embeddings`,
    `generic_text_embeddings` (B, 77, D), `input_ids`, `generic_input_ids` (B, 77) int64 (the
    captions' token ids, for a text-encoder LoRA), `engagement_time` (B, 2). Only images whose
    content hash and captions whose text are not in the caches are decoded and encoded; at
    most one batch of decoded images is in memory. `stats` (when given) counts what was
    encoded and what came from the caches. `generic_captions` are the "(style) (season)"
    captions used for caption dropout.
    """
    num_rows = len(image_paths)
    if not (num_rows == len(image_sha256) == len(captions) == len(generic_captions) == len(engagement_time)):
        raise ValueError("image_paths, image_sha256, captions, generic_captions and engagement_time must have one entry per row")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stats = stats if stats is not None else EncodingStats()
    engagement_time = np.ascontiguousarray(engagement_time, dtype=np.float32)
    with progress_bar(total=num_rows, desc="latents", unit="img", enabled=progress) as bar:
        for start in range(0, num_rows, batch_size):
            rows = slice(start, start + batch_size)
            shas = list(image_sha256[rows])
            _encode_missing_images(components, list(image_paths[rows]), shas, resolution, image_cache, stats)
            full = list(captions[rows])
            generic = list(generic_captions[rows])
            _encode_missing_texts(components, full + generic, text_cache, stats)
            latents = image_cache.get_many(shas, IMAGE_TENSORS)
            yield {
                **latents,
                "text_embeddings": text_cache.get_many([text_sha256(t) for t in full], ["hidden_states"])["hidden_states"],
                "generic_text_embeddings": text_cache.get_many([text_sha256(t) for t in generic], ["hidden_states"])[
                    "hidden_states"
                ],
                "input_ids": caption_token_ids(components.tokenizer, full),
                "generic_input_ids": caption_token_ids(components.tokenizer, generic),
                "engagement_time": torch.from_numpy(engagement_time[rows].copy()),
            }
            bar.update(len(shas))


def caption_token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """(N, 77) int64 CLIP token ids, padded and cut as `ec_lora_t.encoders.encode_prompts` does:
    the text encoder maps them to the cached `text_embeddings` (tests/test_text_encoder_lora.py)."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(torch.int64)


def _encode_missing_images(
    components: StableDiffusionComponents,
    paths: list[str],
    shas: list[str],
    resolution: int,
    cache: TensorCache,
    stats: EncodingStats,
) -> None:
    missing = {sha: path for sha, path in zip(shas, paths) if sha not in cache}  # one per distinct image
    stats.images_encoded += len(missing)
    stats.images_from_cache += sum(sha not in missing for sha in shas)
    if not missing:
        return
    # Ingest already enforced its size limit; don't apply a second, different one here.
    pixel_values = torch.stack(
        [image_to_pixel_values(load_rgb_image(path, max_image_pixels=None), resolution) for path in missing.values()]
    )
    latent_mean, latent_std = encode_images(components.vae, pixel_values, batch_size=len(missing))
    cache.add({sha: {"latent_mean": mean, "latent_std": std} for sha, mean, std in zip(missing, latent_mean, latent_std)})


def _encode_missing_texts(
    components: StableDiffusionComponents, texts: list[str], cache: TensorCache, stats: EncodingStats
) -> None:
    keys = [text_sha256(text) for text in texts]
    missing = {key: text for key, text in zip(keys, texts) if key not in cache}  # distinct texts, in order
    stats.texts_encoded += len(missing)
    stats.texts_from_cache += sum(key not in missing for key in keys)
    if not missing:
        return
    hidden_states = encode_prompts(components.tokenizer, components.text_encoder, list(missing.values())).float().cpu()
    cache.add({key: {"hidden_states": states} for key, states in zip(missing, hidden_states)})


def generic_caption(full_caption: str, caption: str, season: str) -> str:
    """The full caption without its description: `(<style> style) (<season>)`.

    Cut by position (the description sits just before the season tag), not by searching for
    the description's text, which could also occur inside the style tag. An empty caption
    (caption_source "generic") is already the generic one.
    """
    suffix = " ".join(part for part in (caption.strip(), f"({season})") if part)
    if not full_caption.endswith(suffix):
        raise ValueError(f"full caption {full_caption!r} does not end with its caption and season {suffix!r}")
    return f"{full_caption[: -len(suffix)].strip()} ({season})"

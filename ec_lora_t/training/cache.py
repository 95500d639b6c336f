"""The latent cache as training reads it: load, validate, and serve it in a replayable order.

The latents stage has already run the VAE and the text encoder once per image (report 3.6.3,
4.6.2), so training reads tensors, not images: `latent_mean`, `latent_std`, `text_embeddings`,
`engagement_time` and, for caption dropout, `generic_text_embeddings`. For a text-encoder LoRA
(`train.text_encoder_lora_rank`), whose embeddings change as it trains, it also stores the
captions' token ids, `input_ids` and `generic_input_ids`, which training encodes every step.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.data import Sampler

from ec_lora_t.adapter.ecm import ENGAGEMENT_TIME_DIM
from ec_lora_t.data.latent_shards import load_shard_tensors

CACHE_TENSORS = ("latent_mean", "latent_std", "text_embeddings", "engagement_time")
# Written by the latents stage since caption dropout; older caches train without it.
OPTIONAL_CACHE_TENSORS = ("generic_text_embeddings", "input_ids", "generic_input_ids")
TOKEN_ID_TENSORS = ("input_ids", "generic_input_ids")  # int64; the others are float


@dataclass
class LatentCache:
    """The latents stage's tensors, row i = one training image."""

    latent_mean: torch.Tensor  # (N, 4, h, w) fp32, times the VAE scaling factor
    latent_std: torch.Tensor  # (N, 4, h, w) fp32, times the VAE scaling factor
    text_embeddings: torch.Tensor  # (N, 77, D)
    engagement_time: torch.Tensor  # (N, 2) [normalized_engagement, normalized_time]
    generic_text_embeddings: torch.Tensor | None = None  # (N, 77, D) style tag + season only
    input_ids: torch.Tensor | None = None  # (N, 77) int64, the full captions' CLIP token ids
    generic_input_ids: torch.Tensor | None = None  # (N, 77) int64, the generic captions'

    def tensor_names(self) -> tuple[str, ...]:
        return CACHE_TENSORS + tuple(name for name in OPTIONAL_CACHE_TENSORS if getattr(self, name) is not None)

    def __len__(self) -> int:
        return self.latent_mean.shape[0]

    def fingerprint(self) -> str:
        """sha256 of the tensors: a checkpoint made on other data must not be resumed."""
        digest = hashlib.sha256()
        for name in self.tensor_names():
            tensor = getattr(self, name).detach().to("cpu", torch.float32).contiguous()
            digest.update(name.encode() + str(tuple(tensor.shape)).encode())
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()


def validate_latent_cache(cache: LatentCache, source: str = "latent cache") -> LatentCache:
    """Check shapes and values; `source` (the file) is named in every error."""
    num_images = len(cache)
    if num_images == 0:
        raise ValueError(f"{source}: the cache holds no images")
    if cache.latent_mean.ndim != 4:
        raise ValueError(f"{source}: latent_mean must be (N, C, h, w), got {tuple(cache.latent_mean.shape)}")
    if cache.latent_std.shape != cache.latent_mean.shape:
        raise ValueError(
            f"{source}: latent_std {tuple(cache.latent_std.shape)} differs from "
            f"latent_mean {tuple(cache.latent_mean.shape)}"
        )
    if cache.text_embeddings.ndim != 3 or cache.text_embeddings.shape[0] != num_images:
        raise ValueError(
            f"{source}: text_embeddings must be ({num_images}, L, D), got {tuple(cache.text_embeddings.shape)}"
        )
    if cache.engagement_time.shape != (num_images, ENGAGEMENT_TIME_DIM):
        raise ValueError(
            f"{source}: engagement_time must be ({num_images}, {ENGAGEMENT_TIME_DIM}), "
            f"got {tuple(cache.engagement_time.shape)}"
        )
    generic = cache.generic_text_embeddings
    if generic is not None and generic.shape != cache.text_embeddings.shape:
        raise ValueError(
            f"{source}: generic_text_embeddings {tuple(generic.shape)} differs from "
            f"text_embeddings {tuple(cache.text_embeddings.shape)}"
        )
    _check_token_ids(cache, source)
    for name in cache.tensor_names():
        tensor = getattr(cache, name)
        if name in TOKEN_ID_TENSORS:
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"{source}: {name} must be a float tensor, got {tensor.dtype}")
        bad_rows = (~torch.isfinite(tensor.reshape(num_images, -1))).any(dim=1).nonzero().flatten()
        if len(bad_rows):
            raise ValueError(f"{source}: {name} has non-finite values in rows {bad_rows[:10].tolist()}")
    if (cache.latent_std < 0).any():
        raise ValueError(f"{source}: latent_std has negative values")
    return cache


def _check_token_ids(cache: LatentCache, source: str) -> None:
    for name in TOKEN_ID_TENSORS:
        ids = getattr(cache, name)
        if ids is None:
            continue
        if ids.dtype != torch.int64 or ids.shape != (len(cache), cache.text_embeddings.shape[1]):
            raise ValueError(f"{source}: {name} must be int64 ({len(cache)}, {cache.text_embeddings.shape[1]}) token "
                             f"ids, got {ids.dtype} {tuple(ids.shape)}")
        if (ids < 0).any():
            raise ValueError(f"{source}: {name} has negative token ids")


def check_cache_fits_unet(cache: LatentCache, unet) -> None:
    """The cache's latents and text embeddings have the widths `unet` (a UNet2DConditionModel) takes."""
    config = unet.config
    if cache.latent_mean.shape[1] != config.in_channels:
        raise ValueError(
            f"latent cache has {cache.latent_mean.shape[1]} latent channels, the UNet expects {config.in_channels}"
        )
    if cache.text_embeddings.shape[2] != config.cross_attention_dim:
        raise ValueError(
            f"latent cache has text embeddings of width {cache.text_embeddings.shape[2]}, the UNet's "
            f"cross_attention_dim is {config.cross_attention_dim}: were they made with another text encoder?"
        )


def load_latent_cache(path: str | Path) -> LatentCache:
    """Read the latents stage's output: a shard folder (`data/latents`, see
    `ec_lora_t.data.latent_shards`) or a single safetensors file holding every row."""
    path = Path(path)
    if path.is_dir():
        tensors = load_shard_tensors(path)
    elif path.is_file():
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    else:
        raise FileNotFoundError(f"{path}: latent cache not found; run the latents stage first")
    missing = [name for name in CACHE_TENSORS if name not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}; it has {sorted(tensors)}")
    present = CACHE_TENSORS + tuple(name for name in OPTIONAL_CACHE_TENSORS if name in tensors)
    return validate_latent_cache(LatentCache(**{name: tensors[name] for name in present}), source=str(path))


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """One seed per (run seed, epoch, random stream) so every epoch can be replayed alone."""
    return (seed * 1_000_003 + epoch) * 4096 + stream


class EpochShuffleSampler(Sampler[int]):
    """A fresh order every epoch, fixed by (seed, epoch) alone.

    Without `weights`, a permutation. With them, as many draws with replacement, each image
    drawn with probability proportional to its weight (engagement-balanced sampling).
    """

    def __init__(self, num_samples: int, seed: int, weights: torch.Tensor | None = None) -> None:
        if weights is not None and weights.shape != (num_samples,):
            raise ValueError(f"weights must be ({num_samples},), got {tuple(weights.shape)}")
        self.num_samples = num_samples
        self.seed = seed
        self.weights = weights
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is None:
            return iter(torch.randperm(self.num_samples, generator=generator).tolist())
        return iter(torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator).tolist())


def engagement_balance_weights(engagement: torch.Tensor, power: float, bins: int = 10) -> torch.Tensor | None:
    """Sampling weights that flatten the engagement histogram: density(e_i) ** -power.

    Posts of typical engagement crowd the middle of [0, 1]; the extremes, which the vector's
    ends must learn from, are few. power 0 is uniform sampling (None), 1 equalises the bins.
    """
    if power == 0:
        return None
    index = torch.clamp((engagement * bins).long(), 0, bins - 1)
    counts = torch.bincount(index, minlength=bins).to(torch.float64)
    return (counts[index] ** -power).to(torch.float64)


def shuffled_vectors(cache: LatentCache, seed: int) -> LatentCache:
    """The cache with its engagement-time vectors permuted across images: the negative control.

    Every image keeps its latents and caption but gets another image's vector, so a vector
    carries no information about the picture. A method that still "controls" generation after
    this is measuring something else than the audience.
    """
    permutation = torch.randperm(len(cache), generator=torch.Generator().manual_seed(seed))
    return replace(cache, engagement_time=cache.engagement_time[permutation].contiguous())


def _deduplicated(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct rows, index of each row's distinct row): many images share a caption (carousels,
    and the generic "(style) (season)" caption of caption dropout has a handful of values)."""
    keys, table, index = {}, [], []
    flat = rows.reshape(rows.shape[0], -1).contiguous()
    for row in range(flat.shape[0]):
        key = flat[row].numpy().tobytes()
        if key not in keys:
            keys[key] = len(table)
            table.append(rows[row])
        index.append(keys[key])
    return torch.stack(table), torch.tensor(index, dtype=torch.long)


class ResidentBatches:
    """The latent cache held on the training device and served in the sampler's replayable order.

    A batch is a few index lookups on the device, not a Python collate of single images or a
    host-to-device copy per step. Text embeddings are kept once per distinct caption (in
    `text_dtype`, e.g. the bf16 the UNet reads) and looked up per batch. With several
    processes the epoch's batches are dealt out as accelerate deals a prepared DataLoader's
    (batch k to process k mod P, the last round completed from the epoch's start), so every
    process makes the same number of steps.
    """

    def __init__(
        self,
        cache: LatentCache,
        sampler: EpochShuffleSampler,
        batch_size: int,
        device: torch.device,
        text_dtype: torch.dtype = torch.float32,
        process_index: int = 0,
        num_processes: int = 1,
        token_ids: bool = False,
    ) -> None:
        self.sampler, self.batch_size = sampler, batch_size
        self.process_index, self.num_processes = process_index, num_processes
        self.latent_mean = cache.latent_mean.to(device)
        self.latent_std = cache.latent_std.to(device)
        self.engagement_time = cache.engagement_time.to(device)
        self.text = {}
        # The cached embeddings, or with `token_ids` (a text-encoder LoRA encodes every step) the ids.
        names = TOKEN_ID_TENSORS if token_ids else ("text_embeddings", "generic_text_embeddings")
        for name in names:
            if getattr(cache, name) is not None:
                table, index = _deduplicated(getattr(cache, name))
                dtype = table.dtype if token_ids else text_dtype
                self.text[name] = (table.to(device, dtype), index.to(device))

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def _batch_indices(self) -> list[list[int]]:
        order = list(self.sampler)
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        if self.num_processes > 1:
            # Every process takes len(self) batches, wrapping round the epoch's order when the
            # batches do not divide evenly: a process with fewer steps would wait forever in the
            # next collective.
            padded = itertools.islice(itertools.cycle(batches), len(self) * self.num_processes)
            batches = list(padded)[self.process_index :: self.num_processes]
        return batches

    def __len__(self) -> int:
        batches = -(-len(self.sampler) // self.batch_size)
        return -(-batches // self.num_processes)

    def __iter__(self):
        device = self.latent_mean.device
        for indices in self._batch_indices():
            rows = torch.tensor(indices, dtype=torch.long).to(device, non_blocking=True)
            batch = {
                "latent_mean": self.latent_mean[rows],
                "latent_std": self.latent_std[rows],
                "engagement_time": self.engagement_time[rows],
            }
            for name, (table, index) in self.text.items():
                batch[name] = table[index[rows]]
            yield batch

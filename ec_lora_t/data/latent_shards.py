"""The latents stage's output on disk: tensors in shards, rows in one index table.

    data/latents/
      shard-00000.safetensors   rows 0 .. shard_size-1
      shard-00001.safetensors   the next shard_size rows ...
      index.parquet             one row per training image, in training order, with its
                                `shard` (file name) and `shard_row` (row inside that shard)

Every shard holds the same tensors, row i of each belonging to one image: `latent_mean`,
`latent_std` (N, 4, h, w) fp32, already multiplied by the VAE scaling factor;
`text_embeddings` and `generic_text_embeddings` (N, 77, D); `engagement_time` (N, 2). The
writer keeps one shard in memory, so writing a feed of any size needs the memory of one
shard; reading gives the rows back in index order, for training (which holds them all) or
for the regressor (which asks only for `latent_mean`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX_NAME = "index.parquet"
SHARD_METADATA_KEY = "ec_lora_t"
SHARD_COLUMNS = ("shard", "shard_row")


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def shard_assignment(num_rows: int, shard_size: int) -> pd.DataFrame:
    """Where row i lives: shard `i // shard_size`, row `i % shard_size` (what the writer does)."""
    rows = pd.RangeIndex(num_rows)
    return pd.DataFrame({"shard": [shard_name(i // shard_size) for i in rows], "shard_row": rows % shard_size})


class LatentShardWriter:
    """Append rows of tensors in order; every `shard_size` rows become one shard file.

    `metadata` (JSON-able) goes into every shard's header as one JSON string under
    `ec_lora_t`, e.g. the base model that made it. One key, because safetensors writes
    several metadata keys in a random order: the shard's bytes, and so DVC's hash of the
    folder, would change from run to run.
    """

    def __init__(self, out_dir: str | Path, shard_size: int, metadata: Mapping[str, Any] | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self.metadata = dict(metadata or {})
        self.shards: list[str] = []
        self.num_rows = 0
        self._pending: list[dict[str, torch.Tensor]] = []
        self._pending_rows = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Add a batch of rows: every tensor has the same first dimension."""
        sizes = {name: tensor.shape[0] for name, tensor in batch.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"tensors of one batch must have the same number of rows, got {sizes}")
        if self._pending and set(batch) != set(self._pending[0]):
            raise ValueError(f"batch has tensors {sorted(batch)}, earlier batches had {sorted(self._pending[0])}")
        rows = next(iter(sizes.values()))
        start = 0
        while start < rows:
            take = min(rows - start, self.shard_size - self._pending_rows)
            self._pending.append({name: tensor[start : start + take] for name, tensor in batch.items()})
            self._pending_rows += take
            start += take
            if self._pending_rows == self.shard_size:
                self._flush()

    def close(self) -> list[str]:
        """Write the last, partial shard; return the shard file names in order."""
        if self._pending_rows:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        names = self._pending[0].keys()
        tensors = {name: torch.cat([part[name] for part in self._pending]).contiguous() for name in names}
        name = shard_name(len(self.shards))
        header = json.dumps({**self.metadata, "first_row": self.num_rows}, sort_keys=True)
        save_file(tensors, self.out_dir / name, metadata={SHARD_METADATA_KEY: header})
        self.shards.append(name)
        self.num_rows += self._pending_rows
        self._pending, self._pending_rows = [], 0


def write_shard_index(out_dir: str | Path, rows: pd.DataFrame, shard_size: int) -> Path:
    """index.parquet: `rows` (one per image, in shard order) plus `shard` and `shard_row`."""
    clashing = [column for column in SHARD_COLUMNS if column in rows.columns]
    if clashing:
        raise ValueError(f"the index rows must not carry {clashing}: the writer assigns them")
    index = pd.concat([rows.reset_index(drop=True), shard_assignment(len(rows), shard_size)], axis=1)
    path = Path(out_dir) / INDEX_NAME
    index.to_parquet(path, index=False)
    return path


def read_shard_index(directory: str | Path, required_columns: Iterable[str] = ()) -> pd.DataFrame:
    """The index table of a shard folder, checked for its shard columns and `required_columns`."""
    directory = Path(directory)
    path = directory / INDEX_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: latent shards not found; run the latents stage first")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index of the latent shards; run the latents stage again")
    index = pd.read_parquet(path)
    missing = [column for column in (*SHARD_COLUMNS, *required_columns) if column not in index.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    return index


def load_shard_tensors(
    directory: str | Path, names: Sequence[str] | None = None, index: pd.DataFrame | None = None
) -> dict[str, torch.Tensor]:
    """Tensors of every row of the index, in index order: `names` only (None: all a shard has).

    Each tensor is allocated once at its full size and filled shard by shard, so reading
    needs the memory of the result plus one shard's tensor.
    """
    directory = Path(directory)
    if index is None:
        index = read_shard_index(directory)
    if len(index) == 0:
        raise ValueError(f"{directory / INDEX_NAME}: the index holds no rows")
    result: dict[str, torch.Tensor] = {}
    wanted = None if names is None else list(names)
    for shard in dict.fromkeys(index["shard"]):  # shards in order of first appearance
        path = directory / shard
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard named in {directory / INDEX_NAME} is missing")
        in_shard = (index["shard"] == shard).to_numpy()
        positions = torch.from_numpy(in_shard.nonzero()[0])
        shard_rows = torch.from_numpy(index["shard_row"].to_numpy()[in_shard])
        try:
            with safe_open(path, framework="pt") as stored:
                available = set(stored.keys())
                if wanted is None:  # all tensors of the first shard, and every later shard must have them
                    wanted = sorted(available)
                absent = [name for name in wanted if name not in available]
                if absent:
                    raise ValueError(f"{path}: missing tensors {absent}; it has {sorted(available)}")
                for name in wanted:
                    tensor = stored.get_tensor(name)
                    if int(shard_rows.max()) >= tensor.shape[0]:
                        raise ValueError(
                            f"{path}: the index names row {int(shard_rows.max())} but {name} has {tensor.shape[0]} rows"
                        )
                    if name not in result:
                        result[name] = torch.empty((len(index), *tensor.shape[1:]), dtype=tensor.dtype)
                    elif result[name].shape[1:] != tensor.shape[1:]:
                        raise ValueError(
                            f"{path}: {name} has rows of shape {tuple(tensor.shape[1:])}, earlier shards "
                            f"{tuple(result[name].shape[1:])}"
                        )
                    result[name][positions] = tensor[shard_rows]
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    return result

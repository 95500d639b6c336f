"""Keys of the content caches: what makes a cached caption or latent valid for reuse.

A cache entry is keyed by the content it was computed from (the image file's bytes, the
caption's text) within a namespace that names everything else the value depends on (the
model's files, the resolution, the code that computes it). Adding posts to a feed then
computes only the new ones, and a changed model or preprocessing never serves a stale value.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_files_key(name_or_path: str | Path, subfolders: Sequence[str] = ("",), **settings: Any) -> str:
    """16 hex digits naming a model (hub id or folder) and the settings a cached value depends on.

    For a local folder the weight and config files of `subfolders` count too (name, size,
    modification time), so retraining a model in place does not serve stale values. A hub id
    counts by its name only.
    """
    identity: dict[str, Any] = {"model": str(name_or_path), **settings}
    folder = Path(name_or_path)
    if folder.is_dir():
        identity["files"] = sorted(
            (f.relative_to(folder).as_posix(), f.stat().st_size, f.stat().st_mtime_ns)
            for subfolder in subfolders
            if (folder / subfolder).is_dir()
            for f in (folder / subfolder).iterdir()
            if f.suffix in WEIGHT_SUFFIXES
        )
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def source_sha256(*modules: Any) -> str:
    """16 hex digits of the source files of `modules`: cached values made by older code are not reused."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


class ContentCache:
    """Values by content SHA-256 within one namespace (`model_key`), in
    ``<cache_dir>/<prefix>-<model_key>.jsonl``: the caption cache and the sentiment cache.

    Append-only: each finished batch adds lines, so a crash loses at most one batch; a last
    line cut short by a crash is ignored when reading. Subclasses name the file's `prefix`, the
    JSON `field` holding the value and how it is read back (`convert`).
    """

    prefix: str
    field: str

    def __init__(self, cache_dir: str | Path, model_key: str):
        self.path = Path(cache_dir) / f"{self.prefix}-{model_key}.jsonl"
        self._values: dict[str, Any] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self._values[entry["sha256"]] = self.convert(entry[self.field])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue

    @staticmethod
    def convert(value: Any) -> Any:
        return value

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._values

    def get(self, sha256: str) -> Any:
        return self._values[sha256]

    def add(self, values: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as stream:
            for sha256, value in values.items():
                stream.write(json.dumps({"sha256": sha256, self.field: value}) + "\n")
        self._values.update(values)

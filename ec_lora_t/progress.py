"""Progress bars for the long loops (captioning, latents, training), shown only to a person.

A bar is drawn when stderr is a terminal and the `CI` environment variable is not set: in a
log file, under `dvc repro > log` or in CI, tqdm's carriage-return redraws are noise.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


def progress_enabled() -> bool:
    """True when a person watches: stderr is a terminal and this is not a CI run."""
    ci = os.environ.get("CI", "").strip().lower()
    return sys.stderr.isatty() and ci in ("", "0", "false", "no")


def progress_bar(*args: Any, enabled: bool | None = None, **kwargs: Any) -> tqdm:
    """`tqdm(*args, **kwargs)`, drawn only when `enabled` (default: `progress_enabled()`)."""
    if enabled is None:
        enabled = progress_enabled()
    return tqdm(*args, disable=not enabled, **kwargs)

"""What every stage does the same way: read its params section, write metrics JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml


def load_params(section: str, params_path: str | Path = "params.yaml") -> dict[str, Any]:
    """Return one top-level section of params.yaml (a stage reads only its own)."""
    with open(params_path) as f:
        params = yaml.safe_load(f)
    if section not in params:
        raise KeyError(f"{params_path} has no section '{section}'")
    return params[section]


def merge_params(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` applied key by key, nested sections merged (neither is modified)."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge_params(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write metrics as JSON; non-finite floats become null so the file stays valid JSON."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if hasattr(value, "item"):  # numpy / torch scalars
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(metrics), indent=2, sort_keys=True) + "\n")

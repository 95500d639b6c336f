"""What every stage does the same way: its command line, its params section, its metrics JSON.

Every stage is `python -m stages.<name> --<input or output> PATH ... --metrics PATH [--params
params.yaml]`: paths come in as options (dvc.yaml names them), the params file defaults to
params.yaml, and `main(argv)` parses `argv` (None: the process's command line, via argparse).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import yaml


def stage_parser(description: str | None) -> argparse.ArgumentParser:
    """The stage's argument parser with the options every stage has: --metrics and --params."""
    parser = argparse.ArgumentParser(description=(description or "").splitlines()[0] if description else None)
    parser.add_argument("--metrics", required=True, help="metrics JSON to write (metrics/<stage>.json)")
    parser.add_argument("--params", default="params.yaml", help="params file to read this stage's section from")
    return parser


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

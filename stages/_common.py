"""What every stage does the same way: its command line, its params section, its metrics JSON, its errors.

Every stage is `python -m stages.<name> --<input or output> PATH ... --metrics PATH [--params
params.yaml]`: paths come in as options (dvc.yaml names them), the params file defaults to
params.yaml, and `main(argv)` parses `argv` (None: the process's command line, via argparse).

Params: each section of params.yaml has one pydantic schema, in `stages/params/<section>.py`
(a subclass of `Section`); a stage reads its section with `load_section`, which checks types
and ranges and fails with one line naming the key, the value and what is allowed. The
`validate_params` stage runs every schema before any other stage, see its docstring.

Errors: `run_stage(main)` prints an error as one line (`stage <name>: <message>`) and exits
with status 1; `EC_LORA_T_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

DEBUG_ENV = "EC_LORA_T_DEBUG"


def stage_parser(description: str | None) -> argparse.ArgumentParser:
    """The stage's argument parser with the options every stage has: --metrics and --params."""
    parser = argparse.ArgumentParser(description=(description or "").splitlines()[0] if description else None)
    parser.add_argument("--metrics", required=True, help="metrics JSON to write (metrics/<stage>.json)")
    parser.add_argument("--params", default="params.yaml", help="params file to read this stage's section from")
    return parser


def read_params(params_path: str | Path = "params.yaml") -> dict[str, Any]:
    """The whole params file as a dict (sections at the top level)."""
    try:
        with open(params_path) as f:
            params = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as error:
        raise ParamsError(f"{params_path}: not a readable YAML file ({' '.join(str(error).split())})") from error
    if not isinstance(params, dict):
        raise ParamsError(f"{params_path}: expected sections of keys at the top level, got {type(params).__name__}")
    return params


def load_params(section: str, params_path: str | Path = "params.yaml") -> dict[str, Any]:
    """Return one top-level section of params.yaml as a plain dict, unchecked (prefer `load_section`)."""
    params = read_params(params_path)
    if section not in params:
        raise KeyError(f"{params_path} has no section '{section}'")
    return params[section]


class ParamsError(ValueError):
    """A params file or section is not usable; the message is one line naming key, value and what is allowed."""


def _no_bool(value: Any) -> Any:
    # pydantic's lax mode reads True as 1; in params a boolean where a number belongs is a mistake.
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


# Numbers in params: lax, so `2.0` is a valid int and the string "1e-4" (how PyYAML reads an
# exponent without a dot) a valid float, but never a boolean.
Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]


class Section(BaseModel):
    """Base of every params section's schema: unknown keys are errors, numbers must be finite.

    Validators that look at the file system resolve relative paths against
    `info.context["root"]`, the params file's folder (where DVC runs the stages).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


SectionT = TypeVar("SectionT", bound=Section)


def _describe(error: dict[str, Any], section: str, schema: type[Section]) -> str:
    key = ".".join([section, *(str(part) for part in error["loc"])])
    kind, message = error["type"], error["msg"]
    if kind == "missing":
        return f"{key} is missing"
    if kind == "extra_forbidden":
        return f"{key} = {error['input']!r}: unknown key; section '{section}' takes {sorted(schema.model_fields)}"
    if kind == "too_short":
        message = f"must have at least {error['ctx']['min_length']} item(s)"
    message = re.sub(r"^(Value error|Assertion failed), ", "", message)
    message = re.sub(r"^Input should be", "must be", message)
    if not error["loc"]:  # a rule across keys: the message names them, the input is the whole section
        return f"{key}: {message}"
    return f"{key} = {error['input']!r}: {message}"


def validate_section(
    schema: type[SectionT], section: str, values: Any, source: str | Path = "params.yaml", root: str | Path = "."
) -> SectionT:
    """`values` checked against `schema`; `ParamsError` (one line, every problem) otherwise."""
    try:
        return schema.model_validate(values, context={"root": Path(root)})
    except ValidationError as error:
        problems = "; ".join(_describe(e, section, schema) for e in error.errors(include_url=False))
        raise ParamsError(f"{source}: {problems}") from None


def load_section(schema: type[SectionT], section: str, params_path: str | Path = "params.yaml") -> SectionT:
    """One section of the params file, checked by its schema (relative paths: the file's folder)."""
    params = read_params(params_path)
    if section not in params:
        raise ParamsError(f"{params_path}: no section '{section}'")
    return validate_section(schema, section, params[section], params_path, Path(params_path).parent)


def merge_params(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` applied key by key, nested sections merged (neither is modified)."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge_params(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


# Floats in a stage's JSON keep this many significant digits: what the numbers can tell apart
# (a loss, a correlation over a few hundred images), not the 17 digits of a double, whose last
# ones change when another machine of the same kind computes the latents in another order; then
# `dvc metrics diff`, `git status` and the output hashes in dvc.lock stay quiet unless a result moved.
METRIC_SIGNIFICANT_DIGITS = 4


def round_significant(value: float, digits: int = METRIC_SIGNIFICANT_DIGITS) -> float:
    """`value` to `digits` significant digits (0.0296486 -> 0.02965, 597.30016 -> 597.3, 1.2345e-12 -> 1.234e-12)."""
    return float(f"{value:.{digits}g}")


def write_metrics(path: str | Path, metrics: dict[str, Any],
                  significant_digits: int | None = METRIC_SIGNIFICANT_DIGITS) -> dict[str, Any]:
    """Write metrics as JSON, floats rounded to `significant_digits` (None: as computed); non-finite
    floats become null so the file stays valid JSON. Integers and booleans are written as they are.
    Returns what was written (plain Python values), for callers that render it further."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in sorted(value.items())}  # the file's order
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if hasattr(value, "item"):  # numpy / torch scalars
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, float) and significant_digits is not None:
            return round_significant(value, significant_digits)
        return value

    cleaned = clean(metrics)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cleaned, indent=2, sort_keys=True) + "\n")
    return cleaned


def one_line(error: BaseException) -> str:
    """An exception as one line: its message with line breaks folded (its type if it has none)."""
    message = " ".join(str(error).split())
    return message or type(error).__name__


def run_stage(main: Callable[[], Any], name: str | None = None) -> None:
    """Run a stage's `main()`; an error ends it with one line on stderr and exit status 1.

    The traceback would name the failing line deep inside a library; the message names the
    file, key or value at fault. Set EC_LORA_T_DEBUG=1 to see the traceback.
    """
    name = name or Path(sys.argv[0]).stem
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(f"stage {name}: interrupted")
    except Exception as error:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        sys.exit(f"stage {name}: {one_line(error)} ({DEBUG_ENV}=1 shows the traceback)")

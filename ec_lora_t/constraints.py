"""Range rules declared once, on a config dataclass's field types, and checked from there.

A field says what it allows in its annotation, with `annotated_types` (the vocabulary pydantic
reads too): `rank: Annotated[int, Ge(1)] = 16`, `warmup: Annotated[float, Ge(0), Lt(1)]`,
`granularity: Literal["layer", "rank"]`, `limit: Annotated[int, Ge(1)] | None`. The dataclass
calls `check_constraints(self)` in `__post_init__`; the params schema of the `train` section
(stages/params/train.py) is built from the same fields, so both refuse the same values.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Annotated, Any, Literal, Union

import annotated_types as at

_BOUNDS = (
    (at.Ge, "ge", ">=", lambda value, bound: value >= bound),
    (at.Gt, "gt", ">", lambda value, bound: value > bound),
    (at.Le, "le", "<=", lambda value, bound: value <= bound),
    (at.Lt, "lt", "<", lambda value, bound: value < bound),
)


def _metadata_problem(constraint: Any, value: Any) -> str | None:
    for kind, attribute, symbol, holds in _BOUNDS:
        if isinstance(constraint, kind) and not holds(value, getattr(constraint, attribute)):
            return f"must be {symbol} {getattr(constraint, attribute)}"
    if isinstance(constraint, at.MinLen) and len(value) < constraint.min_length:
        return f"must have at least {constraint.min_length} item(s)"
    if isinstance(constraint, at.MaxLen) and len(value) > constraint.max_length:
        return f"must have at most {constraint.max_length} item(s)"
    return None


def violation(annotation: Any, value: Any) -> str | None:
    """What is wrong with `value` under `annotation`'s constraints, or None. Checks bounds,
    lengths, Literal choices, `X | None`, tuple items and finiteness of floats; the type itself
    is the caller's (a dataclass does not convert)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [arm for arm in args if arm is not type(None)]
        problems = [violation(arm, value) for arm in arms]
        return None if any(problem is None for problem in problems) else problems[0]
    if origin is Literal:
        return None if value in args else f"must be one of {args}"
    if origin is Annotated:
        base, *metadata = args
        return violation(base, value) or next(
            (problem for constraint in metadata if (problem := _metadata_problem(constraint, value))), None)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return next((f"item {problem}" for item in value if (problem := violation(args[0], item))), None)
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    return None


def check_constraints(config: Any) -> None:
    """Raise `ValueError("<field> = <value>: <what is allowed>")` for the first field of the
    dataclass instance `config` whose value its annotation does not allow."""
    hints = typing.get_type_hints(type(config), include_extras=True)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        problem = violation(hints[field.name], value)
        if problem is not None:
            raise ValueError(f"{field.name} = {value!r}: {problem}")

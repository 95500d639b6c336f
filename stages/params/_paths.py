"""File-system rules shared by section schemas; relative paths are read from the params file's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, ValidationInfo

from ec_lora_t.hub import check_reference


def params_root(info: ValidationInfo) -> Path:
    """The folder relative paths in params are read from (`validate_section`'s `root`)."""
    return Path((info.context or {}).get("root", "."))


def check_local_reference(value: str, info: ValidationInfo) -> str:
    """A model reference: an existing local folder, or spelled as a hub id (no network here)."""
    try:
        check_reference(value, root=params_root(info), what=None)
    except FileNotFoundError as error:  # pydantic reports ValueErrors only
        raise ValueError(str(error)) from None
    return value


# A model in params (`model.pretrained`, `caption.model`, `sentiment.model`): a hub id or a local
# folder in diffusers/transformers layout; checked for spelling and, if local, existence.
ModelReference = Annotated[str, Field(min_length=1), AfterValidator(check_local_reference)]

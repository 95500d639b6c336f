"""Schema of params.yaml section `regressor`: the latent engagement regressor (`stages/regressor.py`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from stages._common import Float, Int, Section


class RegressorParams(Section):
    # ec_lora_t.evaluation.regressor.PROTOCOLS
    protocol: Literal["grouped_kfold", "report"]
    folds: Annotated[Int, Field(ge=2)]
    alphas: Annotated[list[Annotated[Float, Field(gt=0)]], Field(min_length=1)]
    seed: Annotated[Int, Field(ge=0)]

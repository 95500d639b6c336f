"""Schema of params.yaml section `evaluate`: the sweep through the three modes (`stages/evaluate.py`).

The rules are those of `ec_lora_t.evaluation.sweep.sweep_plan`, checked before any stage runs.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from stages._common import Float, Int, Section

UnitFloat = Annotated[Float, Field(ge=0, le=1)]  # the ECM was trained on [0, 1]


def _unique(value: list) -> list:
    if len(set(value)) != len(value):
        raise ValueError("must not repeat a value")
    return value


class EvaluateParams(Section):
    prompts: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    seeds: Annotated[list[Annotated[Int, Field(ge=0)]], Field(min_length=1)]
    engagement_targets: Annotated[list[UnitFloat], Field(min_length=2)]
    time: UnitFloat
    time_targets: list[UnitFloat] = Field(default_factory=list)  # the time sweep; empty: none
    fixed_engagement: UnitFloat
    sampler: Literal["ddim", "dpmsolver++"] = "ddim"  # ec_lora_t.generation.SAMPLERS
    num_inference_steps: Annotated[Int, Field(ge=1)]
    guidance_scale: Annotated[Float, Field(ge=0)]
    # ec_lora_t.generation.VectorSampling
    vector_guidance: Annotated[Float, Field(ge=0)] = 1.0
    vector_guidance_anchor: Annotated[list[UnitFloat], Field(min_length=2, max_length=2)] | None = [0.5, 0.5]
    vector_scale: Annotated[Float, Field(ge=0)] = 1.0
    # The fraction (start, end) of the denoising steps with vector guidance; (0, 1): all of them.
    vector_guidance_interval: Annotated[list[UnitFloat], Field(min_length=2, max_length=2)] = [0.0, 1.0]
    # Time's own guidance scale (engagement keeps vector_guidance); null: vector_guidance guides both.
    time_guidance: Annotated[Float, Field(ge=0)] | None = None
    batch_size: Annotated[Int, Field(ge=1)] = 16
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "fp32"  # ec_lora_t.generation.PRECISIONS
    retrieval_k: Annotated[Int, Field(ge=1)] = 15  # the ceiling: k nearest training images per target
    permutations: Annotated[Int, Field(ge=1)]
    # auto: when ingest.posts_dir holds the demo world's manifest
    ground_truth: Literal["auto"] | bool = "auto"

    _unique_lists = field_validator("prompts", "seeds", "engagement_targets", "time_targets")(_unique)

    @model_validator(mode="after")
    def _time_sweep_has_two_targets(self) -> EvaluateParams:
        if len(self.time_targets) == 1:
            raise ValueError(f"time_targets {self.time_targets} must hold at least 2 targets, or none")
        return self

    @model_validator(mode="after")
    def _time_guidance_has_a_point_anchor(self) -> EvaluateParams:
        if self.time_guidance is not None and self.vector_guidance_anchor is None:
            raise ValueError("time_guidance needs vector_guidance_anchor as an (engagement, time) pair, not null")
        return self

    @model_validator(mode="after")
    def _interval_is_ordered(self) -> EvaluateParams:
        start, end = self.vector_guidance_interval
        if not start < end:
            raise ValueError(f"vector_guidance_interval {self.vector_guidance_interval}: start must be below end")
        return self

"""Schema of params.yaml section `features`: engagement and time features (`stages/features.py`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from stages._common import Float, Section

# A signal's name as ingest writes it: likes, comments, saves, shares, reach, sentiment, or a
# business export's other column in snake_case (ec_lora_t.data.ingest.insights).
SignalName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")]


class FeaturesParams(Section):
    # total_engagement = sum(weight * signal): the report's {likes: 1, comments: 3} by default.
    signals: Annotated[dict[SignalName, Annotated[Float, Field(ge=0)]], Field(min_length=1)]
    # ec_lora_t.data.features.DENOMINATORS: divide by it for an engagement rate; null: none.
    per: Literal["reach", "impressions", "views"] | None = None
    # ec_lora_t.data.features.NORMALIZATIONS
    normalization: Literal["minmax", "log_minmax", "rank", "detrended"]

    @model_validator(mode="before")
    @classmethod
    def _comment_weight_was_replaced(cls, values: Any) -> Any:
        if isinstance(values, dict) and "comment_weight" in values:
            weight = values["comment_weight"]
            raise ValueError(
                f"comment_weight = {weight!r} was replaced by signals: write "
                f"`signals: {{likes: 1, comments: {weight}}}` instead"
            )
        return values

    @model_validator(mode="after")
    def _engagement_is_well_formed(self) -> FeaturesParams:
        if not any(weight > 0 for weight in self.signals.values()):
            raise ValueError(f"features.signals = {self.signals}: at least one weight must be > 0")
        if self.per is not None and self.per in self.signals:
            raise ValueError(f"features.per = {self.per!r} is also a weighted signal: the rate would be constant")
        return self

"""What the demo world knows about an image that a real feed cannot: the scores the evaluation
uses as ground truth on the embedded default.

- `ground_truth_score`: the audience's hidden engagement function (`world.AUDIENCES`), the
  function the demo creator's likes were generated from;
- `time_ground_truth`: the creator's style drift read from pixels (`demo_data.time_drift_score`);
- `adherence_matched` / `adherence_named`: of the attributes the prompt names (scene, lighting,
  outfit colour; `attribute_check.attributes_named_in`), how many the image shows as named.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
from PIL import Image

from ec_lora_t.demo import world
from ec_lora_t.demo.attribute_check import (
    CHECKED_ATTRIBUTES,
    attributes_named_in,
    read_attributes,
    style_distance,
    style_profile,
)
from ec_lora_t.demo.demo_data import time_drift_score
from ec_lora_t.evaluation.evaluate import GROUND_TRUTH_COLUMNS

# The columns the evaluation's scored table holds them in (`sweep_report` reads them).
SCORE_COLUMNS = GROUND_TRUTH_COLUMNS


def demo_scores(images: Sequence[Image.Image], prompts: Sequence[str | None], audience: str) -> pd.DataFrame:
    """One row per image: the audience's appeal, the drift score and the prompt adherence counts.

    A prompt of None (a training image of the retrieval baseline) has no adherence (0 named).
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    rows = []
    for image, prompt in zip(images, prompts):
        named = attributes_named_in(prompt) if prompt is not None else {}
        read = read_attributes(image) if named else {}
        checked = [name for name in CHECKED_ATTRIBUTES if name in named]
        rows.append((
            world.audience_appeal(image, audience),
            time_drift_score(image),
            sum(read[name] == named[name] for name in checked),
            len(checked),
        ))
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


@dataclass(frozen=True)
class DemoGroundTruth:
    """The demo world's ground truth for `ec_lora_t.evaluation.evaluate.evaluate_adapter` (its
    `GroundTruth`): scores for `audience`, and the style checker's profiles and distances."""

    audience: str

    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str | None]) -> pd.DataFrame:
        return demo_scores(images, prompts, self.audience)

    def style_profile(self, images: Sequence[Image.Image]) -> dict[str, dict[str, float]]:
        return style_profile(images)

    def style_distance(self, profile: dict, reference: dict) -> dict[str, float]:
        return style_distance(profile, reference)

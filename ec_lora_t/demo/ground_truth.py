"""What the demo world knows about an image that a real feed cannot: the scores the evaluation
uses as ground truth on the embedded default.

- `ground_truth_score`: the audience's hidden engagement function (`world.AUDIENCES`), the
  function the demo creator's likes were generated from;
- `time_ground_truth`: the creator's style drift read from pixels (`demo_data.time_drift_score`);
- `adherence_matched` / `adherence_named`: of the attributes the prompt names (scene, lighting,
  outfit colour; `attribute_check.attributes_named_in`), how many the image shows as named;
- `demo_prompt_aware_plan`: the prompt-aware ceiling's training images
  (`ec_lora_t.evaluation.ceiling`), with what a prompt names and what a training image shows
  read by `ceiling_attributes_named_in` / `ceiling_attributes_read`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image

from ec_lora_t.demo import world
from ec_lora_t.demo.attribute_check import (
    CHECKED_ATTRIBUTES,
    attributes_named_in,
    read_attributes,
    read_garment_length,
    style_distance,
    style_profile,
)
from ec_lora_t.demo.demo_data import time_drift_score
from ec_lora_t.evaluation.ceiling import prompt_aware_retrieval_plan
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

    def prompt_aware_plan(self, plan: pd.DataFrame, training_vectors: np.ndarray,
                          training_images: Sequence[Image.Image], prompts: Sequence[str], k: int) -> pd.DataFrame:
        return demo_prompt_aware_plan(plan, training_vectors, training_images, prompts, k)


# Garments a prompt may name, by the length `attribute_check.read_garment_length` reads: the
# creator's drift is in the scene and in this length, so a prompt naming a jacket fixes half of it.
GARMENT_LENGTH = {"jacket": "short", "t-shirt": "short", "coat": "long", "dress": "long"}


def ceiling_attributes_named_in(prompt: str) -> dict[str, str]:
    """What a prompt names that the demo world can read back: `attributes_named_in` (scene,
    lighting, outfit colour) and, when it names exactly one length of garment, `garment_length`."""
    named = attributes_named_in(prompt)
    lengths = {length for garment, length in GARMENT_LENGTH.items() if re.search(rf"\b{garment}\b", prompt.lower())}
    if len(lengths) == 1:
        named["garment_length"] = lengths.pop()
    return named


def ceiling_attributes_read(image: Image.Image) -> dict[str, str]:
    """What a (training) image shows, in the keys of `ceiling_attributes_named_in`."""
    return read_attributes(image) | {"garment_length": read_garment_length(image)}


def demo_prompt_aware_plan(plan: pd.DataFrame, training_vectors: np.ndarray, training_images: Sequence[Image.Image],
                           prompts: Sequence[str], k: int, scale_k_to_pool: bool = True) -> pd.DataFrame:
    """The prompt-aware ceiling's rows on the demo (`ceiling.prompt_aware_retrieval_plan`):
    `training_images[i]` is the image of `training_vectors[i]` (at the model's resolution),
    `prompts` the sweep's prompts in `prompt_index` order."""
    if len(training_images) != len(training_vectors):
        raise ValueError(f"{len(training_images)} training images for {len(training_vectors)} training vectors")
    return prompt_aware_retrieval_plan(plan, training_vectors, [ceiling_attributes_read(image) for image in training_images],
                                       [ceiling_attributes_named_in(prompt) for prompt in prompts], k, scale_k_to_pool)

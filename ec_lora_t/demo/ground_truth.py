"""What the demo world knows about an image that a real feed cannot: the scores the evaluation
uses as ground truth on the embedded default.

- `ground_truth_score`: the hidden function of the engagement trained on: its audience's
  (`world.AUDIENCES`) for likes and comments, the savers' or sharers' for saves or shares, a
  weighted mix for a sum of signals that follow different audiences (`signal_audience_weights`);
  `appeal_<audience>` columns score every signal's audience, so a report can say which one the
  generation followed;
- `time_ground_truth`: the creator's style drift read from pixels (`demo_data.time_drift_score`);
- `adherence_matched` / `adherence_named`: of the attributes the prompt names (scene, lighting,
  outfit colour; `attribute_check.attributes_named_in`), how many the image shows as named;
- `demo_prompt_aware_plan`: the prompt-aware ceiling's training images
  (`ec_lora_t.evaluation.ceiling`), with what a prompt names and what a training image shows
  read by `ceiling_attributes_named_in` / `ceiling_attributes_read`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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


def demo_scores(images: Sequence[Image.Image], prompts: Sequence[str | None], audience: str | Mapping[str, float],
                also: Sequence[str] = ()) -> pd.DataFrame:
    """One row per image: the engagement's hidden score, the drift score and the prompt adherence
    counts (`SCORE_COLUMNS`), then an `appeal_<name>` column for each audience of `also`.

    `audience`: one audience of `world.AUDIENCES`, or audience -> weight (summing to 1) for an
    engagement computed from signals that follow different audiences (`signal_audience_weights`).
    A prompt of None (a training image of the retrieval baseline) has no adherence (0 named).
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    weights = {audience: 1.0} if isinstance(audience, str) else dict(audience)
    audiences = list(dict.fromkeys([*weights, *also]))
    rows = []
    for image, prompt in zip(images, prompts):
        named = attributes_named_in(prompt) if prompt is not None else {}
        read = read_attributes(image) if named else {}
        checked = [name for name in CHECKED_ATTRIBUTES if name in named]
        appeal = {name: world.audience_appeal(image, name) for name in audiences}
        rows.append((
            sum(weight * appeal[name] for name, weight in weights.items()),
            time_drift_score(image),
            sum(read[name] == named[name] for name in checked),
            len(checked),
            *(appeal[name] for name in also),
        ))
    return pd.DataFrame(rows, columns=[*SCORE_COLUMNS, *(appeal_column(name) for name in also)])


def appeal_column(audience: str) -> str:
    """The scored table's column of one audience's appeal (`DemoGroundTruth.signal_columns`)."""
    return f"appeal_{audience}"


# Signals the demo feed's likes and comments carry (metadata.csv); the others come from its
# insights export, so they mean the demo world's only when `ingest.insights` is that file.
_POST_SIGNALS = ("likes", "comments")


def signal_audiences_of(manifest: dict) -> dict[str, str]:
    """Each counted signal of a demo feed and the audience it follows (a feed written before the
    demo had insights: likes and comments, the manifest's audience)."""
    if "signals" not in manifest:
        return dict.fromkeys(_POST_SIGNALS, manifest["audience"])
    return {name: signal["audience"] for name, signal in manifest["signals"].items()}


def signal_audience_weights(manifest: dict, signals: Mapping[str, float], per: str | None,
                            insights_is_the_feeds: bool) -> dict[str, float]:
    """The hidden function of an engagement `sum(weight x signal) [/ per]` on a demo feed, as
    audience -> weight (summing to 1).

    Each count is followers(t) x rate x (0.2 + 1.6 appeal) x noise (`demo_data`), so the sum's
    picture-dependent part is sum(weight x rate x appeal): its audiences weighted by weight x
    rate. Reach (the only denominator the demo has) is followers(t) x noise, so a rate per reach
    follows the same function. Raises ValueError, saying why, when the demo world does not know
    the engagement's function: a signal or denominator it does not write, signals from an
    insights table that is not the feed's own, or no signal that follows any audience.
    """
    audiences = signal_audiences_of(manifest)
    rates = manifest.get("signals", {})
    unknown = [name for name in signals if name not in audiences]
    if unknown or per not in (None, "reach"):
        raise ValueError(f"the demo world has no hidden function for {unknown or [per]} (it writes "
                         f"{sorted(audiences)} and reach)")
    if not insights_is_the_feeds and any(name not in _POST_SIGNALS for name in [*signals, *([per] if per else [])]):
        raise ValueError("the engagement uses signals of ingest.insights, which is not the demo feed's insights export")
    weights: dict[str, float] = {}
    for name, weight in signals.items():
        rate = rates[name]["rate"] if name in rates else 1.0
        weights[audiences[name]] = weights.get(audiences[name], 0.0) + float(weight) * rate
    total = sum(weights.values())
    if not total > 0:
        raise ValueError(f"the engagement's weights {dict(signals)} give no positive weight to a picture's appeal")
    return {name: weight / total for name, weight in weights.items()}


@dataclass(frozen=True)
class DemoGroundTruth:
    """The demo world's ground truth for `ec_lora_t.evaluation.evaluate.evaluate_adapter` (its
    `GroundTruth`): scores for the engagement's hidden function (`audience`: one audience, or
    audience -> weight), the feed's signals' own functions (`signal_audiences`: signal ->
    audience, scored in the `signal_columns`), and the style checker's profiles and distances."""

    audience: str | Mapping[str, float]
    signal_audiences: Mapping[str, str] = field(default_factory=dict)

    @property
    def signal_columns(self) -> dict[str, str]:
        """Signal -> the scored table's column of the hidden function it follows."""
        return {signal: appeal_column(audience) for signal, audience in self.signal_audiences.items()}

    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str | None]) -> pd.DataFrame:
        return demo_scores(images, prompts, self.audience, also=list(dict.fromkeys(self.signal_audiences.values())))

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

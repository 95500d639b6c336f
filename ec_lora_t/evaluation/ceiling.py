"""The prompt-aware ceiling: retrieval that respects what the prompt names.

The retrieval baseline (`sweep.retrieval_plan`) takes the k training images nearest to each
target in (engagement, time), whatever the prompt says. A prompt that names a scene ("a man in
a park") forbids part of what those images show: on the demo, the creator drifts from parks to
city streets, so a prompt that fixes the scene fixes half of the drift the time sweep measures,
and an audience that likes beaches cannot be served a beach when the prompt says park. A
ceiling that ignores the prompt is then out of reach for any generator that keeps the prompt.

This ceiling retrieves, for each (sweep, prompt, target), the k training images nearest to
the target among those whose attributes agree with every attribute the prompt names; where
fewer than k agree fully, the rest are the nearest of those disagreeing least (so each prompt
still gets k images, and `agreed` says how many named attributes each one shows). A prompt
naming nothing gets the plain retrieval baseline. Its images are scored exactly like the
generated ones, and `share_of_prompt_aware_ceiling` is a mode's Spearman over the ceiling's.

What a prompt names and what a training image shows are inputs (mappings attribute -> value),
so the method knows nothing of the demo world: on the demo, `ec_lora_t.demo.ground_truth`
reads them (`ceiling_attributes_named_in`, `ceiling_attributes_read`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ec_lora_t.evaluation.sweep import RETRIEVAL, SWEEP_COLUMNS, sweep_blocks, sweep_metrics

# The ceiling's mode name in a scored table. Not a competitor of EC-LoRA-T: leave its rows out
# of `sweep.sweep_report` (whose verdict compares EC-LoRA-T with every other mode but "retrieval").
PROMPT_AWARE_RETRIEVAL = "prompt_aware_retrieval"
CEILING_COLUMNS = ["sweep", "prompt_index", "prompt", "seed", "target_engagement", "target_time", "train_index",
                   "named", "agreed"]


def prompt_aware_retrieval_plan(
    plan: pd.DataFrame,
    training_vectors: np.ndarray,
    training_attributes: Sequence[Mapping[str, str]],
    named_by_prompt: Sequence[Mapping[str, str]],
    k: int,
    scale_k_to_pool: bool = True,
) -> pd.DataFrame:
    """The prompt-aware ceiling's rows: k training images per (sweep, prompt, target).

    `plan`: `sweep.sweep_plan`'s rows (sweep, prompt_index, prompt, target_engagement,
    target_time; seeds are ignored: retrieval draws nothing). `training_vectors`: (N, 2)
    normalised (engagement, time) of the training images, `training_attributes[i]` what image
    i shows, `named_by_prompt[p]` what prompt p (a `prompt_index`) names. An attribute a prompt
    names that an image does not report counts as disagreeing.

    Images are ranked by (named attributes the image does not show, Euclidean distance to the
    target), ties by row order, and the first k are kept. With `scale_k_to_pool` (default), a
    prompt's k is the same share of its pool (the images that agree fully) as `k` is of all
    training images, at least 1: the plain baseline's k nearest are a neighbourhood of k / N
    of the data, and k nearest out of a pool of k + 1 would be the same images at every
    target, a ceiling that measures the pool's size rather than what the data allows. A prompt
    that no image agrees with fully keeps `k`. Columns: `CEILING_COLUMNS`, with
    seed = the image's rank (0 = best), so that a permutation block (prompt_index, seed) holds
    one image per target, `named` = attributes the prompt names, `agreed` = how many of them
    the image shows.
    """
    training_vectors = np.asarray(training_vectors, dtype=np.float64)
    if training_vectors.ndim != 2 or training_vectors.shape[1] != 2:
        raise ValueError(f"training_vectors must be (N, 2), got {training_vectors.shape}")
    if len(training_attributes) != len(training_vectors):
        raise ValueError(f"{len(training_attributes)} training attribute sets for {len(training_vectors)} training images")
    if not 1 <= k <= len(training_vectors):
        raise ValueError(f"retrieval k must be between 1 and the {len(training_vectors)} training images, got {k}")
    prompt_indices = sorted(set(plan["prompt_index"]))
    if prompt_indices and not 0 <= prompt_indices[0] <= prompt_indices[-1] < len(named_by_prompt):
        raise ValueError(f"the plan has prompt indices {prompt_indices} but {len(named_by_prompt)} prompts' attributes")
    targets = plan[["sweep", "prompt_index", "prompt", "target_engagement", "target_time"]].drop_duplicates()
    rows = []
    for sweep, prompt_index, prompt, engagement, time in targets.itertuples(index=False, name=None):
        named = named_by_prompt[prompt_index]
        agreed = np.array([sum(shown.get(name) == value for name, value in named.items())
                           for shown in training_attributes])
        pool = int((agreed == len(named)).sum())
        k_here = max(1, round(k * pool / len(training_vectors))) if scale_k_to_pool and pool else k
        distances = np.linalg.norm(training_vectors - np.array([engagement, time]), axis=1)
        # lexsort: the last key is the primary one (fewest disagreements), then distance, then row order
        order = np.lexsort((np.arange(len(distances)), distances, len(named) - agreed))[:k_here]
        rows += [(sweep, prompt_index, prompt, rank, float(engagement), float(time), int(index), len(named),
                  int(agreed[index])) for rank, index in enumerate(order)]
    return pd.DataFrame(rows, columns=CEILING_COLUMNS)


def prompt_aware_ceiling(table: pd.DataFrame, *, permutations: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """The ceiling's metrics per sweep, from its scored rows, as `sweep.sweep_report` gives a mode's.

    `table`: the rows of `prompt_aware_retrieval_plan` (or of mode `PROMPT_AWARE_RETRIEVAL` of
    a scored table) with predicted_engagement and, where known, ground_truth_score (engagement
    sweep) and time_ground_truth (time sweep). Returns {"engagement_sweep": metrics,
    "time_sweep": metrics} (sweeps without rows left out): `sweep.sweep_metrics` of the
    regressor's prediction, its "ground_truth" when known, and "full_agreement", the share of
    the ceiling's images showing every attribute their prompt names.
    """
    if "mode" in table.columns:
        table = table[table["mode"] == PROMPT_AWARE_RETRIEVAL]
    ceiling: dict[str, dict[str, Any]] = {}
    for sweep, (target_column, truth_column) in SWEEP_COLUMNS.items():
        rows = table[table["sweep"] == sweep]
        if rows.empty:
            continue
        target = rows[target_column].to_numpy()
        blocks = sweep_blocks(rows)
        metrics = sweep_metrics(target, rows["predicted_engagement"].to_numpy(), blocks,
                                permutations=permutations, seed=seed)
        if truth_column in rows.columns and rows[truth_column].notna().all():
            metrics["ground_truth"] = sweep_metrics(target, rows[truth_column].to_numpy(), blocks,
                                                    permutations=permutations, seed=seed)
        if {"named", "agreed"} <= set(rows.columns):
            metrics["full_agreement"] = float((rows["agreed"] == rows["named"]).mean())
        ceiling[f"{sweep}_sweep"] = metrics
    return ceiling


def _share(rho: float | None, ceiling_rho: float | None) -> float | None:
    if rho is None or ceiling_rho is None or math.isnan(rho) or math.isnan(ceiling_rho) or ceiling_rho == 0:
        return None
    return float(rho / ceiling_rho)


def add_prompt_aware_shares(report: dict[str, Any], ceiling: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`report` (`sweep.sweep_report`'s) with the ceiling added, modified in place and returned:
    `prompt_aware_ceiling` = `ceiling` (beside the sweeps, so that code walking a sweep's modes
    meets only generated modes and "retrieval"), and for every generated mode of each sweep
    `share_of_prompt_aware_ceiling` beside `share_of_ceiling`, for the regressor and, where
    both have it, for the ground truth (mode's Spearman / ceiling's; None when either is NaN
    or the ceiling's is 0)."""
    for sweep, metrics in ceiling.items():
        for mode, mode_metrics in report.get(sweep, {}).items():
            if mode in (RETRIEVAL, PROMPT_AWARE_RETRIEVAL):
                continue
            mode_metrics["share_of_prompt_aware_ceiling"] = _share(mode_metrics["spearman"], metrics["spearman"])
            if "ground_truth" in mode_metrics and "ground_truth" in metrics:
                mode_metrics["ground_truth"]["share_of_prompt_aware_ceiling"] = _share(
                    mode_metrics["ground_truth"]["spearman"], metrics["ground_truth"]["spearman"])
    report["prompt_aware_ceiling"] = ceiling
    return report

"""The engagement sweep (report 5.1.3) and the metrics that say whether conditioning works.

The report generated five images (one prompt, one seed, engagement 0 to 1), scored each with
the latent regressor, and read the five numbers by eye. Five numbers from one seed cannot
tell an effect from noise, so the sweep here runs P prompts x S seeds x the engagement targets
(plus a time sweep at fixed engagement), through the EC-LoRA-T adapter and, with the same
prompts and seeds, through the plain LoRA (ECM scales fixed at 1) and the base model.

Beside the modes sits a ceiling: the retrieval baseline, the k training images nearest to each
target in (engagement, time), scored exactly like the generated images. It says how far the
data itself lets a score follow the target; `share_of_ceiling` is a mode's Spearman over it.

Per mode, the scores of the generated images against the targets give: the Spearman
correlation over all images, a permutation p-value for it, the least-squares slope, the
per-target means and their range over the target range, and, on the demo world, how often the
attributes a prompt names are drawn as named (prompt adherence). The verdict
(`controls_signal`) needs a positive, significant Spearman for EC-LoRA-T that is stronger than
the plain LoRA's and the base model's, with a positive slope, an effect large enough to matter,
and the prompt kept as well as the base model keeps it. Key names and definitions are
documented in docs/metrics.md.

`generate_sweep` and `latent_means` produce and encode the images, `retrieval_plan` picks the
baseline's images; `sweep_report` turns a scored table into the metrics, so that it can be
tested on tables whose answer is known.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from diffusers import AutoencoderKL
from PIL import Image

from ec_lora_t.adapter.conditioning import MODES
from ec_lora_t.data.images import image_to_pixel_values
from ec_lora_t.encoders import encode_images
from ec_lora_t.evaluation.stats import (
    block_bootstrap_se,
    permutation_test_spearman,
    range_ratio,
    slope,
    spearman,
    target_table,
)
from ec_lora_t.generation import VectorSampling, generate_images
from ec_lora_t.pipeline import ECLoRAStableDiffusionPipeline
from ec_lora_t.progress import progress_bar

# Modes whose output does not depend on the engagement-time vector: one image per (prompt, seed).
MODES_WITHOUT_VECTOR = ("plain_lora", "base")
# The verdict's significance level for the one-sided permutation test.
SIGNIFICANCE_LEVEL = 0.05
# The verdict's smallest effect: the per-target mean scores must span at least this share of
# the target range. Without it, a trend of a thousandth of the range over a handful of images
# can pass the rank test by luck and be called control.
MIN_RANGE_RATIO = 0.05
# The verdict's adherence tolerance: at every target, EC-LoRA-T draws the attributes a prompt
# names at most this much less often than the base model (a share, 0.05 = 5 points).
MAX_ADHERENCE_DROP = 0.05
# The retrieval baseline's mode name in the scored table.
RETRIEVAL = "retrieval"
PLAN_COLUMNS = ["sweep", "prompt_index", "prompt", "seed", "target_engagement", "target_time"]
# Each sweep's (target column, ground-truth column) in a scored table: the engagement sweep is
# scored by the audience's appeal, the time sweep by the creator's drift. The one spelling of
# this mapping, for the evaluate stage, the prompt-aware ceiling and the benchmarks.
SWEEP_COLUMNS = {"engagement": ("target_engagement", "ground_truth_score"), "time": ("target_time", "time_ground_truth")}

# The permutation test's blocks: images of one prompt and one sampling seed differ only by their
# target, so targets are exchangeable within a block and not across blocks.
BLOCK_COLUMNS = ["prompt_index", "seed"]


def sweep_blocks(rows: pd.DataFrame) -> np.ndarray:
    """One label per row naming its (prompt_index, seed) block, for `sweep_metrics`."""
    prompt, seed = BLOCK_COLUMNS
    return rows[prompt].astype(str).str.cat(rows[seed].astype(str), sep="/").to_numpy()


def sweep_plan(
    prompts: Sequence[str],
    seeds: Sequence[int],
    engagement_targets: Sequence[float],
    time: float,
    time_targets: Sequence[float] = (),
    fixed_engagement: float = 0.5,
) -> pd.DataFrame:
    """Rows to generate: prompts x seeds x engagement targets at `time`, then prompts x seeds x
    time targets at `fixed_engagement` (the time sweep; left out when `time_targets` is empty).

    Columns: sweep ("engagement" | "time"), prompt_index, prompt, seed, target_engagement, target_time.
    """
    if not prompts or not seeds:
        raise ValueError("the sweep needs at least one prompt and one seed")
    if len(set(engagement_targets)) < 2:
        raise ValueError(f"the engagement sweep needs at least 2 distinct targets, got {list(engagement_targets)}")
    if time_targets and len(set(time_targets)) < 2:
        raise ValueError(f"the time sweep needs at least 2 distinct targets (or none), got {list(time_targets)}")
    for name, values in (("prompts", prompts), ("seeds", seeds), ("engagement_targets", engagement_targets),
                         ("time_targets", time_targets)):
        if len(set(values)) != len(values):
            raise ValueError(f"{name} has duplicates: {list(values)}")
    for name, values in (
        ("engagement_targets", engagement_targets),
        ("time_targets", time_targets),
        ("time", [time]),
        ("fixed_engagement", [fixed_engagement]),
    ):
        outside = [v for v in values if not 0.0 <= float(v) <= 1.0]
        if outside:
            # The ECM was trained on min-max normalised values; outside [0, 1] is extrapolation.
            raise ValueError(f"{name} must lie in [0, 1], got {outside}")
    rows = []
    for (prompt_index, prompt), seed in itertools.product(enumerate(prompts), seeds):
        rows += [("engagement", prompt_index, prompt, int(seed), float(e), float(time)) for e in engagement_targets]
        rows += [("time", prompt_index, prompt, int(seed), float(fixed_engagement), float(t)) for t in time_targets]
    return pd.DataFrame(rows, columns=PLAN_COLUMNS)


def target_key(target: float) -> str:
    """Stable metrics key of a target: 0.25 -> "target_025" (no dots: `dvc metrics` splits keys on dots)."""
    return f"target_{round(float(target) * 100):03d}"


def sweep_metrics(
    target: np.ndarray,
    score: np.ndarray,
    blocks: np.ndarray,
    *,
    permutations: int,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics of one mode and one sweep, for one score (regressor prediction or ground truth).

    `spearman_se` is the Spearman's block-bootstrap standard error over the same blocks: what
    other prompts and sampling seeds of the same kind would move it by (`stats.block_bootstrap_se`).
    """
    target, score = np.asarray(target, dtype=np.float64), np.asarray(score, dtype=np.float64)
    test = permutation_test_spearman(target, score, blocks, permutations=permutations, seed=seed)
    table = target_table(target, score)
    keys = [target_key(t) for t in table["target"]]
    if len(set(keys)) != len(keys):
        raise ValueError(f"targets {list(table['target'])} do not have distinct keys at 0.01 resolution")
    return {
        "spearman": spearman(target, score),
        "spearman_se": block_bootstrap_se(target, score, blocks, seed=seed),
        "p_value": test.p_value,
        "permutation_exact": test.exact,
        "slope": slope(target, score),
        "range_ratio": range_ratio(target, score),
        "mean": float(score.mean()),
        "std": float(score.std()),
        "by_target": {
            key: {"mean": float(row["mean"]), "std": float(row["std"]), "n": int(row["n"])}
            for key, (_, row) in zip(keys, table.iterrows())
        },
    }


def controls_signal(
    mode_metrics: dict[str, dict[str, Any]],
    significance_level: float = SIGNIFICANCE_LEVEL,
    min_range_ratio: float = MIN_RANGE_RATIO,
) -> bool:
    """The verdict: EC-LoRA-T's Spearman is > 0, its permutation p-value < the level, it is
    larger than the plain LoRA's and the base model's (a NaN Spearman, from a constant score,
    counts as 0), its slope is > 0 and its range ratio is at least `min_range_ratio`. The
    retrieval baseline, when present, is a ceiling, not a competitor: it is left out here.
    """
    if "ec_lora" not in mode_metrics:
        raise KeyError(f"the verdict needs the ec_lora mode, got {sorted(mode_metrics)}")

    def rho(mode: str) -> float:
        value = mode_metrics[mode]["spearman"]
        return 0.0 if value is None or math.isnan(value) else float(value)

    ec_lora = mode_metrics["ec_lora"]
    references = [rho(mode) for mode in mode_metrics if mode not in ("ec_lora", RETRIEVAL)]
    return bool(
        rho("ec_lora") > 0
        and ec_lora["p_value"] < significance_level
        and all(rho("ec_lora") > reference for reference in references)
        and ec_lora["slope"] > 0
        and ec_lora["range_ratio"] >= min_range_ratio
    )


def is_monotone(by_target: dict[str, dict[str, float]]) -> bool:
    """Per-target means strictly increasing with the target (keys sort with the target)."""
    means = [by_target[key]["mean"] for key in sorted(by_target)]
    return bool(all(later > earlier for earlier, later in zip(means, means[1:])))


def adherence_by_target(rows: pd.DataFrame, target_column: str) -> dict[str, float]:
    """Share of the attributes the prompts name that are drawn as named, per target:
    sum(matched) / sum(named) over the images of the target (images naming nothing don't count)."""
    sums = rows.groupby(target_column)[["adherence_matched", "adherence_named"]].sum()
    return {
        target_key(target): float(row["adherence_matched"] / row["adherence_named"])
        for target, row in sums.iterrows() if row["adherence_named"] > 0
    }


def keeps_prompt(adherence: dict[str, dict[str, float]], max_drop: float = MAX_ADHERENCE_DROP) -> bool:
    """At every target, EC-LoRA-T's adherence is within `max_drop` of the base model's."""
    ec_lora, base = adherence["ec_lora"], adherence["base"]
    return bool(ec_lora) and all(ec_lora[key] >= base[key] - max_drop for key in ec_lora)


def _share_of_ceiling(metrics: dict[str, Any], ceiling: dict[str, Any] | None) -> float | None:
    if ceiling is None or not ceiling["spearman"] or math.isnan(ceiling["spearman"]):
        return None
    rho = metrics["spearman"]
    return None if rho is None or math.isnan(rho) else float(rho / ceiling["spearman"])


def sweep_report(table: pd.DataFrame, *, permutations: int, seed: int = 0) -> dict[str, Any]:
    """All metrics of a scored sweep table: `<sweep>_sweep.<mode>...`, `adherence`, `verdict`.

    `table` has one row per (mode, plan row): mode, sweep, prompt_index, seed,
    target_engagement, target_time, predicted_engagement, and optionally ground_truth_score
    (the audience's appeal), time_ground_truth (the creator's drift), adherence_matched and
    adherence_named (all NaN or absent where unknown). Rows of mode "retrieval" are the
    baseline's training images. Blocks of the permutation test are (prompt_index, seed): `sweep_blocks`.
    The engagement sweep scores engagement (regressor, ground truth) against the target; the
    time sweep scores the regressor against target time and the drift as its ground truth.
    """
    required = {"mode", "sweep", "prompt_index", "seed", "target_engagement", "target_time", "predicted_engagement"}
    missing = required - set(table.columns)
    if missing:
        raise ValueError(f"sweep table is missing columns {sorted(missing)}")

    def known(column: str) -> bool:
        return column in table.columns and table.loc[table["mode"] != RETRIEVAL, column].notna().all()

    report: dict[str, Any] = {}
    for sweep, (target_column, truth_column) in SWEEP_COLUMNS.items():
        rows = table[table["sweep"] == sweep]
        if rows.empty:
            continue
        per_mode = {}
        for mode, mode_rows in rows.groupby("mode", sort=False):
            target = mode_rows[target_column].to_numpy()
            blocks = sweep_blocks(mode_rows)
            predicted = mode_rows["predicted_engagement"].to_numpy()
            per_mode[mode] = sweep_metrics(target, predicted, blocks, permutations=permutations, seed=seed)
            if known(truth_column):
                truth = mode_rows[truth_column].to_numpy()
                per_mode[mode]["ground_truth"] = sweep_metrics(target, truth, blocks, permutations=permutations, seed=seed)
                per_mode[mode]["ground_truth"]["monotone"] = is_monotone(per_mode[mode]["ground_truth"]["by_target"])
                # Does the learned regressor rank images as the true function does?
                per_mode[mode]["regressor_vs_ground_truth_spearman"] = spearman(truth, predicted)
        ceiling = per_mode.get(RETRIEVAL)
        for mode, metrics in per_mode.items():
            if mode == RETRIEVAL:
                continue
            metrics["share_of_ceiling"] = _share_of_ceiling(metrics, ceiling)
            if "ground_truth" in metrics:
                metrics["ground_truth"]["share_of_ceiling"] = _share_of_ceiling(
                    metrics["ground_truth"], ceiling.get("ground_truth") if ceiling else None
                )
        report[f"{sweep}_sweep"] = per_mode
    if "engagement_sweep" not in report:
        raise ValueError("sweep table has no engagement sweep rows")

    engagement = report["engagement_sweep"]
    verdict: dict[str, bool] = {}
    # Whether each sweep keeps the prompt at every target (True where adherence is not measured).
    prompt_kept = {"engagement": True, "time": True}
    if known("adherence_named"):
        for sweep, key in (("engagement", "adherence"), ("time", "time_adherence")):
            rows = table[(table["sweep"] == sweep) & (table["mode"] != RETRIEVAL)]
            if rows.empty:
                continue  # no time sweep
            report[key] = {mode: adherence_by_target(mode_rows, f"target_{sweep}")
                           for mode, mode_rows in rows.groupby("mode")}
            if report[key].get("ec_lora"):
                prompt_kept[sweep] = keeps_prompt(report[key])
        if report.get("adherence", {}).get("ec_lora"):
            verdict["keeps_prompt"] = prompt_kept["engagement"] and prompt_kept["time"]
    verdict["controls_engagement"] = controls_signal(engagement) and prompt_kept["engagement"]
    if "ground_truth" in engagement["ec_lora"]:
        verdict["controls_ground_truth"] = controls_signal(
            {mode: metrics["ground_truth"] for mode, metrics in engagement.items()}
        ) and prompt_kept["engagement"]
    time_sweep = report.get("time_sweep", {})
    if "ground_truth" in time_sweep.get("ec_lora", {}):
        verdict["controls_time"] = controls_signal(
            {mode: metrics["ground_truth"] for mode, metrics in time_sweep.items()}) and prompt_kept["time"]
    report["verdict"] = verdict
    return report


def retrieval_plan(plan: pd.DataFrame, training_vectors: np.ndarray, k: int) -> pd.DataFrame:
    """The retrieval baseline's rows: for each target of each sweep, the k training images
    nearest in (engagement, time) (Euclidean; ties by row order).

    Columns: sweep, target_engagement, target_time, prompt_index (-1), seed (the neighbour's
    rank, 0 = nearest, so that a permutation block holds one image per target), train_index.
    """
    training_vectors = np.asarray(training_vectors, dtype=np.float64)
    if training_vectors.ndim != 2 or training_vectors.shape[1] != 2:
        raise ValueError(f"training_vectors must be (N, 2), got {training_vectors.shape}")
    if not 1 <= k <= len(training_vectors):
        raise ValueError(f"retrieval k must be between 1 and the {len(training_vectors)} training images, got {k}")
    targets = plan[["sweep", "target_engagement", "target_time"]].drop_duplicates()
    rows = []
    for sweep, engagement, time in targets.itertuples(index=False, name=None):
        distances = np.linalg.norm(training_vectors - np.array([engagement, time]), axis=1)
        nearest = np.argsort(distances, kind="stable")[:k]
        rows += [(sweep, engagement, time, -1, rank, int(index)) for rank, index in enumerate(nearest)]
    return pd.DataFrame(
        rows, columns=["sweep", "target_engagement", "target_time", "prompt_index", "seed", "train_index"]
    )


def generate_sweep(
    pipeline: ECLoRAStableDiffusionPipeline,
    plan: pd.DataFrame,
    mode: str,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int,
    batch_size: int = 8,
    sampling: VectorSampling = VectorSampling(),
    progress: bool | None = None,
) -> list[Image.Image]:
    """One image per plan row, in plan order, at `resolution` px (the size the regressor was fit at).

    In "plain_lora" and "base" mode the vector has no effect, so each (prompt, seed) is
    generated once and shared by its rows; identical rows of "ec_lora" (the point where the
    two sweeps cross) are generated once too. The images are generated grouped by vector, so
    that a batch's rows share one and the pipeline folds it into the weights once per batch
    (`ECLoRAStableDiffusionPipeline.max_folded_runs`); an image depends only on its own row.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    uses_vector = mode not in MODES_WITHOUT_VECTOR
    columns = ["prompt", "seed", "target_engagement", "target_time"] if uses_vector else ["prompt", "seed"]
    keys = list(plan[columns].itertuples(index=False, name=None))
    unique_keys = list(dict.fromkeys(keys))
    if uses_vector:
        unique_keys.sort(key=lambda key: key[2:])  # stable: by vector, then in plan order
    engagement_time = torch.tensor([key[2:] for key in unique_keys], dtype=torch.float32) if uses_vector else None
    with progress_bar(total=len(unique_keys), desc=f"evaluate {mode}", unit="img", enabled=progress) as bar:
        images = generate_images(
            pipeline,
            [key[0] for key in unique_keys],
            engagement_time,
            [int(key[1]) for key in unique_keys],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            mode=mode,
            batch_size=batch_size,
            height=resolution,
            width=resolution,
            sampling=sampling,
            on_batch=bar.update,
        )
    image_of_key = dict(zip(unique_keys, images))
    return [image_of_key[key] for key in keys]


def latent_means(vae: AutoencoderKL, images: Sequence[Image.Image], resolution: int, batch_size: int = 8) -> np.ndarray:
    """VAE latent means x scaling factor, (N, 4, h, w): the same preprocessing and encoding as
    the latents stage applies to the training images, so the regressor reads them alike."""
    pixel_values = torch.stack([image_to_pixel_values(image, resolution) for image in images])
    latent_mean, _ = encode_images(vae, pixel_values, batch_size)
    return latent_mean.numpy()


def headline_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a person compares across experiments (metrics/evaluate.json, one flat
    level so that `dvc exp show --only-changed` stays narrow); every detail stays in the report.

    On the demo (ground truth known) the numbers are the ground truth's, else the regressor's
    (`score` says which): the verdict, EC-LoRA-T's Spearman, its share of the retrieval
    ceiling, its range ratio, whether the prompt was kept, and (demo only: the creator's drift
    is its ground truth) the time sweep's Spearman. The share of the prompt-aware ceiling stays in
    the details: one more column and `dvc exp show --only-changed` no longer fits 160 columns.
    """
    engagement = report["engagement_sweep"]
    verdict = report["verdict"]
    ground_truth = "ground_truth" in engagement["ec_lora"]
    metrics = engagement["ec_lora"]["ground_truth"] if ground_truth else engagement["ec_lora"]
    time_metrics = report.get("time_sweep", {}).get("ec_lora", {}).get("ground_truth")
    return {
        "score": "ground_truth" if ground_truth else "regressor",
        "controls": verdict["controls_ground_truth" if ground_truth else "controls_engagement"],
        "keeps_prompt": verdict.get("keeps_prompt"),
        "controls_time": verdict.get("controls_time"),
        "spearman": metrics["spearman"],
        "of_ceiling": metrics.get("share_of_ceiling"),
        "range_ratio": metrics["range_ratio"],
        "time_spearman": time_metrics["spearman"] if time_metrics else None,
    }

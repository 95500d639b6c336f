"""The evaluation of a trained adapter as one function: plan, generate, score, draw, report.

`evaluate_adapter` runs the engagement (and time) sweep through EC-LoRA-T, the plain LoRA and
the base model, beside the retrieval baseline (the k training images nearest to each target:
the ceiling the data allows). Every image is encoded by a fp32 VAE and scored by the latent
regressor; when a `GroundTruth` is given (the demo world, `ec_lora_t.demo.ground_truth`) also by
the scores only a world with known rules can give. It returns the scored table, the images,
the labelled figures and the report (metrics documented in docs/metrics.md); writing them is
the caller's (the `evaluate` stage writes them under data/evaluate).

The method never imports the demo world: the ground truth comes in as an object with the
`GroundTruth` methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from diffusers import AutoencoderKL
from PIL import Image

from ec_lora_t.adapter.conditioning import MODES
from ec_lora_t.data.images import load_rgb_image, resize_and_crop
from ec_lora_t.evaluation.ceiling import PROMPT_AWARE_RETRIEVAL, add_prompt_aware_shares, prompt_aware_ceiling
from ec_lora_t.evaluation.figures import sweep_figure
from ec_lora_t.evaluation.regressor import LatentRegressor
from ec_lora_t.evaluation.stats import spearman
from ec_lora_t.evaluation.sweep import (
    MODES_WITHOUT_VECTOR,
    RETRIEVAL,
    generate_sweep,
    latent_means,
    retrieval_plan,
    sweep_plan,
    sweep_report,
)
from ec_lora_t.generation import ECLoRAPipeline, VectorSampling, save_png

# The ground-truth columns of the scored table, read by `sweep_report` (NaN where unknown).
GROUND_TRUTH_COLUMNS = ["ground_truth_score", "time_ground_truth", "adherence_matched", "adherence_named"]
# The columns of the training table the evaluation reads (the features stage's train.parquet).
TRAINING_COLUMNS = ["image_path", "normalized_engagement", "normalized_time"]


@dataclass(frozen=True)
class EvaluationSettings:
    """How the sweep runs (the `evaluate` params section, plus the model's resolution)."""

    prompts: Sequence[str]
    seeds: Sequence[int]
    engagement_targets: Sequence[float]
    time: float  # the engagement sweep's time
    fixed_engagement: float  # the time sweep's engagement
    num_inference_steps: int
    guidance_scale: float
    permutations: int  # of the permutation test of each Spearman
    resolution: int  # px of generated and training images, as the latents stage saw them
    time_targets: Sequence[float] = ()  # the time sweep; empty: none
    sampling: VectorSampling = field(default_factory=VectorSampling)
    batch_size: int = 16
    retrieval_k: int = 15  # the ceiling: k nearest training images per target


class GroundTruth(Protocol):
    """What a world whose rules are known can say about an image (the demo world's
    `ec_lora_t.demo.ground_truth.DemoGroundTruth`)."""

    @property
    def signal_columns(self) -> Mapping[str, str]:
        """Each engagement signal the world knows -> the column of `scores` holding its hidden
        function (reported as `ground_truth_by_signal`); empty when it knows only one."""

    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str | None]) -> pd.DataFrame:
        """One row per image, the `GROUND_TRUTH_COLUMNS` and the `signal_columns`; a prompt of
        None is a training image."""

    def style_profile(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        """A JSON-able profile of the images' style."""

    def style_distance(self, profile: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
        """Distance of two profiles, with a "mean" key."""

    def prompt_aware_plan(self, plan: pd.DataFrame, training_vectors: np.ndarray,
                          training_images: Sequence[Image.Image], prompts: Sequence[str], k: int) -> pd.DataFrame:
        """The prompt-aware ceiling's rows (`ec_lora_t.evaluation.ceiling.prompt_aware_retrieval_plan`):
        retrieval only among training images that show what each prompt names, as read back
        from their pixels; `train_index` names the image. None: this world cannot tell."""


@dataclass
class Evaluation:
    """What `evaluate_adapter` found: the scored table (one row per mode and plan row), each
    mode's images in table order, the labelled figures by title, the report and, with a ground
    truth, the style profiles."""

    scored: pd.DataFrame
    images: dict[str, list[Image.Image]]
    figures: dict[str, Image.Image]
    report: dict[str, Any]
    style_profiles: dict[str, Any] | None = None


def figure_file_name(title: str) -> str:
    """File of a figure of `Evaluation.figures`: "Engagement sweep" -> "engagement_sweep.png"."""
    return title.lower().replace(" ", "_") + ".png"


def image_name(mode: str, row) -> str:
    """File of a row's image; rows that share an image (no vector in this mode) share the name."""
    if mode in MODES_WITHOUT_VECTOR:
        return f"{mode}/p{row.prompt_index:02d}_seed{row.seed}.png"
    return f"{mode}/p{row.prompt_index:02d}_seed{row.seed}_e{row.target_engagement:.2f}_t{row.target_time:.2f}.png"


def load_training_images(image_paths: Sequence[str], indices: set[int], resolution: int) -> dict[int, Image.Image]:
    """Training images by row index at the model's resolution, as the generated images are and
    as the latents stage saw them."""
    return {
        index: resize_and_crop(load_rgb_image(image_paths[index], max_image_pixels=None), resolution)
        for index in sorted(indices)
    }


def generate_modes(
    pipeline: ECLoRAPipeline, plan: pd.DataFrame, settings: EvaluationSettings, progress: bool | None = None
) -> dict[str, list[Image.Image]]:
    """One image per plan row for every mode (`MODES`), in plan order."""
    return {
        mode: generate_sweep(
            pipeline, plan, mode, num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale, resolution=settings.resolution, sampling=settings.sampling,
            batch_size=settings.batch_size, progress=progress,
        )
        for mode in MODES
    }


def score_mode(
    table: pd.DataFrame,
    images: list[Image.Image],
    scoring_vae: AutoencoderKL,
    regressor: LatentRegressor,
    settings: EvaluationSettings,
    ground_truth: GroundTruth | None,
) -> pd.DataFrame:
    """`table` (one mode's rows, in image order) with the regressor's prediction and the ground truth."""
    table = table.copy()
    table["predicted_engagement"] = regressor.predict(
        latent_means(scoring_vae, images, settings.resolution, batch_size=settings.batch_size)
    )
    if ground_truth is not None:
        scores = ground_truth.scores(images, list(table["prompt"]))
        for column in scores.columns:  # GROUND_TRUTH_COLUMNS, then any signal's own function
            table[column] = scores[column].to_numpy()
    else:
        table[GROUND_TRUTH_COLUMNS] = np.nan
    return table


def score_modes(
    plan: pd.DataFrame,
    baselines: dict[str, pd.DataFrame],
    images: dict[str, list[Image.Image]],
    training_paths: Sequence[str],
    images_dir: Path,
    scoring_vae: AutoencoderKL,
    regressor: LatentRegressor,
    settings: EvaluationSettings,
    ground_truth: GroundTruth | None,
) -> pd.DataFrame:
    """The scored table of every mode and of the retrieval baselines (`baselines`: mode -> its
    rows, `train_index` naming the training image). `image_path` is the training image for a
    baseline, else `images_dir / image_name(...)` (where `save_images` puts it). A baseline's
    images are scored as training images (prompt None): what they show, not what was asked."""
    tables = []
    for mode in (*MODES, *baselines):
        baseline = baselines.get(mode)
        table = plan.copy() if baseline is None else baseline.drop(columns="train_index").assign(prompt=None)
        table.insert(0, "mode", mode)
        table = score_mode(table, images[mode], scoring_vae, regressor, settings, ground_truth)
        if baseline is not None:
            table["image_path"] = [training_paths[index] for index in baseline["train_index"]]
        else:
            table["image_path"] = [str(images_dir / image_name(mode, row)) for row in table.itertuples(index=False)]
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def save_images(scored: pd.DataFrame, images: dict[str, list[Image.Image]]) -> int:
    """Write each generated image once to its `image_path`, with its mode, prompt, seed and (with
    a vector) engagement-time in the PNG's text; returns how many files were written."""
    saved: set[str] = set()
    for mode in MODES:
        rows = scored[scored["mode"] == mode]
        for row, image in zip(rows.itertuples(index=False), images[mode]):
            if row.image_path in saved:
                continue
            metadata = {"mode": mode, "prompt": row.prompt, "seed": int(row.seed)}
            if mode not in MODES_WITHOUT_VECTOR:
                metadata["engagement_time"] = [float(row.target_engagement), float(row.target_time)]
            save_png(image, row.image_path, metadata)
            saved.add(row.image_path)
    return len(saved)


def sweep_figures(
    scored: pd.DataFrame, images: dict[str, list[Image.Image]], settings: EvaluationSettings
) -> dict[str, Image.Image]:
    """Labelled figures by title ("Engagement sweep", "Time sweep" when run): a row per (prompt,
    seed), the base model and plain LoRA beside EC-LoRA-T's targets, the scores under each image."""
    generated = scored[~scored["mode"].isin([RETRIEVAL, PROMPT_AWARE_RETRIEVAL])]
    figures = {}
    for sweep in ("engagement", "time"):
        if (generated["sweep"] == sweep).any():
            figures[f"{sweep.capitalize()} sweep"] = sweep_figure(
                generated, images, sweep, settings.prompts, settings.seeds,
                title=f"{sweep.capitalize()} sweep (rows: prompt x seed; truth: the audience's hidden score"
                      f"{' / creator drift' if sweep == 'time' else ''}, reg: the latent regressor)",
            )
    return figures


def style_profiles(
    ground_truth: GroundTruth, creator_images: list[Image.Image], images: dict[str, list[Image.Image]]
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Each generating mode's style profile beside the creator's posts', and each mode's distance
    to the creator's: (profiles, distances by mode)."""
    profiles = {"creator": ground_truth.style_profile(creator_images)}
    profiles |= {mode: ground_truth.style_profile(images[mode]) for mode in MODES}
    return profiles, {mode: ground_truth.style_distance(profiles[mode], profiles["creator"]) for mode in MODES}


def spearman_by_signal(scored: pd.DataFrame, signal_columns: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """Per engagement signal, each mode's Spearman of the engagement target with that signal's
    hidden function: which audience's taste the images follow as the target rises (the headline
    scores the function of the engagement trained on)."""
    rows = scored[scored["sweep"] == "engagement"]
    return {
        signal: {mode: spearman(mode_rows["target_engagement"].to_numpy(), mode_rows[column].to_numpy())
                 for mode, mode_rows in rows.groupby("mode", sort=False)}
        for signal, column in signal_columns.items()
    }


def evaluate_adapter(
    pipeline: ECLoRAPipeline,
    scoring_vae: AutoencoderKL,
    regressor: LatentRegressor,
    training_table: pd.DataFrame,
    settings: EvaluationSettings,
    *,
    images_dir: str | Path,
    ground_truth: GroundTruth | None = None,
    progress: bool | None = None,
) -> Evaluation:
    """Sweep, score and report. `pipeline` carries the adapter (`load_pipeline`); `scoring_vae`
    is the base model's VAE in fp32 (`ec_lora_t.models.load_vae`), as the latents stage encoded
    the training images with; `training_table` holds `TRAINING_COLUMNS`; `images_dir` is where
    the generated images' `image_path`s point (`save_images` writes them)."""
    missing = set(TRAINING_COLUMNS) - set(training_table.columns)
    if missing:
        raise ValueError(f"training table is missing columns {sorted(missing)}")
    training_paths = list(training_table["image_path"])

    # 1. The plan, and the retrieval baselines' training images (every one on the demo: the
    #    creator's style profile is read from them, and the prompt-aware ceiling reads what each shows).
    plan = sweep_plan(
        settings.prompts, settings.seeds, settings.engagement_targets, settings.time, settings.time_targets,
        settings.fixed_engagement,
    )
    training_vectors = training_table[TRAINING_COLUMNS[1:]].to_numpy()
    baselines = {RETRIEVAL: retrieval_plan(plan, training_vectors, settings.retrieval_k)}
    needed = set(baselines[RETRIEVAL]["train_index"]) | (set(range(len(training_table))) if ground_truth else set())
    training_images = load_training_images(training_paths, needed, settings.resolution)
    aware = None if ground_truth is None else ground_truth.prompt_aware_plan(
        plan, training_vectors, [training_images[index] for index in range(len(training_table))],
        settings.prompts, settings.retrieval_k,
    )
    if aware is not None:
        baselines[PROMPT_AWARE_RETRIEVAL] = aware

    # 2. Generate every mode; a baseline's images are the training images it picked.
    images = generate_modes(pipeline, plan, settings, progress)
    for mode, baseline in baselines.items():
        images[mode] = [training_images[index] for index in baseline["train_index"]]

    # 3. Score every image and assemble the table.
    scored = score_modes(plan, baselines, images, training_paths, Path(images_dir), scoring_vae, regressor,
                         settings, ground_truth)

    # 4. The labelled figures.
    figures = sweep_figures(scored, images, settings)

    # 5. The report: every metric, the style shift on a world with known rules, the counts.
    # The prompt-aware ceiling is reported beside the retrieval ceiling, never as a competitor
    # in the verdicts (which compare EC-LoRA-T with the base model and the plain LoRA only).
    report = sweep_report(scored[scored["mode"] != PROMPT_AWARE_RETRIEVAL], permutations=settings.permutations)
    if PROMPT_AWARE_RETRIEVAL in baselines:
        add_prompt_aware_shares(report, prompt_aware_ceiling(scored, permutations=settings.permutations))
    profiles = None
    if ground_truth is not None:
        if ground_truth.signal_columns:
            report["ground_truth_by_signal"] = spearman_by_signal(scored, ground_truth.signal_columns)
        creator = [training_images[index] for index in range(len(training_table))]
        profiles, report["style"] = style_profiles(ground_truth, creator, images)
        report["verdict"]["style_shift"] = report["style"]["ec_lora"]["mean"] < report["style"]["base"]["mean"]
    report |= {
        "num_prompts": len(settings.prompts),
        "num_seeds": len(settings.seeds),
        "num_images": int(scored.loc[scored["mode"].isin(MODES), "image_path"].nunique()),
    }
    return Evaluation(scored, images, figures, report, profiles)

"""Stage `regressor`: fit the latent engagement regressor under both protocols, save one.

Both protocols run every time so that the report's number and the honest one sit side by
side (metrics/regressor.json: the headline; --details: everything); `regressor.protocol` picks
the model the evaluate stage uses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ec_lora_t.data.latent_shards import (
    INDEX_NAME,
    load_shard_tensors,
    read_shard_index,
)
from ec_lora_t.evaluation.regressor import (
    evaluate_grouped_kfold,
    evaluate_report_protocol,
)
from stages._common import load_section, run_stage, stage_parser, write_metrics
from stages.params.regressor import RegressorParams

INDEX_COLUMNS = ("shortcode", "image_index", "normalized_engagement", "normalized_time")
# Below this many held-out images (in a fold, or in the report's test split) R^2 and Spearman
# swing with single images: 2 test images give a Spearman of +-1 whatever the model.
SMALL_SAMPLE_IMAGES = 10


def load_training_latents(latents_dir: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """`latent_mean` (N, 4, h, w) of the latents stage's shards and its index rows, in the same order."""
    index = read_shard_index(latents_dir, required_columns=INDEX_COLUMNS)
    latent_mean = load_shard_tensors(latents_dir, ["latent_mean"], index)["latent_mean"].numpy()
    if latent_mean.ndim != 4:
        raise ValueError(f"{latents_dir}: latent_mean must be (N, C, h, w), got {latent_mean.shape}")
    for column in ("normalized_engagement", "normalized_time"):
        if index[column].isna().any():
            raise ValueError(f"{latents_dir / INDEX_NAME}: column {column} has missing values")
    return latent_mean, index.reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--latents", type=Path, required=True, help="the latents stage's shard folder (data/latents)")
    parser.add_argument("--out", type=Path, required=True, help="folder for regressor.safetensors + regressor.json")
    parser.add_argument("--predictions", type=Path, required=True,
                        help="folder of held-out predictions, one CSV per protocol (DVC plots)")
    parser.add_argument("--details", type=Path, required=True,
                        help="JSON of both protocols' results, baselines and split sizes (the headline in --metrics)")
    args = parser.parse_args(argv)

    params = load_section(RegressorParams, "regressor", args.params)

    latent_mean, index = load_training_latents(args.latents)
    inputs = dict(
        latents=latent_mean,
        target=index["normalized_engagement"].to_numpy(),
        groups=index["shortcode"].astype(str).to_numpy(),
        normalized_time=index["normalized_time"].to_numpy(),
    )
    results = {
        "grouped_kfold": evaluate_grouped_kfold(
            **inputs, folds=params.folds, alphas=list(params.alphas), seed=params.seed
        ),
        "report": evaluate_report_protocol(**inputs, seed=params.seed),
    }
    results[params.protocol].regressor.save(args.out)

    predictions = pd.concat(
        [
            pd.DataFrame(
                {
                    "protocol": name,
                    "shortcode": index["shortcode"].to_numpy()[result.heldout_rows],
                    "image_index": index["image_index"].to_numpy()[result.heldout_rows],
                    "fold": result.heldout_fold,
                    "target_engagement": inputs["target"][result.heldout_rows],
                    "predicted_engagement": result.heldout_predicted,
                }
            )
            for name, result in results.items()
        ],
        ignore_index=True,
    )
    # One file per protocol, so that `dvc plots show` colours the scatter by protocol.
    args.predictions.mkdir(parents=True, exist_ok=True)
    for protocol, rows in predictions.groupby("protocol"):
        rows.to_csv(args.predictions / f"{protocol}.csv", index=False)

    for name, result in results.items():
        smallest = int(np.bincount(result.heldout_fold).min())
        result.metrics["smallest_heldout_images"] = smallest
        result.metrics["small_sample"] = smallest < SMALL_SAMPLE_IMAGES
        if smallest < SMALL_SAMPLE_IMAGES:
            print(f"regressor: the {name} protocol holds out as few as {smallest} image(s) at once "
                  f"(< {SMALL_SAMPLE_IMAGES}); its R^2 and Spearman are unreliable (small_sample: true)",
                  file=sys.stderr)
    details = {
        "num_images": len(index),
        "num_posts": int(index["shortcode"].nunique()),
        "num_features": int(np.prod(latent_mean.shape[1:])),
        **{name: result.metrics for name, result in results.items()},
    }
    write_metrics(args.details, details)
    # The few numbers compared across experiments (dvc exp show): the honest protocol's, and the
    # report's R^2 beside it; every baseline and split size in --details. Names that no other
    # metrics file uses, or dvc exp show would prefix each with its file's path.
    honest = details["grouped_kfold"]
    write_metrics(
        args.metrics,
        {
            "heldout_r2": honest["r2"],
            "heldout_spearman": honest["spearman"],
            "beats_time_baseline": honest["beats_time_baseline"],
            "small_sample": honest["small_sample"] or details["report"]["small_sample"],
            "report_r2": details["report"]["r2"],
        },
    )


if __name__ == "__main__":
    run_stage(main)

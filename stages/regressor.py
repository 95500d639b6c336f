"""Stage `regressor`: fit the latent engagement regressor under both protocols, save one.

Both protocols run every time so that the report's number and the honest one sit side by
side in metrics/regressor.json; `regressor.protocol` picks the model the evaluate stage uses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file

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


def load_training_latents(latents_path: Path, index_path: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """`latent_mean` (N, 4, h, w) and the index rows in the same order, checked against each other."""
    tensors = load_file(str(latents_path))
    if "latent_mean" not in tensors:
        raise KeyError(f"{latents_path}: no tensor 'latent_mean' (has {sorted(tensors)})")
    latent_mean = tensors["latent_mean"]
    if latent_mean.ndim != 4:
        raise ValueError(f"{latents_path}: latent_mean must be (N, C, h, w), got {latent_mean.shape}")
    index = pd.read_parquet(index_path)
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise ValueError(f"{index_path}: missing columns {missing}")
    if len(index) != len(latent_mean):
        raise ValueError(f"{index_path} has {len(index)} rows but {latents_path} has {len(latent_mean)} latents")
    for column in ("normalized_engagement", "normalized_time"):
        if index[column].isna().any():
            raise ValueError(f"{index_path}: column {column} has missing values")
    return latent_mean, index.reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--latents", type=Path, required=True, help="latents.safetensors from the latents stage")
    parser.add_argument("--index", type=Path, required=True, help="index.parquet from the latents stage")
    parser.add_argument("--out", type=Path, required=True, help="folder for regressor.safetensors + regressor.json")
    parser.add_argument("--predictions", type=Path, required=True, help="CSV of held-out predictions (DVC plot)")
    args = parser.parse_args(argv)

    params = load_section(RegressorParams, "regressor", args.params)

    latent_mean, index = load_training_latents(args.latents, args.index)
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
    args.predictions.parent.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(args.predictions, index=False)

    for name, result in results.items():
        smallest = int(np.bincount(result.heldout_fold).min())
        result.metrics["smallest_heldout_images"] = smallest
        result.metrics["small_sample"] = smallest < SMALL_SAMPLE_IMAGES
        if smallest < SMALL_SAMPLE_IMAGES:
            print(f"regressor: the {name} protocol holds out as few as {smallest} image(s) at once "
                  f"(< {SMALL_SAMPLE_IMAGES}); its R^2 and Spearman are unreliable (small_sample: true)",
                  file=sys.stderr)
    write_metrics(
        args.metrics,
        {
            "num_images": len(index),
            "num_posts": int(index["shortcode"].nunique()),
            "num_features": int(np.prod(latent_mean.shape[1:])),
            **{name: result.metrics for name, result in results.items()},
        },
    )


if __name__ == "__main__":
    run_stage(main)

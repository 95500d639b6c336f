"""The latent regressor: honest grouped protocol vs the report's, pickle-free save/load, the stage."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ec_lora_t.data.latent_shards import LatentShardWriter, write_shard_index
from ec_lora_t.evaluation.regressor import (
    LatentRegressor,
    evaluate_grouped_kfold,
    evaluate_report_protocol,
    load_regressor,
    regression_metrics,
)

ALPHAS = [0.01, 1.0, 100.0, 10000.0]
LATENT_SHAPE = (4, 2, 2)


def carousel_feed(
    num_posts: int, images_per_post: int, seed: int, engagement_from_latents: bool, latent_shape=LATENT_SHAPE
):
    """Posts whose images look alike (shared 'look' + small noise) and share one label.

    With `engagement_from_latents`, engagement is the mean of latent channel 0 (a brightness-like
    property any linear model can read); otherwise it is noise, unrelated to the pixels.
    """
    rng = np.random.default_rng(seed)
    look = rng.normal(size=(num_posts, *latent_shape))
    image_noise = 0.05 * rng.normal(size=(num_posts * images_per_post, *latent_shape))
    latents = np.repeat(look, images_per_post, axis=0) + image_noise
    if engagement_from_latents:
        per_post = look[:, 0].mean(axis=(1, 2))
    else:
        per_post = rng.uniform(size=num_posts)
    engagement = np.repeat((per_post - per_post.min()) / np.ptp(per_post), images_per_post)
    groups = np.repeat([f"post{i:03d}" for i in range(num_posts)], images_per_post)
    normalized_time = rng.uniform(size=len(latents))
    return latents.astype(np.float32), engagement, groups, normalized_time


def test_report_protocol_leaks_where_grouped_kfold_does_not():
    # Labels are pure noise per post: nothing can be learned, only memorised across a carousel.
    # More features than images, as in the report (thousands of features, about 200 images).
    latents, engagement, groups, normalized_time = carousel_feed(
        40, 3, seed=0, engagement_from_latents=False, latent_shape=(4, 8, 8)
    )
    report = evaluate_report_protocol(latents, engagement, groups, normalized_time, seed=42)
    honest = evaluate_grouped_kfold(latents, engagement, groups, normalized_time, folds=5, alphas=ALPHAS, seed=42)

    assert report.metrics["posts_in_train_and_test"] > 0
    assert report.metrics["r2"] > 0.9  # the report's kind of number, from noise
    assert honest.metrics["r2"] < 0.1
    assert not honest.metrics["beats_mean_baseline"]


def test_grouped_kfold_recovers_a_real_signal_and_beats_baselines():
    latents, engagement, groups, normalized_time = carousel_feed(40, 3, seed=1, engagement_from_latents=True)
    result = evaluate_grouped_kfold(latents, engagement, groups, normalized_time, folds=5, alphas=ALPHAS, seed=42)

    assert result.metrics["r2"] > 0.8
    assert result.metrics["spearman"] > 0.9
    assert result.metrics["baseline_mean"]["r2"] < 0.05
    assert result.metrics["baseline_time"]["r2"] < 0.1
    assert result.metrics["beats_mean_baseline"] and result.metrics["beats_time_baseline"]
    assert result.metrics["alpha"] in ALPHAS


def test_grouped_kfold_predicts_every_image_once_from_folds_that_never_split_a_post():
    latents, engagement, groups, normalized_time = carousel_feed(20, 3, seed=2, engagement_from_latents=True)
    result = evaluate_grouped_kfold(latents, engagement, groups, normalized_time, folds=4, alphas=ALPHAS, seed=0)

    np.testing.assert_array_equal(np.sort(result.heldout_rows), np.arange(len(latents)))
    folds_per_post = pd.Series(result.heldout_fold).groupby(groups[result.heldout_rows]).nunique()
    assert (folds_per_post == 1).all()
    assert set(result.heldout_fold) == {0, 1, 2, 3}


def test_saved_regressor_round_trips_and_matches_sklearn(tmp_path):
    latents, engagement, groups, normalized_time = carousel_feed(20, 2, seed=3, engagement_from_latents=True)
    result = evaluate_grouped_kfold(latents, engagement, groups, normalized_time, folds=3, alphas=ALPHAS, seed=0)
    result.regressor.save(tmp_path / "regressor")

    loaded = load_regressor(tmp_path / "regressor")
    assert sorted(p.name for p in (tmp_path / "regressor").iterdir()) == ["regressor.json", "regressor.safetensors"]
    assert loaded.latent_shape == LATENT_SHAPE and loaded.model == "ridge" and loaded.protocol == "grouped_kfold"

    flat = latents.reshape(len(latents), -1).astype(np.float64)
    reference = make_pipeline(StandardScaler(), Ridge(alpha=loaded.alpha)).fit(flat, engagement)
    np.testing.assert_allclose(loaded.predict(latents), reference.predict(flat), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(loaded.predict(flat), loaded.predict(latents))


def test_report_regressor_saves_identity_scaler(tmp_path):
    latents, engagement, groups, normalized_time = carousel_feed(20, 2, seed=4, engagement_from_latents=True)
    result = evaluate_report_protocol(latents, engagement, groups, normalized_time, seed=42)
    result.regressor.save(tmp_path)
    loaded = load_regressor(tmp_path)

    assert loaded.model == "linear_regression" and loaded.alpha is None
    assert loaded.num_training_images == result.metrics["num_train_images"] == 32
    test_rows = result.heldout_rows
    np.testing.assert_allclose(loaded.predict(latents[test_rows]), result.heldout_predicted, rtol=1e-6, atol=1e-9)


def test_predict_rejects_latents_of_another_resolution():
    regressor = LatentRegressor(
        coefficients=np.ones(16), intercept=0.0, scaler_mean=np.zeros(16), scaler_scale=np.ones(16),
        latent_shape=LATENT_SHAPE, model="ridge", alpha=1.0, protocol="grouped_kfold", num_training_images=1,
    )
    with pytest.raises(ValueError, match=r"shape \(4, 2, 2\).*\(4, 8, 8\)"):
        regressor.predict(np.zeros((2, 4, 8, 8)))
    with pytest.raises(ValueError, match="expected latents"):
        regressor.predict(np.zeros((2, 17)))


def test_load_regressor_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="regressor.json"):
        load_regressor(tmp_path)


def test_grouped_kfold_needs_as_many_posts_as_folds():
    latents, engagement, groups, normalized_time = carousel_feed(3, 2, seed=5, engagement_from_latents=True)
    with pytest.raises(ValueError, match="folds=5, posts=3"):
        evaluate_grouped_kfold(latents, engagement, groups, normalized_time, folds=5, alphas=ALPHAS, seed=0)


@pytest.mark.parametrize("folds", [2, 3, 4, 5, 7])
def test_ingests_minimum_feed_is_the_smallest_the_grouped_protocol_runs_on(folds):
    """stages.ingest.minimum_posts stops small feeds early; it must agree with the protocol itself."""
    from stages.ingest import minimum_posts

    needed = minimum_posts(folds)
    latents, engagement, groups, normalized_time = carousel_feed(needed, 1, seed=5, engagement_from_latents=True)
    evaluate_grouped_kfold(latents, engagement, groups, normalized_time, folds=folds, alphas=ALPHAS, seed=0)
    latents, engagement, groups, normalized_time = carousel_feed(needed - 1, 1, seed=5, engagement_from_latents=True)
    with pytest.raises(ValueError):
        evaluate_grouped_kfold(latents, engagement, groups, normalized_time, folds=folds, alphas=ALPHAS, seed=0)


def test_regression_metrics_known_values():
    target = np.array([0.0, 0.25, 0.5, 1.0])
    perfect = regression_metrics(target, target)
    assert perfect == {"r2": 1.0, "mse": 0.0, "spearman": 1.0}
    constant = regression_metrics(target, np.full(4, target.mean()))
    assert constant["r2"] == 0.0 and np.isnan(constant["spearman"])
    assert regression_metrics(target, target[::-1])["spearman"] == -1.0


def test_regressor_stage_writes_both_protocols_and_saves_the_chosen_one(tmp_path, monkeypatch):
    from stages import regressor as stage

    latents, engagement, groups, normalized_time = carousel_feed(20, 3, seed=6, engagement_from_latents=True)
    write_latent_shards(
        tmp_path / "latents",
        torch.from_numpy(latents),
        pd.DataFrame(
            {
                "shortcode": groups,
                "image_index": np.tile([0, 1, 2], 20),
                "image_path": [f"img{i}.jpg" for i in range(len(groups))],
                "normalized_engagement": engagement,
                "normalized_time": normalized_time,
            }
        ),
    )
    params = {"regressor": {"protocol": "report", "folds": 4, "alphas": ALPHAS, "seed": 42}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "argv",
        ["regressor", "--latents", "latents", "--out", "out",
         "--predictions", "plots/regressor", "--metrics", "metrics/regressor.json", "--details", "details.json"],
    )
    stage.main()

    headline = json.loads((tmp_path / "metrics/regressor.json").read_text())
    metrics = json.loads((tmp_path / "details.json").read_text())
    assert headline == {"heldout_r2": metrics["grouped_kfold"]["r2"],
                        "heldout_spearman": metrics["grouped_kfold"]["spearman"],
                        "beats_time_baseline": metrics["grouped_kfold"]["beats_time_baseline"],
                        "small_sample": False, "report_r2": metrics["report"]["r2"]}
    assert metrics["num_images"] == 60 and metrics["num_posts"] == 20 and metrics["num_features"] == 16
    for protocol in ("report", "grouped_kfold"):
        assert {"r2", "mse", "spearman", "baseline_mean", "baseline_time", "beats_mean_baseline",
                "beats_time_baseline"} <= metrics[protocol].keys()
    assert metrics["grouped_kfold"]["r2"] > 0.8
    assert load_regressor(tmp_path / "out").protocol == "report"
    # 20 posts x 3 images: folds of 15 images, a report test split of 12: not small samples.
    assert (metrics["grouped_kfold"]["smallest_heldout_images"], metrics["report"]["smallest_heldout_images"]) == (
        15, 12)
    assert not metrics["grouped_kfold"]["small_sample"] and not metrics["report"]["small_sample"]

    predictions = pd.concat([pd.read_csv(tmp_path / f"plots/regressor/{protocol}.csv")
                             for protocol in ("grouped_kfold", "report")], ignore_index=True)
    counts = predictions["protocol"].value_counts()
    assert counts["grouped_kfold"] == 60 and counts["report"] == 12
    assert list(predictions.columns) == [
        "protocol", "shortcode", "image_index", "fold", "target_engagement", "predicted_engagement"
    ]


def write_latent_shards(out_dir, latent_mean: torch.Tensor, index: pd.DataFrame, shard_size: int = 25) -> None:
    """The latents stage's layout: shards of `shard_size` rows and index.parquet."""
    writer = LatentShardWriter(out_dir, shard_size)
    writer.add({"latent_mean": latent_mean, "latent_std": torch.ones(latent_mean.shape)})
    writer.close()
    write_shard_index(out_dir, index, shard_size)


def test_regressor_stage_flags_a_small_sample(tmp_path, monkeypatch, capsys):
    """8 single-image posts: folds of 1-2 images, a report test split of 2; metrics and stderr say so."""
    from stages import regressor as stage

    latents, engagement, groups, normalized_time = carousel_feed(8, 1, seed=6, engagement_from_latents=True)
    write_latent_shards(tmp_path / "latents", torch.from_numpy(latents), pd.DataFrame({
        "shortcode": groups, "image_index": 0, "normalized_engagement": engagement, "normalized_time": normalized_time,
    }))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"regressor": {"protocol": "grouped_kfold", "folds": 5, "alphas": ALPHAS, "seed": 42}}))
    monkeypatch.chdir(tmp_path)
    stage.main(["--latents", "latents", "--out", "out", "--predictions", "predictions", "--metrics", "regressor.json",
                "--details", "details.json"])
    assert json.loads((tmp_path / "regressor.json").read_text())["small_sample"]
    metrics = json.loads((tmp_path / "details.json").read_text())
    assert metrics["report"]["small_sample"] and metrics["report"]["smallest_heldout_images"] == 2
    assert metrics["grouped_kfold"]["small_sample"] and metrics["grouped_kfold"]["smallest_heldout_images"] == 1
    assert "the report protocol holds out as few as 2 image(s)" in capsys.readouterr().err


def test_regressor_stage_names_the_file_with_a_missing_value(tmp_path):
    from stages.regressor import load_training_latents

    write_latent_shards(
        tmp_path, torch.zeros(2, *LATENT_SHAPE),
        pd.DataFrame({"shortcode": ["a", "b"], "image_index": [0, 0], "normalized_engagement": [0.1, None],
                      "normalized_time": [0.0, 1.0]}),
    )
    with pytest.raises(ValueError, match=r"index.parquet: column normalized_engagement has missing values"):
        load_training_latents(tmp_path)
    write_latent_shards(
        tmp_path, torch.zeros(2, *LATENT_SHAPE),
        pd.DataFrame({"shortcode": ["a", "b"], "normalized_engagement": [0.1, 0.2], "normalized_time": [0.0, 1.0]}),
    )
    with pytest.raises(ValueError, match=r"index.parquet: missing columns \['image_index'\]"):
        load_training_latents(tmp_path)

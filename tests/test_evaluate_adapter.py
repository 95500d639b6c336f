"""The evaluation as a library function (`ec_lora_t.evaluation.evaluate`) on the tiny model, without DVC."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ec_lora_t.evaluation.evaluate import (
    GROUND_TRUTH_COLUMNS,
    EvaluationSettings,
    evaluate_adapter,
    figure_file_name,
    save_images,
)
from ec_lora_t.evaluation.regressor import LatentRegressor
from ec_lora_t.evaluation.sweep import latent_means, retrieval_plan
from ec_lora_t.generation import VectorSampling, load_pipeline, read_png_metadata
from ec_lora_t.models import load_vae

RESOLUTION = 32  # the tiny VAE's latents: (4, 8, 8)


@pytest.fixture(scope="module")
def models(tiny_sd_dir, adapter_dir):
    rng = np.random.default_rng(0)
    regressor = LatentRegressor(
        coefficients=rng.normal(size=256) / 16, intercept=0.5, scaler_mean=np.zeros(256), scaler_scale=np.ones(256),
        latent_shape=(4, 8, 8), model="ridge", alpha=1.0, protocol="grouped_kfold", num_training_images=4,
    )
    return load_pipeline(tiny_sd_dir, adapter_dir=adapter_dir), load_vae(tiny_sd_dir), regressor


@pytest.fixture
def training_table(tmp_path):
    """Four training images of different brightness, engagement rising and time falling."""
    paths = []
    for index in range(4):
        path = tmp_path / "posts" / f"img_{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 48), (60 * index, 30, 200 - 40 * index)).save(path)
        paths.append(str(path))
    return pd.DataFrame({"image_path": paths, "normalized_engagement": np.linspace(0, 1, 4),
                         "normalized_time": np.linspace(1, 0, 4)})


SETTINGS = EvaluationSettings(
    prompts=["a man in a red jacket on a city street"], seeds=[1, 2], engagement_targets=[0.0, 1.0], time=0.5,
    fixed_engagement=0.5, num_inference_steps=1, guidance_scale=2.0, permutations=20, resolution=RESOLUTION,
    sampling=VectorSampling(vector_guidance=2.0), batch_size=8, retrieval_k=2,
)


class BrightnessTruth:
    """A known world: an image's appeal is its brightness; its style profile, its mean red."""

    signal_columns = {}  # one engagement signal: nothing to report per signal

    def scores(self, images, prompts):
        brightness = [np.asarray(image, dtype=np.float64).mean() / 255 for image in images]
        return pd.DataFrame({"ground_truth_score": brightness, "time_ground_truth": brightness,
                             "adherence_matched": 0, "adherence_named": 0})[GROUND_TRUTH_COLUMNS]

    def style_profile(self, images):
        return {"red": {"mean": float(np.mean([np.asarray(image)[..., 0].mean() / 255 for image in images]))}}

    def style_distance(self, profile, reference):
        return {"mean": abs(profile["red"]["mean"] - reference["red"]["mean"])}

    def prompt_aware_plan(self, plan, training_vectors, training_images, prompts, k):
        return None  # this world cannot read what a prompt names


class NamesNothingTruth(BrightnessTruth):
    """A world whose prompts name nothing: every training image agrees with every prompt, so the
    prompt-aware ceiling is the retrieval ceiling itself."""

    def prompt_aware_plan(self, plan, training_vectors, training_images, prompts, k):
        return retrieval_plan(plan, training_vectors, k)


def test_evaluate_adapter_scores_every_mode_and_writes_nothing(models, training_table, tmp_path):
    pipeline, vae, regressor = models
    evaluation = evaluate_adapter(pipeline, vae, regressor, training_table, SETTINGS, images_dir=tmp_path / "images")
    assert not (tmp_path / "images").exists()  # writing is the caller's

    scored = evaluation.scored
    # 3 modes x 1 prompt x 2 seeds x 2 targets, and the baseline's 2 targets x k = 2 training images
    assert scored["mode"].value_counts().to_dict() == {"ec_lora": 4, "plain_lora": 4, "base": 4, "retrieval": 4}
    assert scored[GROUND_TRUTH_COLUMNS].isna().all().all()  # no ground truth given
    assert set(scored.loc[scored["mode"] == "retrieval", "image_path"]) <= set(training_table["image_path"])
    assert evaluation.style_profiles is None and "style" not in evaluation.report
    assert "ground_truth" not in evaluation.report["engagement_sweep"]["ec_lora"]
    assert set(evaluation.report["verdict"]) == {"controls_engagement"}
    # plain LoRA and base share one image per (prompt, seed); EC-LoRA-T has one per vector.
    assert evaluation.report["num_images"] == 4 + 2 + 2
    assert {mode: len(images) for mode, images in evaluation.images.items()} == {
        "ec_lora": 4, "plain_lora": 4, "base": 4, "retrieval": 4}
    # The prediction is the regressor on the scoring VAE's latent means of that very image.
    for mode in ("ec_lora", "retrieval"):
        rows = scored[scored["mode"] == mode]
        expected = regressor.predict(latent_means(vae, evaluation.images[mode], RESOLUTION))
        np.testing.assert_allclose(rows["predicted_engagement"], expected, rtol=1e-5)
    ec_lora = scored[(scored["mode"] == "ec_lora") & (scored["seed"] == 1)]
    assert ec_lora["predicted_engagement"].nunique() == 2  # the vector changes the image

    assert list(evaluation.figures) == ["Engagement sweep"]  # no time targets: no time sweep
    assert figure_file_name("Engagement sweep") == "engagement_sweep.png"
    assert save_images(scored, evaluation.images) == 8
    written = sorted(path.relative_to(tmp_path / "images").as_posix() for path in (tmp_path / "images").rglob("*.png"))
    assert len(written) == 8 and "base/p00_seed1.png" in written and "ec_lora/p00_seed2_e1.00_t0.50.png" in written
    metadata = read_png_metadata(tmp_path / "images/ec_lora/p00_seed2_e1.00_t0.50.png")
    assert metadata["mode"] == "ec_lora" and metadata["engagement_time"] == "[1.0, 0.5]"


def test_a_ground_truth_object_scores_every_image_and_the_style(models, training_table, tmp_path):
    pipeline, vae, regressor = models
    settings = EvaluationSettings(**{**SETTINGS.__dict__, "time_targets": [0.0, 1.0]})
    evaluation = evaluate_adapter(pipeline, vae, regressor, training_table, settings, images_dir=tmp_path / "images",
                                  ground_truth=BrightnessTruth())
    scored = evaluation.scored
    assert scored["ground_truth_score"].notna().all()
    for mode, images in evaluation.images.items():
        expected = BrightnessTruth().scores(images, [None] * len(images))["ground_truth_score"]
        np.testing.assert_allclose(scored.loc[scored["mode"] == mode, "ground_truth_score"], expected)
    report = evaluation.report
    assert "ground_truth" in report["engagement_sweep"]["ec_lora"] and "ground_truth" in report["time_sweep"]["base"]
    # The creator's profile is read from every training image, not only those the baseline picked.
    creator_red = np.mean([np.asarray(Image.open(path).convert("RGB").resize((32, 32)))[..., 0].mean() / 255
                           for path in training_table["image_path"]])
    assert evaluation.style_profiles["creator"]["red"]["mean"] == pytest.approx(creator_red, abs=1e-6)
    assert set(evaluation.style_profiles) == {"creator", "ec_lora", "plain_lora", "base"}
    assert report["verdict"]["style_shift"] == (report["style"]["ec_lora"]["mean"] < report["style"]["base"]["mean"])
    assert list(evaluation.figures) == ["Engagement sweep", "Time sweep"]


class TwoSignalTruth(BrightnessTruth):
    """Likes follow brightness, saves follow darkness: the report must tell them apart."""

    signal_columns = {"likes": "appeal_bright", "saves": "appeal_dark"}

    def scores(self, images, prompts):
        table = super().scores(images, prompts)
        return table.assign(appeal_bright=table["ground_truth_score"], appeal_dark=1 - table["ground_truth_score"])


def test_each_signals_own_function_is_scored_and_reported(models, training_table, tmp_path):
    pipeline, vae, regressor = models
    evaluation = evaluate_adapter(pipeline, vae, regressor, training_table, SETTINGS, images_dir=tmp_path / "images",
                                  ground_truth=TwoSignalTruth())
    assert {"appeal_bright", "appeal_dark"} <= set(evaluation.scored.columns)
    by_signal = evaluation.report["ground_truth_by_signal"]
    assert set(by_signal) == {"likes", "saves"} and set(by_signal["likes"]) >= {"ec_lora", "base", "retrieval"}
    engagement = evaluation.report["engagement_sweep"]
    for mode in ("ec_lora", "retrieval"):
        assert by_signal["likes"][mode] == pytest.approx(engagement[mode]["ground_truth"]["spearman"])
        assert by_signal["saves"][mode] == pytest.approx(-by_signal["likes"][mode])
    assert by_signal["likes"]["retrieval"] > 0.5  # the training images' brightness rises with engagement here


def test_a_training_table_without_the_needed_columns_is_refused(models, training_table, tmp_path):
    pipeline, vae, regressor = models
    with pytest.raises(ValueError, match=r"training table is missing columns \['normalized_time'\]"):
        evaluate_adapter(pipeline, vae, regressor, training_table.drop(columns="normalized_time"), SETTINGS,
                         images_dir=tmp_path)


def test_the_prompt_aware_ceiling_is_reported_beside_the_retrieval_ceiling(models, training_table, tmp_path):
    pipeline, vae, regressor = models
    evaluation = evaluate_adapter(pipeline, vae, regressor, training_table, SETTINGS, images_dir=tmp_path / "images",
                                  ground_truth=NamesNothingTruth())
    report = evaluation.report
    ec_lora = report["engagement_sweep"]["ec_lora"]["ground_truth"]
    # The same images as the retrieval ceiling: the same share, computed the second way.
    assert ec_lora["share_of_prompt_aware_ceiling"] == pytest.approx(ec_lora["share_of_ceiling"])
    assert "prompt_aware_retrieval" not in report["engagement_sweep"]  # a ceiling, not a competitor
    scored = evaluation.scored
    aware = scored[scored["mode"] == "prompt_aware_retrieval"]
    assert len(aware) == len(scored[scored["mode"] == "retrieval"])
    # Without a prompt-aware plan (BrightnessTruth) there is no such ceiling.
    plain = evaluate_adapter(pipeline, vae, regressor, training_table, SETTINGS, images_dir=tmp_path / "images2",
                             ground_truth=BrightnessTruth()).report
    assert "prompt_aware_ceiling" not in plain
    assert "share_of_prompt_aware_ceiling" not in plain["engagement_sweep"]["ec_lora"]["ground_truth"]

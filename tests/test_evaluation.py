"""Sweep metrics on constructed inputs whose answer is known, the sweep plan, the verdict, the grid."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from scipy import stats

from ec_lora_t.demo.demo_data import write_demo_posts
from ec_lora_t.evaluation.regressor import LatentRegressor
from ec_lora_t.evaluation.stats import block_bootstrap_se
from ec_lora_t.evaluation.sweep import (
    controls_signal,
    headline_metrics,
    is_monotone,
    permutation_test_spearman,
    range_ratio,
    retrieval_plan,
    slope,
    spearman,
    sweep_blocks,
    sweep_metrics,
    sweep_plan,
    sweep_report,
    target_key,
    target_table,
)

TARGETS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
REPORT_PREDICTED = np.array([0.0668, 0.0767, 0.0827, 0.0809, 0.0549])  # report table 5.1.3


def repeated_targets(num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The targets of `num_blocks` (prompt, seed) blocks and each row's block id."""
    return np.tile(TARGETS, num_blocks), np.repeat(np.arange(num_blocks), len(TARGETS))


def test_perfect_monotone_predictor_has_spearman_one_and_the_smallest_exact_p():
    predicted = np.exp(3 * TARGETS)  # monotone, not linear
    assert spearman(TARGETS, predicted) == pytest.approx(1.0)
    test = permutation_test_spearman(TARGETS, predicted, permutations=1000)
    assert test.exact and test.num_permutations == 120  # 5! arrangements, all enumerated
    assert test.statistic == pytest.approx(1.0)
    assert test.p_value == pytest.approx(1 / 120)


def test_shuffled_predictor_gives_a_large_p_value():
    rng = np.random.default_rng(0)
    target, blocks = repeated_targets(8)
    predicted = rng.permutation(target) + 0.01 * rng.normal(size=len(target))
    test = permutation_test_spearman(target, predicted, blocks, permutations=2000, seed=1)
    assert not test.exact
    assert test.p_value > 0.2


def test_reversed_predictor_is_not_significant_under_the_one_sided_test():
    test = permutation_test_spearman(TARGETS, -TARGETS)
    assert test.statistic == pytest.approx(-1.0)
    assert test.p_value == 1.0


def test_statistic_is_scipy_spearman_with_ties():
    rng = np.random.default_rng(2)
    target, blocks = repeated_targets(3)
    predicted = np.round(rng.normal(size=len(target)), 1)  # ties on both sides
    test = permutation_test_spearman(target, predicted, blocks, permutations=100)
    assert test.statistic == pytest.approx(stats.spearmanr(target, predicted).statistic)


def test_small_effect_hidden_by_prompt_offsets_is_found_within_blocks():
    # Each prompt/seed block sits at its own level; within a block the prediction rises with
    # the target by a tiny amount. Over all images the Spearman is small, but every block
    # agrees, which only a within-block permutation test can see.
    target, blocks = repeated_targets(4)
    predicted = 10.0 * blocks + 0.01 * target
    assert spearman(target, predicted) < 0.3
    within = permutation_test_spearman(target, predicted, blocks, permutations=1000, seed=0)
    free = permutation_test_spearman(target, predicted, None, permutations=1000, seed=0)
    assert within.p_value < 0.01
    assert free.p_value > 0.05


def test_monte_carlo_p_value_agrees_with_the_exact_one():
    rng = np.random.default_rng(3)
    target = np.linspace(0, 1, 7)
    predicted = target + rng.normal(scale=0.3, size=7)
    exact = permutation_test_spearman(target, predicted, permutations=5040)  # 7! arrangements
    sampled = permutation_test_spearman(target, predicted, permutations=4000, seed=4)
    assert exact.exact and not sampled.exact
    assert 0.02 < exact.p_value < 0.5  # a case where the Monte Carlo error is visible
    assert sampled.p_value == pytest.approx(exact.p_value, abs=0.025)


def test_single_block_matches_scipy_exact_permutation_test():
    rng = np.random.default_rng(5)
    target = np.linspace(0, 1, 6)
    predicted = target + rng.normal(scale=0.3, size=6)
    ours = permutation_test_spearman(target, predicted, permutations=1000)
    # One sample: scipy permutes it against the fixed targets (6! pairings, as ours).
    reference = stats.permutation_test(
        (predicted,),
        lambda shuffled: stats.spearmanr(target, shuffled).statistic,
        permutation_type="pairings",
        alternative="greater",
        n_resamples=np.inf,
    )
    assert ours.exact
    assert ours.p_value == pytest.approx(reference.pvalue)


def test_constant_predictor_has_no_correlation_and_p_value_one():
    test = permutation_test_spearman(TARGETS, np.full(5, 0.3))
    assert math.isnan(test.statistic) and test.p_value == 1.0
    assert math.isnan(spearman(TARGETS, np.full(5, 0.3)))


def test_slope_and_range_ratio_known_values():
    target, _ = repeated_targets(3)
    assert slope(target, 2 * target + 1) == pytest.approx(2.0)
    assert range_ratio(target, 0.5 * target + 0.1) == pytest.approx(0.5)
    # The report's sweep: predictions span 0.0549-0.0827 for targets 0-1.
    assert range_ratio(TARGETS, REPORT_PREDICTED) == pytest.approx(0.0278)
    with pytest.raises(ValueError, match="2 distinct targets"):
        slope(np.ones(3), np.arange(3.0))


def test_range_ratio_ignores_seed_noise_that_cancels_in_the_means():
    # Two seeds, opposite noise: single images span far more than the per-target means do.
    target = np.concatenate([TARGETS, TARGETS])
    predicted = np.concatenate([np.full(5, 0.5) + 0.3, np.full(5, 0.5) - 0.3])
    assert range_ratio(target, predicted) == pytest.approx(0.0)


def test_target_table_mean_and_spread():
    table = target_table(np.array([0.0, 0.0, 1.0, 1.0]), np.array([0.1, 0.3, 0.6, 0.6]))
    assert table["target"].tolist() == [0.0, 1.0]
    assert table["mean"].tolist() == pytest.approx([0.2, 0.6])
    assert table["std"].tolist() == pytest.approx([0.1, 0.0])
    assert table["n"].tolist() == [2, 2]


def test_sweep_metrics_keys_are_stable_and_dot_free():
    target, blocks = repeated_targets(2)
    metrics = sweep_metrics(target, target + 0.1, blocks, permutations=100)
    assert set(metrics) == {
        "spearman", "spearman_se", "p_value", "permutation_exact", "slope", "range_ratio", "mean", "std", "by_target"
    }
    assert list(metrics["by_target"]) == ["target_000", "target_025", "target_050", "target_075", "target_100"]
    assert metrics["by_target"]["target_100"] == {"mean": pytest.approx(1.1), "std": 0.0, "n": 2}
    assert metrics["spearman"] == pytest.approx(1.0) and metrics["slope"] == pytest.approx(1.0)
    assert target_key(0.125) == "target_012"


def test_block_bootstrap_se_is_zero_when_every_resample_agrees_and_shrinks_with_more_blocks():
    target, blocks = repeated_targets(8)
    assert block_bootstrap_se(target, np.exp(target), blocks) == 0.0  # every resample ranks perfectly
    rng = np.random.default_rng(0)
    few = block_bootstrap_se(target, target + rng.normal(0, 0.5, len(target)), blocks)
    target_many, blocks_many = repeated_targets(128)
    many = block_bootstrap_se(target_many, target_many + rng.normal(0, 0.5, len(target_many)), blocks_many)
    assert 0.0 < many < few and many / few == pytest.approx(0.25, abs=0.12)  # ~ 1 / sqrt(16)


def test_block_bootstrap_se_resamples_whole_blocks():
    # Two blocks, one following the target and one against it: Spearman 0 over both. Resampling
    # whole blocks draws AA, AB, BA or BB (Spearman 1, 0, 0, -1), so the SE is sqrt(0.5) = 0.71;
    # resampling single images would mix the blocks and give another figure (0.41 here).
    target, blocks = repeated_targets(2)
    score = np.concatenate([TARGETS, 1 - TARGETS])
    assert spearman(target, score) == pytest.approx(0.0)
    assert block_bootstrap_se(target, score, blocks) == pytest.approx(math.sqrt(0.5), abs=0.04)
    assert block_bootstrap_se(target, score, np.arange(len(target))) < 0.6
    # Blocks of unequal size take the one-resample-at-a-time path, to the same definition.
    uneven = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 2])  # B split in two: the AB/BA mixtures gain weight
    assert 0.5 < block_bootstrap_se(target, score, uneven) < 0.7
    assert math.isnan(block_bootstrap_se(target, np.ones(len(target)), blocks))
    assert math.isnan(block_bootstrap_se(target, score, np.zeros(len(target))))


def test_sweep_metrics_rejects_targets_closer_than_the_key_resolution():
    with pytest.raises(ValueError, match="distinct keys"):
        sweep_metrics(np.array([0.5, 0.501, 1.0]), np.array([0.1, 0.2, 0.3]), np.zeros(3), permutations=10)


def _mode(rho: float, p: float, slope: float = 0.3, range_ratio: float = 0.3) -> dict:
    return {"spearman": rho, "p_value": p, "slope": slope, "range_ratio": range_ratio}


def test_verdict_needs_a_positive_slope_and_an_effect_that_matters():
    references = {"plain_lora": _mode(0.0, 1.0), "base": _mode(0.0, 1.0)}
    assert controls_signal({"ec_lora": _mode(0.8, 0.01), **references})
    # significant rank order but a trend of a thousandth of the range: not control
    assert not controls_signal({"ec_lora": _mode(0.8, 0.01, range_ratio=0.001), **references})
    # a positive Spearman with a negative least-squares slope (outliers): not control
    assert not controls_signal({"ec_lora": _mode(0.2, 0.03, slope=-0.002), **references})


def test_verdict_needs_positive_significant_and_stronger_than_the_references():
    assert controls_signal(
        {"ec_lora": _mode(0.8, 0.01), "plain_lora": _mode(float("nan"), 1.0), "base": _mode(0.0, 1.0)}
    )
    assert not controls_signal({"ec_lora": _mode(0.8, 0.2), "plain_lora": _mode(0.0, 1.0), "base": _mode(0.0, 1.0)})
    assert not controls_signal({"ec_lora": _mode(-0.8, 0.01), "plain_lora": _mode(0.0, 1.0), "base": _mode(0.0, 1.0)})
    assert not controls_signal({"ec_lora": _mode(0.5, 0.01), "plain_lora": _mode(0.6, 0.01), "base": _mode(0.0, 1.0)})
    assert not controls_signal({"ec_lora": _mode(float("nan"), 1.0), "base": _mode(float("nan"), 1.0)})


def test_sweep_plan_default_is_the_reports_sweep_plus_a_time_sweep():
    prompt = "(democreator style) a person in an outfit on a city street (summer)"
    plan = sweep_plan([prompt], [42], TARGETS.tolist(), time=0.5, time_targets=[0.0, 0.5, 1.0], fixed_engagement=0.5)
    engagement = plan[plan["sweep"] == "engagement"]
    assert engagement["target_engagement"].tolist() == TARGETS.tolist()
    assert (engagement["target_time"] == 0.5).all() and (engagement["seed"] == 42).all()
    time_rows = plan[plan["sweep"] == "time"]
    assert time_rows["target_time"].tolist() == [0.0, 0.5, 1.0] and (time_rows["target_engagement"] == 0.5).all()


def test_sweep_plan_crosses_prompts_seeds_and_targets():
    plan = sweep_plan(["a", "b", "c"], [1, 2], [0.0, 1.0], time=0.5)
    assert len(plan) == 3 * 2 * 2 and set(plan["sweep"]) == {"engagement"}
    assert plan.groupby(["prompt_index", "seed"]).size().eq(2).all()


def test_sweep_blocks_group_the_plan_by_prompt_and_seed_only():
    """Prompt 1 seed 11 and prompt 11 seed 1 are two blocks (the separator keeps them apart)."""
    plan = sweep_plan([f"p{i}" for i in range(12)], [1, 11], [0.0, 0.5, 1.0], time=0.5)
    blocks = sweep_blocks(plan)
    assert len(set(blocks)) == 12 * 2
    for (prompt_index, seed), rows in plan.groupby(["prompt_index", "seed"]):
        assert len(set(blocks[rows.index])) == 1 and len(rows) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"engagement_targets": [0.5, 0.5]}, "2 distinct targets"),
        ({"engagement_targets": [0.0, 1.5]}, r"engagement_targets must lie in \[0, 1\]"),
        ({"time_targets": [0.3]}, "time sweep needs at least 2"),
        ({"seeds": []}, "at least one prompt and one seed"),
        ({"engagement_targets": [0.0, 0.5, 0.5]}, "engagement_targets has duplicates"),
    ],
)
def test_sweep_plan_rejects_bad_params(kwargs, message):
    arguments = {"prompts": ["a"], "seeds": [1], "engagement_targets": [0.0, 1.0], "time": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        sweep_plan(**arguments)


def scored_sweep(ec_lora_effect: float, seed: int = 0) -> pd.DataFrame:
    """A scored sweep table of 3 prompts x 2 seeds: EC-LoRA-T's prediction rises with the target
    by `ec_lora_effect`; plain LoRA and base ignore the target (one image per prompt/seed).
    The ground truth follows the target in every case, with noise."""
    rng = np.random.default_rng(seed)
    plan = sweep_plan(["a", "b", "c"], [1, 2], TARGETS.tolist(), time=0.5, time_targets=[0.0, 1.0])
    tables = []
    for mode in ("ec_lora", "plain_lora", "base"):
        table = plan.assign(mode=mode)
        block_level = rng.normal(size=len(table)).reshape(-1, 7).mean(axis=1).repeat(7)
        effect = ec_lora_effect if mode == "ec_lora" else 0.0
        noise = 0.01 * rng.normal(size=len(table))
        table["predicted_engagement"] = block_level + effect * table["target_engagement"] + noise
        table["ground_truth_score"] = table["target_engagement"] + 0.05 * rng.normal(size=len(table))
        if mode != "ec_lora":
            table["predicted_engagement"] = block_level
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def test_sweep_report_says_it_works_when_ec_lora_follows_the_target():
    report = sweep_report(scored_sweep(ec_lora_effect=0.5), permutations=500)
    ec_lora = report["engagement_sweep"]["ec_lora"]
    assert ec_lora["spearman"] > 0.3 and ec_lora["p_value"] < 0.01
    base = report["engagement_sweep"]["base"]
    assert base["spearman"] == pytest.approx(0)  # flat within every prompt/seed block
    assert base["p_value"] == 1.0
    assert report["verdict"] == {"controls_engagement": True, "controls_ground_truth": False}
    assert set(report["time_sweep"]) == {"ec_lora", "plain_lora", "base"}
    assert list(report["time_sweep"]["ec_lora"]["by_target"]) == ["target_000", "target_100"]
    assert ec_lora["ground_truth"]["spearman"] > 0.9  # scored against target_engagement


def test_sweep_report_says_it_does_not_when_ec_lora_ignores_the_target():
    report = sweep_report(scored_sweep(ec_lora_effect=0.0), permutations=500)
    assert report["engagement_sweep"]["ec_lora"]["p_value"] > 0.05
    assert report["verdict"]["controls_engagement"] is False


def test_sweep_report_without_ground_truth_has_no_ground_truth_keys():
    table = scored_sweep(ec_lora_effect=0.5).assign(ground_truth_score=float("nan"))
    report = sweep_report(table, permutations=100)
    assert "ground_truth" not in report["engagement_sweep"]["ec_lora"]
    assert report["verdict"] == {"controls_engagement": True}
    with pytest.raises(ValueError, match="missing columns"):
        sweep_report(table.drop(columns="predicted_engagement"), permutations=10)


def test_evaluate_stage_end_to_end_on_the_tiny_model(tiny_sd_dir, adapter_dir, tmp_path, monkeypatch):
    from stages import evaluate as stage

    latent_shape = (4, 8, 8)  # the tiny VAE at 32 px
    rng = np.random.default_rng(0)
    LatentRegressor(
        coefficients=rng.normal(size=256) / 16, intercept=0.5, scaler_mean=np.zeros(256), scaler_scale=np.ones(256),
        latent_shape=latent_shape, model="ridge", alpha=1.0, protocol="grouped_kfold", num_training_images=10,
    ).save(tmp_path / "regressor")
    params = {
        "model": {"pretrained": str(tiny_sd_dir), "resolution": 32},
        "ingest": {"posts_dir": str(tmp_path / "posts"), "insights": None},
        # the engagement's signals decide which hidden function is the ground truth
        "features": {"signals": {"likes": 1, "comments": 3}, "per": None},
        "evaluate": {
            "prompts": ["a man in a red jacket on a city street", "a woman in a blue coat on a beach"],
            "seeds": [1, 2],
            "engagement_targets": [0.0, 0.5, 1.0],
            "time": 0.5,
            "time_targets": [0.0, 1.0],
            "fixed_engagement": 0.5,
            "sampler": "dpmsolver++",
            "num_inference_steps": 2,
            "guidance_scale": 5.0,
            "vector_guidance": 2.0,
            "vector_guidance_anchor": [0.5, 0.5],
            "vector_scale": 1.0,
            "batch_size": 8,
            "retrieval_k": 2,
            "permutations": 50,
            "ground_truth": "auto",
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    # the creator's posts (with the demo manifest: ground truth applies), for the baseline and style check
    write_demo_posts(tmp_path / "posts", num_posts=4, audience="caps")
    posts = sorted(str(path) for path in (tmp_path / "posts").glob("*/img_*.jpg"))
    pd.DataFrame({
        "image_path": posts, "normalized_engagement": np.linspace(0, 1, len(posts)),
        "normalized_time": np.linspace(1, 0, len(posts)),
    }).to_parquet(tmp_path / "train.parquet")
    monkeypatch.chdir(tmp_path)
    stage.main(["--adapter", str(adapter_dir), "--regressor", "regressor", "--out", "out",
                "--sweep-plots", "plots/sweep", "--live", "out/live", "--metrics", "metrics/evaluate.json",
                "--features", "train.parquet", "--run-info", "run_info/evaluate.json"])

    scored = pd.read_csv(tmp_path / "out/sweep.csv")
    generated = scored[scored["mode"].isin(["ec_lora", "plain_lora", "base"])]
    assert len(generated) == 3 * 2 * 2 * (3 + 2)  # modes x prompts x seeds x (engagement + time targets)
    retrieval = scored[scored["mode"] == "retrieval"]
    assert len(retrieval) == (3 + 2) * 2  # every target of both sweeps x k nearest training images
    assert set(retrieval["image_path"]) <= set(posts)
    # The prompt-aware ceiling (the demo manifest: ground truth on) picks training images per prompt too.
    aware = scored[scored["mode"] == "prompt_aware_retrieval"]
    assert len(aware) > 0 and set(aware["image_path"]) <= set(posts)
    assert set(aware["prompt_index"]) == {0, 1}
    details = json.loads((tmp_path / "out/details.json").read_text())
    assert details["engagement_sweep"]["ec_lora"]["ground_truth"]["share_of_prompt_aware_ceiling"] is not None
    assert scored["predicted_engagement"].notna().all() and scored["ground_truth_score"].between(0, 1).all()
    assert generated["adherence_named"].gt(0).all()  # both prompts name a scene (and so day lighting)
    per_image = generated.groupby("image_path")["predicted_engagement"].nunique()
    assert (per_image == 1).all()
    # plain LoRA and base: one image per prompt and seed; EC-LoRA-T: one per distinct vector.
    images = {
        mode: len(list((tmp_path / "out/images" / mode).glob("*.png"))) for mode in ("ec_lora", "plain_lora", "base")
    }
    assert images == {"ec_lora": 2 * 2 * 5, "plain_lora": 4, "base": 4}
    ec_lora = scored[(scored["mode"] == "ec_lora") & (scored["prompt_index"] == 0) & (scored["seed"] == 1)]
    assert ec_lora["predicted_engagement"].nunique() > 1  # the vector changes the image

    plots = {mode: pd.read_csv(tmp_path / f"plots/sweep/{mode}.csv") for mode in ("ec_lora", "plain_lora", "base", "retrieval")}
    assert [len(plots[mode]) for mode in ("ec_lora", "plain_lora", "base")] == [2 * 2 * 3] * 3
    assert (plots["ec_lora"]["mode"] == "ec_lora").all() and len(plots["retrieval"]) == 3 * 2
    plot = plots["ec_lora"]
    assert {"mode", "prompt", "seed", "target_engagement", "target_time", "predicted_engagement",
            "ground_truth_score"} <= set(plot.columns)
    # dvclive's response curves: a file per (sweep, score, mode), one point per target, the table's means.
    curve = json.loads((tmp_path / "out/live/plots/custom/engagement_ground_truth/ec_lora.json").read_text())
    curve = curve if isinstance(curve, list) else next(iter(curve.values()))
    ec_lora_rows = scored[(scored["mode"] == "ec_lora") & (scored["sweep"] == "engagement")]
    expected = ec_lora_rows.groupby("target_engagement")["ground_truth_score"].mean()
    assert [point["target_engagement"] for point in curve] == list(expected.index)
    assert [point["mean_score"] for point in curve] == pytest.approx(list(expected))
    assert len(json.loads((tmp_path / "out/live/plots/custom/time_regressor/base.json").read_text())) >= 1
    figure = Image.open(tmp_path / "out/engagement_sweep.png")
    assert figure.height > 4 * 96 and figure.width > (2 + 3) * 96  # 4 rows (prompt x seed), base + plain + 3 targets
    assert Image.open(tmp_path / "out/time_sweep.png").width < figure.width  # 2 time targets
    report = (tmp_path / "out/report.md").read_text()
    assert "![Engagement sweep](engagement_sweep.png)" in report and "controls_ground_truth" in report

    details = json.loads((tmp_path / "out/details.json").read_text())
    ec_lora_truth = details["engagement_sweep"]["ec_lora"]["ground_truth"]
    assert f"{ec_lora_truth['spearman']:.3f} ± {ec_lora_truth['spearman_se']:.3f}" in report
    for mode in ("ec_lora", "plain_lora", "base"):
        assert 0.0 <= details["style"][mode]["mean"] <= 1.0
    assert details["verdict"]["style_shift"] == (details["style"]["ec_lora"]["mean"] < details["style"]["base"]["mean"])
    profiles = json.loads((tmp_path / "out/style_profiles.json").read_text())
    assert sum(profiles["creator"]["scene"].values()) == pytest.approx(1.0)
    assert set(details["engagement_sweep"]) == {"ec_lora", "plain_lora", "base", "retrieval"}
    ec_lora_metrics = details["engagement_sweep"]["ec_lora"]
    assert {"spearman", "p_value", "slope", "range_ratio", "by_target", "ground_truth", "share_of_ceiling"} <= ec_lora_metrics.keys()
    assert details["engagement_sweep"]["base"]["p_value"] == 1.0
    assert set(details["adherence"]["ec_lora"]) == {"target_000", "target_050", "target_100"}
    assert details["ground_truth_source"] == {
        "used": True, "audience": "caps", "engagement_follows": {"caps": 1.0},
        "signal_audiences": {"likes": "caps", "comments": "caps", "saves": "caps", "shares": "beach"},
        "manifest": str(tmp_path / "posts" / "demo_world.json")}
    # Every signal of the feed is scored by its own function: the likers' is the headline's.
    by_signal = details["ground_truth_by_signal"]
    assert set(by_signal) == {"likes", "saves", "shares"}
    assert by_signal["likes"]["ec_lora"] == pytest.approx(ec_lora_metrics["ground_truth"]["spearman"], abs=1e-3)
    assert set(details["verdict"]) == {"controls_engagement", "controls_ground_truth", "controls_time", "keeps_prompt",
                                       "style_shift"}
    assert details["num_images"] == 28
    # Wall time differs between reruns: in the run info, never in an output DVC hashes.
    assert "seconds" not in details and json.loads((tmp_path / "run_info/evaluate.json").read_text())["seconds"] > 0

    headline = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    truth = details["engagement_sweep"]["ec_lora"]["ground_truth"]
    assert headline == {
        "score": "ground_truth", "controls": details["verdict"]["controls_ground_truth"],
        "keeps_prompt": details["verdict"]["keeps_prompt"], "controls_time": details["verdict"]["controls_time"],
        "spearman": truth["spearman"], "of_ceiling": truth["share_of_ceiling"], "range_ratio": truth["range_ratio"],
        "time_spearman": details["time_sweep"]["ec_lora"]["ground_truth"]["spearman"],
    }


def test_retrieval_plan_takes_the_nearest_training_images_per_target():
    plan = sweep_plan(["a"], [1], [0.0, 1.0], time=0.5, time_targets=[0.0, 1.0], fixed_engagement=0.5)
    vectors = np.array([[0.0, 0.5], [0.1, 0.5], [0.9, 0.5], [1.0, 0.4], [0.5, 0.0], [0.5, 1.0]])
    rows = retrieval_plan(plan, vectors, k=2)
    nearest = {(row.sweep, row.target_engagement, row.target_time): set() for row in rows.itertuples()}
    for row in rows.itertuples():
        nearest[(row.sweep, row.target_engagement, row.target_time)].add(row.train_index)
    assert nearest[("engagement", 0.0, 0.5)] == {0, 1}
    assert nearest[("engagement", 1.0, 0.5)] == {2, 3}
    assert nearest[("time", 0.5, 0.0)] == {4, 1}  # (0.5, 0.0) itself, then the closest to it
    assert sorted(rows["seed"].unique()) == [0, 1] and (rows["prompt_index"] == -1).all()
    with pytest.raises(ValueError, match="retrieval k"):
        retrieval_plan(plan, vectors, k=7)


def with_adherence(table: pd.DataFrame, ec_lora_drop_at_top: float, sweep: str = "engagement") -> pd.DataFrame:
    """Every image names 2 attributes; base draws both, EC-LoRA-T loses some at `sweep`'s target 1."""
    table = table.assign(adherence_named=2.0, adherence_matched=2.0)
    top = (table["mode"] == "ec_lora") & (table["sweep"] == sweep) & (table[f"target_{sweep}"] == 1.0)
    lost = np.zeros(len(table))
    lost[np.flatnonzero(top)[: round(top.sum() * ec_lora_drop_at_top * 2)]] = 1.0
    return table.assign(adherence_matched=table["adherence_matched"] - lost)


def test_verdict_needs_the_prompt_kept_as_well_as_the_base_keeps_it():
    kept = sweep_report(with_adherence(scored_sweep(0.5), 0.0), permutations=200)
    assert kept["verdict"]["keeps_prompt"] and kept["verdict"]["controls_engagement"]
    assert kept["adherence"]["ec_lora"]["target_100"] == 1.0
    lost = sweep_report(with_adherence(scored_sweep(0.5), 0.25), permutations=200)
    assert lost["adherence"]["ec_lora"]["target_100"] == pytest.approx(0.75, abs=0.05)
    assert not lost["verdict"]["keeps_prompt"] and not lost["verdict"]["controls_engagement"]


def test_the_time_sweep_must_keep_the_prompt_too():
    """Adherence per time target: a time sweep that redraws the prompt's scene loses
    `keeps_prompt` and `controls_time`, not the engagement verdicts."""
    table = scored_sweep(0.5)
    noise = 0.05 * np.random.default_rng(3).normal(size=len(table))
    table["time_ground_truth"] = np.where(table["mode"] == "ec_lora", table["target_time"], 0.0) + noise
    kept = sweep_report(with_adherence(table, 0.0, sweep="time"), permutations=200)
    assert kept["time_adherence"]["ec_lora"] == {"target_000": 1.0, "target_100": 1.0}
    assert kept["verdict"]["keeps_prompt"] and kept["verdict"]["controls_time"]
    lost = sweep_report(with_adherence(table, 0.25, sweep="time"), permutations=200)
    assert lost["time_adherence"]["ec_lora"]["target_100"] == pytest.approx(0.75, abs=0.05)
    assert lost["adherence"]["ec_lora"]["target_100"] == 1.0  # the engagement sweep is untouched
    assert not lost["verdict"]["keeps_prompt"] and not lost["verdict"]["controls_time"]
    assert lost["verdict"]["controls_engagement"]
    assert lost["verdict"]["controls_ground_truth"] == kept["verdict"]["controls_ground_truth"]


def test_share_of_ceiling_and_monotone_against_the_retrieval_baseline():
    table = scored_sweep(ec_lora_effect=0.5)
    plan = table[table["mode"] == "base"]
    rows = retrieval_plan(plan, np.column_stack([np.linspace(0, 1, 40), np.full(40, 0.5)]), k=3)
    retrieval = rows.drop(columns="train_index").assign(mode="retrieval", prompt=None)
    retrieval["predicted_engagement"] = retrieval["target_engagement"] * 0.2 + 0.01 * np.arange(len(rows)) % 0.03
    retrieval["ground_truth_score"] = retrieval["target_engagement"] + 0.3 * np.random.default_rng(1).normal(size=len(rows))
    report = sweep_report(pd.concat([table, retrieval], ignore_index=True), permutations=100)
    engagement = report["engagement_sweep"]
    ceiling = engagement["retrieval"]["ground_truth"]["spearman"]
    assert 0 < ceiling < engagement["ec_lora"]["ground_truth"]["spearman"]
    assert engagement["ec_lora"]["ground_truth"]["share_of_ceiling"] == pytest.approx(
        engagement["ec_lora"]["ground_truth"]["spearman"] / ceiling)
    assert engagement["ec_lora"]["ground_truth"]["monotone"] is True
    assert "share_of_ceiling" not in engagement["retrieval"]
    headline = headline_metrics(report)
    assert headline["spearman"] == engagement["ec_lora"]["ground_truth"]["spearman"]
    assert headline["of_ceiling"] == engagement["ec_lora"]["ground_truth"]["share_of_ceiling"]
    assert headline["controls"] == report["verdict"]["controls_ground_truth"] and headline["score"] == "ground_truth"
    no_truth = headline_metrics(sweep_report(table.assign(ground_truth_score=float("nan")), permutations=50))
    assert no_truth["score"] == "regressor" and no_truth["time_spearman"] is None


def test_monotone_needs_every_step_up():
    assert is_monotone({"target_000": {"mean": 0.1}, "target_050": {"mean": 0.2}, "target_100": {"mean": 0.3}})
    assert not is_monotone({"target_000": {"mean": 0.1}, "target_050": {"mean": 0.3}, "target_100": {"mean": 0.2}})

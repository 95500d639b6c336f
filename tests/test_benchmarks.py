"""CPU smoke tests of the research harness (benchmarks/control_research.py, control_variants.py,
summarise_research.py): a tiny grid on a tiny model, a few steps, asserting on the rows written.

They run the stage commands exactly as dvc.yaml spells them, so a change there that the
harness cannot follow (a new `${...}` in a command, a renamed option) fails here.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import yaml

from benchmarks import control_research, control_variants, pool_sampling_seeds, summarise_research

PROMPTS = ["(democreator style) (summer)", "(democreator style) a man on a beach (summer)"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> dict:
    """Params overrides that make every stage a few seconds on a CPU: a tiny random model, a
    30-post feed, one epoch, a 2-prompt x 1-seed sweep of 2 steps."""
    from ec_lora_t.demo.tiny_model import build_tiny_stable_diffusion

    model = build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)
    return {
        "model": {"pretrained": str(model), "resolution": 32},
        "demo_data": {"num_posts": 30},
        "regressor": {"folds": 3},
        "train": {"epochs": 1, "batch_size": 8},
        "evaluate": {"prompts": PROMPTS, "seeds": [1], "engagement_targets": [0.0, 1.0], "time_targets": [0.0, 1.0],
                     "num_inference_steps": 2, "permutations": 20, "retrieval_k": 3, "batch_size": 8},
    }


def test_stage_commands_are_read_from_dvc_yaml_with_params_interpolated():
    params = yaml.safe_load((control_research.REPO / "params.yaml").read_text())
    train = control_research.stage_command("train", params)
    assert train[0] == sys.executable and train[1:3] == ["-m", "stages.train"]
    launched = control_research.stage_command(
        "train", control_research.merge_params(params, {"train": {"launcher": "python -m accelerate.commands.launch"}}))
    assert launched[:4] == [sys.executable, "-m", "accelerate.commands.launch", "-m"]
    evaluate = control_research.stage_command("evaluate", params, control_research.evaluate_outputs("w4"))
    assert evaluate[evaluate.index("--out") + 1] == "data/evaluate-w4"
    stages = {"odd": {"cmd": "${train.nowhere} -m stages.odd"}}
    with pytest.raises(KeyError, match=r"\$\{train.nowhere\} is not a key of params.yaml"):
        control_research.stage_command("odd", params, stages=stages)
    with pytest.raises(ValueError, match="no option --nope"):
        control_research.stage_command("train", params, {"--nope": "x"})


def test_grid_splits_audiences_into_tuning_and_held_out(tmp_path):
    grid = {"audiences": {"tuning": ["vivid_bright"], "held_out": ["beach", "caps_in_daylight"]},
            "seeds": [1, 2], "recipes": {"a": {}, "b": {}}, "sample": {"w": {}}}
    jobs = control_research.plan_jobs(grid, "all", tmp_path)
    assert len(jobs) == 2 * 3 * 2
    assert {(job["audience"], job["split"]) for job in jobs} == {
        ("vivid_bright", "tuning"), ("beach", "held_out"), ("caps_in_daylight", "held_out")}
    assert {job["audience"] for job in control_research.plan_jobs(grid, "held_out", tmp_path)} == {
        "beach", "caps_in_daylight"}
    with pytest.raises(ValueError, match="both a tuning and a held-out"):
        control_research.grid_audiences({"audiences": {"tuning": ["caps"], "held_out": ["caps"]}})


def test_grid_runs_in_parts_by_seed_and_audience(tmp_path):
    grid = {"audiences": {"tuning": ["vivid_bright"], "held_out": ["beach", "caps"]},
            "seeds": [42, 7, 1234], "recipes": {"a": {}}, "sample": {"w": {}}}
    jobs = control_research.plan_jobs(grid, "all", tmp_path, seeds=[1234, 42], audiences=["caps", "vivid_bright"])
    assert sorted((job["audience"], job["seed"]) for job in jobs) == [
        ("caps", 42), ("caps", 1234), ("vivid_bright", 42), ("vivid_bright", 1234)]
    assert [job["audience"] for job in control_research.plan_jobs(grid, "held_out", tmp_path, seeds=[7],
                                                                   audiences=["caps", "vivid_bright"])] == ["caps"]
    with pytest.raises(ValueError, match=r"--seeds \[5\]: not in the grid's seeds"):
        control_research.plan_jobs(grid, "all", tmp_path, seeds=[5])
    with pytest.raises(ValueError, match=r"--audiences \['cats'\]"):
        control_research.plan_jobs(grid, "all", tmp_path, audiences=["cats"])


def _row(audience, seed, spearman, drop, split="tuning", **extra):
    return {"audience": audience, "split": split, "recipe": "r", "seed": seed, "sample": "w",
            "headline": {"verdict": {"controls_ground_truth": spearman > 0.5, "keeps_prompt": drop <= 0.05},
                         "ground_truth": {"spearman": spearman, "share_of_ceiling": spearman / 0.8,
                                          "range_ratio": 0.3, "monotone": True},
                         "adherence": {"base": 0.9, "worst_drop": drop}}} | extra


def test_summary_gives_mean_std_and_worst_seed_per_audience():
    rows = [_row("caps", 1, 0.8, 0.02), _row("caps", 2, 0.6, 0.10), _row("caps", 3, 0.7, -0.01),
            _row("beach", 1, 0.5, 0.0, split="held_out"),
            {"audience": "beach", "split": "held_out", "recipe": "r", "seed": 2, "sample": "w", "error": "boom"},
            _row("caps", 2, 0.9, 0.0) | {"seed": 4}]
    summaries = {s["audience"]: s for s in summarise_research.aggregate(rows)}
    caps = summaries["caps"]
    assert caps["seeds"] == [1, 2, 3, 4]
    rho = [0.8, 0.6, 0.7, 0.9]
    assert caps["gt_spearman"]["mean"] == pytest.approx(sum(rho) / 4)
    assert caps["gt_spearman"]["std"] == pytest.approx(float(__import__("numpy").std(rho)))
    assert caps["gt_spearman"]["worst"] == pytest.approx(0.6)
    assert caps["adherence_drop_points"]["worst"] == pytest.approx(0.10)  # the largest drop is the worst
    assert caps["controls"] == {"yes": 4, "n": 4} and caps["keeps_prompt"] == {"yes": 3, "n": 4}
    assert caps["time_spearman"] is None
    assert summaries["beach"]["split"] == "held_out" and summaries["beach"]["failed_seeds"] == [2]
    table = summarise_research.markdown(list(summaries.values()))
    assert any("| caps |" in line and "0.75 ± 0.11 (0.60)" in line for line in table)


@pytest.mark.slow  # about 2 CPU minutes (5 wall minutes on a shared 2-core machine): 14 stage processes
def test_research_grid_runs_end_to_end_and_resumes(tiny_base, tmp_path):
    grid = {"base": tiny_base, "audiences": {"tuning": ["vivid_bright"], "held_out": ["beach"]},
            "seeds": [1, 2], "recipes": {"tiny": {}}, "sample": {"w2": {"evaluate": {"vector_guidance": 2.0}}}}
    out = tmp_path / "results.jsonl"
    control_research.main(["--grid", json.dumps(grid), "--out", str(out), "--work", str(tmp_path / "work"),
                           "--jobs", "2", "--gpus", "0"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert not [row["error"][-1500:] for row in rows if "error" in row]
    assert sorted((row["audience"], row["split"], row["seed"]) for row in rows) == [
        ("beach", "held_out", 1), ("beach", "held_out", 2), ("vivid_bright", "tuning", 1), ("vivid_bright", "tuning", 2)]
    for row in rows:
        truth = row["headline"]["ground_truth"]
        assert -1.0 <= truth["spearman"] <= 1.0 and math.isfinite(truth["ceiling"])
        assert row["train"]["steps"] > 0 and row["sample"] == "w2"
        assert set(row["ground_truth_by_target"]["ec_lora"]) == {"target_000", "target_100"}
    # The sampling variant reached the evaluate stage's params.
    evaluated = yaml.safe_load((tmp_path / "work/run-beach-tiny-s1/params.yaml").read_text())
    assert evaluated["train"]["seed"] == 1 and evaluated["demo_data"]["audience"] == "beach"
    assert json.loads((tmp_path / "work/world-beach/data/demo_posts/demo_world.json").read_text())["audience"] == "beach"
    # A second call finds every run done: nothing is trained or written again.
    assert control_research.run_grid(grid, out, tmp_path / "work", jobs=2, gpus=0) == 0
    summaries = summarise_research.aggregate(summarise_research.read_rows(out))
    assert {(s["audience"], s["split"], len(s["seeds"])) for s in summaries} == {
        ("vivid_bright", "tuning", 2), ("beach", "held_out", 2)}
    # A sampling variant added to the grid samples the adapters already trained: no training.
    adapter = tmp_path / "work/run-vivid_bright-tiny-s1/data/train/adapter"
    trained_at = {path: path.stat().st_mtime_ns for path in adapter.rglob("*") if path.is_file()}
    grid["sample"]["w3"] = {"evaluate": {"vector_guidance": 3.0}}
    assert control_research.run_grid(grid, out, tmp_path / "work", jobs=2, gpus=0, split="tuning") == 2
    added = [json.loads(line) for line in out.read_text().splitlines()][len(rows):]
    assert not [row["error"][-1500:] for row in added if "error" in row]
    assert {(row["seed"], row["sample"], row["train_reused"]) for row in added} == {(1, "w3", True), (2, "w3", True)}
    assert {path: path.stat().st_mtime_ns for path in trained_at} == trained_at
    # Part of a grid from the command line: one held-out audience at one seed.
    control_research.main(["--grid", json.dumps(grid), "--out", str(out), "--work", str(tmp_path / "work"),
                           "--jobs", "2", "--gpus", "0", "--seeds", "2", "--audiences", "beach"])
    part = [json.loads(line) for line in out.read_text().splitlines()][len(rows) + len(added):]
    assert [(row["audience"], row["seed"], row["sample"]) for row in part] == [("beach", 2, "w3")]
    # pool_sampling_seeds.py: the same adapters sampled at another sampling seed, pooled.
    grid["sample"]["w2-seed2"] = {"evaluate": {"vector_guidance": 2.0, "seeds": [2]}}
    assert control_research.run_grid(grid, out, tmp_path / "work", jobs=2, gpus=0, split="tuning") == 2
    pooled = pool_sampling_seeds.main(["--work", str(tmp_path / "work"), "--variants", "w2", "w2-seed2",
                                       "--runs", "run-vivid_bright-*"])
    for sweep in ("engagement", "time"):
        runs = pooled[sweep]["runs"]
        assert sorted(runs) == ["run-vivid_bright-tiny-s1", "run-vivid_bright-tiny-s2"]
        for figures in runs.values():
            assert figures["w2"]["blocks"] == figures["w2-seed2"]["blocks"] == 2 and figures["pooled"]["blocks"] == 4
        assert pooled[sweep]["summary"]["pooled"]["runs"] == 2

    # control_variants.py on the world just built: one variant, train then evaluate.
    variants_out = tmp_path / "variants" / "results.json"
    control_variants.main(["--variants", json.dumps({"one": {"train": {"seed": 3}}}), "--out", str(variants_out),
                           "--data", str(tmp_path / "work/world-vivid_bright")])
    result = json.loads(variants_out.read_text())["one"]
    assert "error" not in result, result.get("error", "")[-1500:]
    assert result["train"]["steps"] > 0 and "controls_engagement" in result["verdict"]
    assert -1.0 <= result["ec_lora"]["ground_truth"]["spearman"] <= 1.0


def _sweep_csv(path, seeds, slope):
    """A sweep.csv of EC-LoRA-T's engagement and time sweeps: 2 prompts x `seeds` x 3 targets."""
    rng = np.random.default_rng(len(seeds))
    rows = [{"mode": "ec_lora", "sweep": sweep, "prompt_index": prompt, "seed": seed, "target_engagement": target,
             "target_time": target, "ground_truth_score": slope * target + rng.normal(0, 0.3),
             "time_ground_truth": rng.normal()}
            for sweep in ("engagement", "time") for prompt in (0, 1) for seed in seeds for target in (0.0, 0.5, 1.0)]
    rows.append(rows[0] | {"mode": "base", "ground_truth_score": -5.0})  # another mode's row: not counted
    path.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(path, index=False)


def test_pooled_sampling_seeds_give_the_spearman_over_every_image(tmp_path):
    run = tmp_path / "run-a-r-s1"
    _sweep_csv(run / "data/evaluate-x/sweep.csv", [1, 2, 3], slope=1.0)
    _sweep_csv(run / "data/evaluate-y/sweep.csv", [4, 5], slope=-1.0)
    figures = pool_sampling_seeds.pool_run(run, ["x", "y"])["engagement"]
    both = pd.concat([pd.read_csv(run / f"data/evaluate-{v}/sweep.csv") for v in "xy"])
    both = both[(both["mode"] == "ec_lora") & (both["sweep"] == "engagement")]
    expected = scipy.stats.spearmanr(both["target_engagement"], both["ground_truth_score"]).statistic
    assert figures["pooled"]["spearman"] == pytest.approx(expected)
    assert (figures["x"]["blocks"], figures["y"]["blocks"], figures["pooled"]["blocks"]) == (6, 4, 10)
    assert figures["x"]["spearman"] > figures["pooled"]["spearman"] > figures["y"]["spearman"] and figures["x"]["se"] > 0
    _sweep_csv(run / "data/evaluate-z/sweep.csv", [3, 6], slope=1.0)
    with pytest.raises(ValueError, match="sampling seed 3 is in both 'x' and 'z'"):
        pool_sampling_seeds.pool_run(run, ["x", "z"])
    with pytest.raises(ValueError, match="name one variant twice"):
        pool_sampling_seeds.pool_run(run, ["x", "x"])


def test_a_trained_adapter_is_reused_only_with_the_same_training_params(tmp_path):
    world, folder = tmp_path / "world", tmp_path / "run"
    world.mkdir(), folder.mkdir()
    (world / "built.json").write_text(json.dumps({"fingerprint": "world-1"}))
    params = control_research.merged_params([{"train": {"seed": 3}}])
    assert control_research.reusable_training(folder, params, world) is None  # nothing trained yet
    (folder / control_research.TRAINED).write_text(json.dumps(
        {"train_seconds": 1.5, "train": {"steps": 4}, "fingerprint": control_research.training_fingerprint(params, world)}))
    assert control_research.reusable_training(folder, params, world) == {
        "train_seconds": 1.5, "train": {"steps": 4}, "train_reused": True}
    # Sampling params do not matter; training params and the world do.
    sampled = control_research.merge_params(params, {"evaluate": {"vector_guidance": 6.0}})
    assert control_research.reusable_training(folder, sampled, world) is not None
    other_seed = control_research.merge_params(params, {"train": {"seed": 4}})
    assert control_research.reusable_training(folder, other_seed, world) is None
    # A key at its schema's default (a new option in params.yaml) trains the same adapter; off
    # its default it does not.
    before_the_option = {**params, "train": {k: v for k, v in params["train"].items() if k != "channels_last"}}
    assert params["train"]["channels_last"] is False
    assert control_research.reusable_training(folder, before_the_option, world) is not None
    changed = control_research.merge_params(params, {"train": {"ema_decay": 0.99}})
    assert control_research.reusable_training(folder, changed, world) is None
    (world / "built.json").write_text(json.dumps({"fingerprint": "world-2"}))
    assert control_research.reusable_training(folder, params, world) is None


def test_research_summary_reads_both_ceilings_from_the_details():
    truth = {"spearman": 0.6, "spearman_se": 0.04, "p_value": 0.01, "range_ratio": 0.3, "share_of_ceiling": 0.75,
             "share_of_prompt_aware_ceiling": 0.9, "monotone": True}
    details = {"verdict": {"controls_ground_truth": True},
               "engagement_sweep": {"ec_lora": {"spearman": 0.5, "ground_truth": truth},
                                    "retrieval": {"spearman": 0.7, "ground_truth": {"spearman": 0.8}}},
               "prompt_aware_ceiling": {"engagement_sweep": {"spearman": 0.6, "ground_truth": {"spearman": 2 / 3}}}}
    summary = control_research.research_summary(details)
    assert summary["ground_truth"] == truth | {"ceiling": 0.8, "prompt_aware_ceiling": 2 / 3}
    assert summary["regressor"] == {"spearman": 0.5, "ceiling": 0.7, "prompt_aware_ceiling": 0.6}
    assert "time" not in summary and "adherence" not in summary


@pytest.mark.parametrize("grid_path", sorted((control_research.REPO / "benchmarks" / "grids").glob("*.json")),
                         ids=lambda path: path.name)
def test_every_committed_grid_gives_valid_params(grid_path, tmp_path):
    """A grid planned for a GPU session must not fail there on a misspelt key: each run's params
    (the repository's, the grid's base, recipe and sampling variant) pass validate_params."""
    from stages.validate_params import validate_params

    grid = json.loads(grid_path.read_text())
    (tmp_path / "models").symlink_to(control_research.REPO / "models")
    for job in control_research.plan_jobs(grid, "all", tmp_path)[:: len(grid["seeds"])]:
        for name, sample in grid["sample"].items():
            params = control_research.merged_params([grid.get("base", {}), {"demo_data": {"audience": job["audience"]}},
                                                     job["recipe_params"], sample])
            (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
            validate_params(tmp_path / "params.yaml", ("data/demo_posts",))

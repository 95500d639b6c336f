"""CPU smoke tests of the speed, feed-size and base-quality benchmarks: each script runs a few
steps on a tiny model, as a user would start it, and writes the rows it promises. A change to a
module or to dvc.yaml that breaks a benchmark fails here, not on the next GPU session."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent


def run_script(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_benchmark_adapter_gives_each_vector_its_own_scales(tmp_path):
    """The sampling rows at mixed vectors must run the per-row path: an adapter whose ECM is at
    its init (every scale 1) would let the pipeline fold the whole batch as one run of rows."""
    sys.path.insert(0, str(REPO))
    from benchmarks.speed_options import SAMPLING_ROWS  # noqa: F401  (the rows this guards)
    from benchmarks.train_throughput import benchmark_setup, build_pipeline_folder
    from ec_lora_t.adapter import load_adapter
    from ec_lora_t.adapter.conditioning import fold_scales, row_conditioning
    from ec_lora_t.pipeline import ECLoRAStableDiffusionPipeline

    device, unet_config, vae_config, text, _, _ = benchmark_setup(tiny=True, batch_size=None)
    folder = build_pipeline_folder(tmp_path / "sd", unet_config, vae_config, text, device)
    unet = ECLoRAStableDiffusionPipeline.from_pretrained(folder).unet
    adapter = load_adapter(folder / "adapter", unet)
    mixed = torch.tensor([[index % 5 / 4, 0.5] for index in range(16)])
    scales, _ = row_conditioning(adapter.ecm, "ec_lora", mixed)
    assert fold_scales(adapter, scales, ECLoRAStableDiffusionPipeline.max_folded_runs) is None
    one, _ = row_conditioning(adapter.ecm, "ec_lora", mixed[:1].expand(16, 2))
    assert fold_scales(adapter, one, ECLoRAStableDiffusionPipeline.max_folded_runs) is not None


def test_train_throughput_reports_every_part_on_the_tiny_model(tmp_path):
    out = tmp_path / "speed.json"
    run_script("train_throughput.py", "--tiny", "--steps", "2", "--warmup", "1", "--sample-steps", "2",
               "--out", str(out))
    report = json.loads(out.read_text())
    expected = {"loop:ec_lora", "loop:plain_lora", "step:ec_lora", "step:plain_lora", "peft_anchor",
                "memory:batch4_checkpointing"}
    assert expected <= set(report["results"])
    assert any(name.startswith("sample:") for name in report["results"])
    for name, figures in report["results"].items():
        assert figures["images_per_second"] > 0, name
    assert report["ec_lora_over_plain_lora"] > 0
    assert out.with_suffix(".md").read_text().startswith("| run |")


def test_train_throughput_runs_one_loop_and_the_anchor_when_asked(tmp_path):
    """The parts asked for, here channels-last (the anchor follows the loop's `train.channels_last`), with the
    options recorded in the report."""
    out = tmp_path / "speed.json"
    run_script("train_throughput.py", "--tiny", "--steps", "2", "--warmup", "1", "--parts", "loop:ec_lora,anchor",
               "--channels-last", "true", "--cudnn-benchmark", "true", "--inductor", "mm1x1", "--sdpa", "cudnn",
               "--out", str(out))
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"loop:ec_lora", "peft_anchor"}
    assert report["channels_last"] is True and report["steps_channels_last"] is True
    # cuDNN attention first: on a CPU, which has no cuDNN kernel, the next backend runs.
    assert report["cudnn_benchmark"] is True and report["inductor"] == "mm1x1" and report["sdpa"] == "cudnn"
    # The partial record written after each part says what it measured on which machine, as the
    # final report does: a call cut off at its limit leaves only that file.
    partial = json.loads(out.with_suffix(".partial.json").read_text())
    assert partial["partial"] is True and set(partial["results"]) == {"loop:ec_lora", "peft_anchor"}
    assert {key: partial[key] for key in ("device", "torch", "diffusers", "inductor", "batch_size")} == {
        key: report[key] for key in ("device", "torch", "diffusers", "inductor", "batch_size")}


def test_speed_options_writes_a_row_per_option_and_part(tmp_path):
    out = tmp_path / "options.json"
    run_script("speed_options.py", "--tiny", "--steps", "1", "--warmup", "1", "--sample-steps", "2",
               "--options", "eager,channels_last,cudnn_sdpa", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["sampling_dtype"] == "float32"  # the CPU's; a GPU's run says bf16 or fp16
    results = report["results"]
    # cudnn_sdpa runs where cuDNN has no attention kernel (here: the CPU), on the next backend.
    options = ("eager", "channels_last", "cudnn_sdpa")
    assert set(results) == {f"{part}:{option}" for part in ("step", "peft", "sample") for option in options} | {
        f"sample:{option}{suffix}" for option in options for suffix in (
            ":vector_guidance", ":one_vector", ":one_vector:vector_guidance", ":one_vector:unfolded", ":no_adapter")}
    for name, figures in results.items():
        assert figures["images_per_second"] > 0, name
        assert figures["graphs_compiled_in_timed_steps"] == 0, name  # eager: Dynamo compiles nothing


def test_stage_speed_runs_the_real_train_stage_beside_the_benchmark_loop(tmp_path):
    out = tmp_path / "stage.json"
    # Long enough for both steady figures (the loop's clock starts after 10 steps).
    run_script("stage_speed.py", "--tiny", "--posts", "12", "--epochs", "4", "--steps", "26", "--warmup", "2",
               "--work", str(tmp_path / "work"), "--out", str(out))
    report = json.loads(out.read_text())
    # The stage trained on the demo world at the tiny model's resolution, through dvc.yaml's command.
    assert report["resolution"] == 16 and report["stage"]["steps"] > 0
    params = yaml.safe_load((tmp_path / "work/run-compile-false/params.yaml").read_text())
    assert params["model"] == {"pretrained": str(tmp_path / "work/sd"), "resolution": 16}
    assert params["train"]["epochs"] == 4 and params["train"]["batch_size"] == 2
    assert report["stage"]["steady_images_per_second"] > 0
    assert report["benchmark_loop"]["loop_steady_images_per_second"] > 0
    assert report["stage_over_benchmark"]["loop_clock"] > 0
    # The stage's figure is on disk before the benchmark loop starts (a call cut off keeps it).
    partial = json.loads(out.with_suffix(".partial.json").read_text())
    assert partial["partial"] and partial["stage"] == report["stage"] and "benchmark_loop" not in partial
    # A second call on the same --work (as the compiled run after the eager one) reuses the world
    # and trains in a fresh run folder; with --processes 2 it also runs the stage under a
    # 2-process launcher (torchrun over gloo here; accelerate's launcher on GPUs).
    run_script("stage_speed.py", "--tiny", "--posts", "12", "--epochs", "1", "--steps", "2", "--warmup", "1",
               "--processes", "2", "--work", str(tmp_path / "work"), "--out", str(out))
    again = json.loads(out.read_text())
    assert again["stage"]["steps"] > 0 and again["data_stages_seconds"] < report["data_stages_seconds"] / 2
    params = yaml.safe_load((tmp_path / "work/run-compile-false-processes-2/params.yaml").read_text())
    assert "--nproc_per_node 2" in params["train"]["launcher"]
    # Two processes, half the steps each: the stage's metrics count one process's optimizer steps.
    assert again["stage_processes_2"]["steps"] == -(-again["stage"]["steps"] // 2)
    assert "processes_over_one" in again


@pytest.mark.slow
def test_large_feed_runs_the_data_stages_and_the_cache_encodes_only_new_posts(tmp_path):
    out = tmp_path / "feed.json"
    run_script("large_feed.py", "--posts", "30", "--extra-posts", "5", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["feeds"]["30"]["images"] >= 30
    assert report["added_posts"]["images_added"] >= 5
    assert report["added_posts"]["latents_run"]["images_encoded"] == report["added_posts"]["images_added"]


def test_base_model_quality_scores_prompts_against_the_attribute_reader(tmp_path):
    result = run_script("base_model_quality.py", "--out", str(tmp_path), "--prompts", "4", "--steps", "2",
                        "--batch-size", "8", "--device", "cpu")
    report = json.loads((tmp_path / "quality.json").read_text())
    for key in ("full_prompts", "chance_shuffled_prompts", "checker_on_world_renders"):
        assert key in report
    assert (tmp_path / "samples.csv").read_text().count("\n") >= 4
    assert "full_prompts" in result.stdout


@pytest.mark.parametrize("option", ["compile+cl+tuned", "compile+cl+mm1x1", "compile+cl+graphs", "compile+cl+autotune"])
def test_an_inductor_option_sets_inductor_only_around_its_calls(option):
    import functools

    import torch._inductor.config as inductor_config

    from benchmarks.speed_options import OPTION_SETS
    from benchmarks.train_throughput import INDUCTOR_TUNING, inductor_context

    def settings(keys) -> dict:  # "triton.cudagraphs" is a setting of the nested config `triton`
        return {key: functools.reduce(getattr, key.split("."), inductor_config) for key in keys}

    name = OPTION_SETS[option]["inductor"]
    tuned = INDUCTOR_TUNING[name]
    before = settings(tuned)
    assert before != tuned  # else the option would change nothing
    with inductor_context(name):
        assert settings(tuned) == tuned
    assert settings(tuned) == before


def test_the_cudnn_benchmark_option_sets_it_only_around_its_calls():
    import torch

    from benchmarks.speed_options import OPTION_SETS, cudnn_benchmark_context

    assert OPTION_SETS["compile+cl+bench"]["cudnn_benchmark"] and OPTION_SETS["compile+bench"]["cudnn_benchmark"]
    before = torch.backends.cudnn.benchmark
    assert before is False  # PyTorch's default; else the option would change nothing
    with cudnn_benchmark_context(True):
        assert torch.backends.cudnn.benchmark is True
    assert torch.backends.cudnn.benchmark is before
    with cudnn_benchmark_context(False):
        assert torch.backends.cudnn.benchmark is before

"""The `ec-lora-t` CLI through typer's CliRunner, asserting on what it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from ec_lora_t.cli import app
from ec_lora_t.data.features import EngagementTimeNormalizer
from ec_lora_t.generation import read_png_metadata

runner = CliRunner()


def test_demo_data_writes_the_report_layout(tmp_path):
    result = runner.invoke(app, ["demo-data", "--out", str(tmp_path / "posts"), "--num-posts", "5"])
    assert result.exit_code == 0, result.output
    posts = sorted(p for p in (tmp_path / "posts").iterdir() if p.is_dir())
    assert len(posts) == 5
    assert all((p / "metadata.csv").is_file() and list(p.glob("img_*.jpg")) for p in posts)
    manifest = json.loads((tmp_path / "posts" / "demo_world.json").read_text())
    assert manifest["audience"] == "vivid_bright" and manifest["num_posts"] == 5


def test_generate_several_vectors_in_one_call(tiny_sd_dir, adapter_dir, tmp_path):
    out = tmp_path / "images"
    args = ["generate", "--prompt", "a man in a red jacket", "--engagement", "0.1", "--engagement", "0.9",
            "--time", "0.5", "--seed", "42", "--steps", "2", "--out", str(out),
            "--adapter", str(adapter_dir), "--pretrained", str(tiny_sd_dir)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    metadata = [read_png_metadata(path) for path in pngs]
    assert sorted(float(m["normalized_engagement"]) for m in metadata) == [0.1, 0.9]
    assert all(m["prompt"] == "a man in a red jacket" and int(m["seed"]) == 42 for m in metadata)
    low, high = (np.asarray(Image.open(path), dtype=np.int16) for path in pngs)
    assert np.abs(low - high).max() > 0  # the vector changed the image


def test_generate_converts_raw_likes_and_dates(tiny_sd_dir, adapter_dir, tmp_path):
    import pandas as pd

    normalizer = EngagementTimeNormalizer.fit(
        likes=np.array([100, 5100]), comments=np.array([0, 0]),
        timestamps=pd.to_datetime(["2025-01-01", "2025-12-31"], utc=True), comment_weight=3, normalization="minmax",
    )
    stats = tmp_path / "normalization.json"
    normalizer.to_json(stats)
    out = tmp_path / "images"
    args = ["generate", "--prompt", "a man", "--likes", "2600", "--comments", "0", "--date", "2025-07-02",
            "--steps", "2", "--out", str(out), "--adapter", str(adapter_dir), "--pretrained", str(tiny_sd_dir),
            "--stats", str(stats)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (png,) = out.glob("*.png")
    metadata = read_png_metadata(png)
    assert float(metadata["normalized_engagement"]) == pytest.approx(0.5, abs=1e-3)
    assert float(metadata["normalized_time"]) == pytest.approx(182 / 364, abs=1e-2)


def test_generate_rejects_mismatched_vectors(tiny_sd_dir, adapter_dir, tmp_path):
    args = ["generate", "--prompt", "a man", "--engagement", "0.1", "--engagement", "0.9", "--time", "0.1",
            "--time", "0.2", "--time", "0.3", "--adapter", str(adapter_dir), "--pretrained", str(tiny_sd_dir)]
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert "--time" in result.output


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_export_writes_a_lora_file(adapter_dir, tmp_path, fmt):
    out = tmp_path / f"lora_{fmt}.safetensors"
    result = runner.invoke(app, ["export", "--engagement", "0.8", "--time", "0.5", "--format", fmt,
                                 "--adapter", str(adapter_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    keys = list(load_file(out))
    assert keys and all(("lora" in key) for key in keys)


def test_pretrain_base_smoke_on_cpu(tmp_path):
    from ec_lora_t.models import load_components

    out = tmp_path / "base"
    result = runner.invoke(app, ["pretrain-base", "--out", str(out), "--steps", "2", "--vae-steps", "2",
                                 "--batch-size", "4", "--num-images", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    components = load_components(out)
    assert components.unet.config.sample_size == 16  # 32 px through a VAE that halves once
    assert json.loads((out / "pretrain_summary.json").read_text())["unet_steps"] == 2


# --- bad input: one line, no traceback, nothing loaded ----------------------------------------


@pytest.mark.parametrize(
    ("options", "expected", "status"),
    [
        (["--engagement", "1.7"], "Invalid value for '--engagement': the value must be a number in [0, 1]", 2),
        (["--engagement", "-0.2"], "Invalid value for '--engagement': the value must be a number in [0, 1]", 2),
        (["--engagement", "nan"], "Invalid value for '--engagement': the value must be a number in [0, 1]", 2),
        (["--engagement", "0.5", "--time", "2"], "Invalid value for '--time': the value must be a number in [0, 1]", 2),
        (["--engagement", "0.5", "--steps", "0"], "Invalid value for '--steps'", 2),
        (["--likes", "100", "--date", "2025-13-45"], "date '2025-13-45' is neither an epoch number nor ISO 8601", 1),
        (["--likes", "-5"], "non-negative", 1),
    ],
)
def test_generate_rejects_bad_values_in_one_line(tmp_path, capsys, options, expected, status):
    import pandas as pd

    from ec_lora_t.cli import main

    stats = tmp_path / "normalization.json"
    EngagementTimeNormalizer.fit(likes=np.array([100, 5100]), comments=np.array([0, 0]),
                                 timestamps=pd.to_datetime(["2025-01-01", "2025-12-31"], utc=True)).to_json(stats)
    # Neither the adapter nor the model exists: the value is rejected before either is read.
    args = ["generate", "--prompt", "a man", *options, "--stats", str(stats), "--adapter", str(tmp_path / "none"),
            "--pretrained", str(tmp_path / "no-model"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    error = capsys.readouterr().err
    assert exit_info.value.code == status
    assert error.count("\n") == 1 and error.startswith("error: "), error
    assert expected in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_the_library_checks_vectors_and_steps_too(tiny_sd_dir, adapter_dir, tmp_path):
    """For callers other than the CLI: generate() and export_lora() check at their entry."""
    from ec_lora_t.adapter.export import export_lora
    from ec_lora_t.generation import generate

    with pytest.raises(ValueError, match=r"normalized_engagement must be a number in \[0, 1\].*got 1.7"):
        generate(str(tiny_sd_dir), adapter_dir, ["a man"], [(1.7, 0.5)], [0], tmp_path)
    with pytest.raises(ValueError, match="sampling steps must be at least 1, got 0"):
        generate(str(tiny_sd_dir), adapter_dir, ["a man"], [(0.5, 0.5)], [0], tmp_path, num_inference_steps=0)
    with pytest.raises(ValueError, match=r"normalized_time must be a number in \[0, 1\].*got nan"):
        export_lora(adapter_dir, (0.5, float("nan")), tmp_path / "lora.safetensors")
    assert not list(tmp_path.iterdir())


def test_debug_shows_the_traceback(tmp_path):
    args = ["--debug", "generate", "--prompt", "a man", "--likes", "100", "--date", "2025-13-45",
            "--stats", str(tmp_path / "none.json"), "--adapter", str(tmp_path), "--pretrained", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert isinstance(result.exception, ValueError) and "none.json" in str(result.exception)
    plain = runner.invoke(app, args[1:])
    assert plain.exit_code == 1 and plain.exception is not None and isinstance(plain.exception, SystemExit)


@pytest.mark.parametrize(("engagement", "time"), [("1.2", "0.5"), ("0.5", "inf")])
def test_export_rejects_out_of_range_vectors(adapter_dir, tmp_path, capsys, engagement, time):
    from ec_lora_t.cli import main

    out = tmp_path / "lora.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--engagement", engagement, "--time", time, "--adapter", str(adapter_dir), "--out", str(out)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("error: Invalid value for") and "[0, 1]" in error
    assert not out.exists()


def test_raw_values_outside_the_training_range_are_clipped_with_a_warning(tiny_sd_dir, adapter_dir, tmp_path):
    import pandas as pd

    stats = tmp_path / "normalization.json"
    EngagementTimeNormalizer.fit(likes=np.array([100, 5100]), comments=np.array([0, 0]),
                                 timestamps=pd.to_datetime(["2025-01-01", "2025-12-31"], utc=True)).to_json(stats)
    out = tmp_path / "images"
    args = ["generate", "--prompt", "a man", "--likes", "20100", "--date", "2025-07-02", "--steps", "1",
            "--out", str(out), "--adapter", str(adapter_dir), "--pretrained", str(tiny_sd_dir), "--stats", str(stats)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "warning: total engagement 20100" in result.output and "above the training posts' range [100, 5100]" in (
        result.output)
    (png,) = out.glob("*.png")
    metadata = read_png_metadata(png)
    assert float(metadata["normalized_engagement"]) == 1.0  # what the ECM got
    assert json.loads(metadata["unclipped_engagement_time"])[0] == pytest.approx(4.0)  # (20100 - 100) / 5000
    assert float(metadata["raw_likes"]) == 20100 and metadata["clipped"] == "true"


def test_default_paths_are_read_from_the_repository_not_the_current_folder(tmp_path, monkeypatch):
    """Run elsewhere, `generate` still finds the repository's base model (not a hub id 'models/...')."""
    from diffusers import UNet2DConditionModel

    from ec_lora_t.adapter import ECLoRAConfig, add_ec_lora, save_adapter
    from ec_lora_t.cli import DEFAULT_PRETRAINED, repository_root

    repo = Path(__file__).resolve().parent.parent
    unet = UNet2DConditionModel.from_pretrained(repo / DEFAULT_PRETRAINED, subfolder="unet")
    adapter = save_adapter(tmp_path / "adapter", add_ec_lora(unet, ECLoRAConfig(rank=2, alpha=2, ecm_hidden_size=4)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a default misread as a hub id would fail, not hang
    assert repository_root() == repo
    result = runner.invoke(app, ["generate", "--prompt", "a man", "--engagement", "0.5", "--steps", "1",
                                 "--adapter", str(adapter), "--out", "images"])
    assert result.exit_code == 0, result.output
    (png,) = (elsewhere / "images").glob("*.png")
    assert read_png_metadata(png)["pretrained"] == str(repo / DEFAULT_PRETRAINED)


def test_a_mistyped_local_model_path_fails_at_once(tmp_path, monkeypatch):
    import time

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(repo)  # where "models/" exists: "models/..." is a path
    started = time.perf_counter()
    result = runner.invoke(app, ["generate", "--prompt", "a man", "--engagement", "0.5", "--adapter", str(tmp_path),
                                 "--pretrained", "models/ec-lora-t-bse", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and time.perf_counter() - started < 10
    assert "'models/ec-lora-t-bse' is a local path ('models' exists here" in result.output, result.output


def test_the_console_script_prints_an_option_that_does_not_parse_in_one_line(capsys):
    from ec_lora_t.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "a man", "--engagement", "abc"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: Invalid value for '--engagement'"), error
    assert "ec-lora-t generate --help" in error

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


def test_generate_passes_the_vector_guidance_interval_to_the_pipeline(tiny_sd_dir, adapter_dir, tmp_path):
    """One step at 0 lies outside (0.5, 1): vector guidance 4 there draws what guidance 1 draws."""
    def one_step(folder, *options):
        args = ["generate", "--prompt", "a man in a red jacket", "--engagement", "0.9", "--time", "0.5",
                "--seed", "42", "--steps", "1", "--out", str(tmp_path / folder), "--adapter", str(adapter_dir),
                "--pretrained", str(tiny_sd_dir), *options]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        (png,) = (tmp_path / folder).glob("*.png")
        return np.asarray(Image.open(png), dtype=np.int16)

    unguided = one_step("w1", "--vector-guidance", "1")
    assert np.array_equal(one_step("late", "--vector-guidance", "4", "--vector-guidance-interval", "0.5", "1"), unguided)
    assert not np.array_equal(one_step("w4", "--vector-guidance", "4"), unguided)
    # --time-guidance: the vector sits at the anchor's time, so only --vector-guidance acts on it.
    assert np.array_equal(one_step("wt", "--vector-guidance", "4", "--time-guidance", "8"), one_step("w4b", "--vector-guidance", "4"))


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


def test_generate_converts_other_signals_given_by_name(tiny_sd_dir, adapter_dir, tmp_path):
    """An engagement of saves per reach: `--signals saves=..,reach=..` gives the vector; likes
    alone would not (the normaliser names what is missing); the PNG records the raw signals."""
    import pandas as pd

    normalizer = EngagementTimeNormalizer.fit_signals(
        {"saves": [10, 50], "reach": [1000, 1000]}, pd.to_datetime(["2025-01-01", "2025-12-31"], utc=True),
        {"saves": 1.0}, per="reach", normalization="minmax")
    stats = tmp_path / "normalization.json"
    normalizer.to_json(stats)
    common = ["--steps", "1", "--adapter", str(adapter_dir), "--pretrained", str(tiny_sd_dir), "--stats", str(stats)]
    out = tmp_path / "images"
    result = runner.invoke(app, ["generate", "--prompt", "a man", "--signals", "saves=15,reach=500", "--date",
                                 "2025-07-02", "--out", str(out), *common])
    assert result.exit_code == 0, result.output
    metadata = read_png_metadata(next(out.glob("*.png")))
    assert float(metadata["normalized_engagement"]) == pytest.approx(0.5, abs=1e-3)  # 15 / 500 = 0.03, mid of [0.01, 0.05]
    assert float(metadata["raw_saves"]) == 15 and float(metadata["raw_reach"]) == 500 and "raw_likes" not in metadata
    result = runner.invoke(app, ["generate", "--prompt", "a man", "--likes", "100", "--out", str(out), *common])
    assert result.exit_code == 1 and "the engagement is saves / reach: give saves, reach too" in result.output


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
        (["--engagement", "0.5", "--time", "0.5", "--steps", "0"], "Invalid value for '--steps'", 2),
        (["--likes", "100", "--date", "2025-13-45"], "date '2025-13-45' is neither an epoch number nor ISO 8601", 1),
        (["--likes", "-5"], "Invalid value for '--likes': must be a finite number >= 0, got -5", 2),
        # Every numeric sampling option is checked where it is parsed (these were tracebacks).
        (["--engagement", "0.5", "--time", "0.5", "--vector-guidance", "nan"],
         "Invalid value for '--vector-guidance': must be a finite number >= 0, got nan", 2),
        (["--engagement", "0.5", "--time", "0.5", "--vector-guidance", "-1"],
         "Invalid value for '--vector-guidance': must be a finite number >= 0, got -1.0", 2),
        (["--engagement", "0.5", "--time", "0.5", "--vector-scale", "inf"], "Invalid value for '--vector-scale'", 2),
        (["--engagement", "0.5", "--time", "0.5", "--vector-guidance-interval", "0.6", "0.4"],
         "Invalid value for '--vector-guidance-interval': must be START END with 0 <= START < END <= 1, got 0.6 0.4", 2),
        (["--engagement", "0.5", "--time", "0.5", "--guidance-scale", "nan"], "Invalid value for '--guidance-scale'", 2),
        (["--engagement", "0.5", "--time", "0.5", "--seed", "-1"], "Invalid value for '--seed'", 2),
        (["--likes", "100", "--comments", "-1"], "Invalid value for '--comments'", 2),
        # Options that do not go together: never a silent default.
        (["--engagement", "0.5"], "--engagement needs --time", 2),
        (["--time", "0.5"], "--time needs --engagement", 2),
        (["--engagement", "0.5", "--time", "0.5", "--likes", "100"], "not both", 2),
        (["--engagement", "0.5", "--time", "0.5", "--date", "2025-01-01"], "not both", 2),
        (["--comments", "3"], "--comments and --date need --likes", 2),
        (["--signals", "saves"], "Invalid value for '--signals': 'saves' is not name=number", 2),
        (["--signals", "saves=-3"], "'saves=-3' is not name=number", 2),
        (["--signals", "saves=1,saves=2"], "saves is given twice", 2),
        (["--signals", "saves=1", "--likes", "3"], "give likes and comments inside --signals", 2),
        (["--signals", "saves=1", "--engagement", "0.5", "--time", "0.5"], "not both", 2),
        (["--signals", "likes=1", "--signals", "likes=2", "--date", "2025-01-01", "--date", "2025-01-02",
          "--date", "2025-01-03"], "give one --date or one per --signals (2 --signals, 3 --date)", 2),
        (["--likes", "1", "--likes", "2", "--date", "2025-01-01", "--date", "2025-01-02", "--date", "2025-01-03"],
         "give one --date or one per --likes (2 --likes, 3 --date)", 2),
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
    result = runner.invoke(app, ["generate", "--prompt", "a man", "--engagement", "0.5", "--time", "0.5",
                                 "--steps", "1", "--adapter", str(adapter), "--out", "images"])
    assert result.exit_code == 0, result.output
    (png,) = (elsewhere / "images").glob("*.png")
    assert read_png_metadata(png)["pretrained"] == str(repo / DEFAULT_PRETRAINED)


def test_a_mistyped_local_model_path_fails_at_once(tmp_path, monkeypatch):
    import time

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(repo)  # where "models/" exists: "models/..." is a path
    started = time.perf_counter()
    result = runner.invoke(app, ["generate", "--prompt", "a man", "--engagement", "0.5", "--time", "0.5",
                                 "--adapter", str(tmp_path),
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


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["demo-data", "--num-posts", "0"], "Invalid value for '--num-posts': must be a finite number >= 1, got 0"),
        (["demo-data", "--seed", "-3"], "Invalid value for '--seed'"),
        (["build-tiny-base", "--out", "x", "--resolution", "0"], "Invalid value for '--resolution'"),
        (["pretrain-base", "--learning-rate", "nan"], "Invalid value for '--learning-rate': must be a finite number > 0"),
        (["pretrain-base", "--learning-rate", "0"], "Invalid value for '--learning-rate'"),
        (["pretrain-base", "--batch-size", "0"], "Invalid value for '--batch-size'"),
        (["pretrain-base", "--time-limit-s", "-1"], "Invalid value for '--time-limit-s'"),
        (["app", "--port", "0"], "Invalid value for '--port': must be a finite number in [1, 65535], got 0"),
        (["app", "--port", "70000"], "Invalid value for '--port'"),
        (["app", "--steps", "0"], "Invalid value for '--steps'"),
        (["app", "--guidance-scale", "inf"], "Invalid value for '--guidance-scale'"),
    ],
)
def test_every_command_checks_its_numbers_where_they_are_parsed(tmp_path, monkeypatch, capsys, args, expected):
    from ec_lora_t.cli import main

    monkeypatch.chdir(tmp_path)  # a value that slipped through would write here, not in the repository
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *(["--out", str(tmp_path / "out")] if args[0] in ("demo-data", "pretrain-base") else [])])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.count("\n") == 1 and error.startswith(f"error: {expected}"), error
    assert f"see `ec-lora-t {args[0]} --help`" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["generate", "export"])
def test_the_help_shows_where_the_default_adapter_comes_from(command):
    """Typer renders help as Rich markup: a hand-written `[default: ...]` vanished ("Trained adapter folder .")."""
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0
    help_text = " ".join(result.output.split())
    assert "Trained adapter folder (default: data/train/adapter in the repository)" in help_text, help_text
    if command == "generate":
        assert "(default: models/ec-lora-t-base in the repository)" in help_text
        assert "(default: data/features/normalization.json in the repository)" in help_text


def test_export_help_says_what_a_static_lora_cannot_carry():
    result = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    help_text = " ".join(result.output.split())
    assert "draws what `ec-lora-t generate` draws at that vector with --vector-guidance 1" in help_text
    assert "cannot carry vector guidance above 1" in help_text and "extra UNet pass per step" in help_text


def _copy_adapter(adapter_dir: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(adapter_dir, to))


@pytest.mark.parametrize("name", ["ec_lora.safetensors", "ecm.safetensors"])
def test_a_truncated_adapter_file_is_named(tiny_sd_dir, adapter_dir, tmp_path, name):
    adapter = _copy_adapter(adapter_dir, tmp_path / "adapter")
    weights = adapter / name
    weights.write_bytes(weights.read_bytes()[:20])  # a copy cut short
    result = runner.invoke(app, ["generate", "--prompt", "a man", "--engagement", "0.5", "--time", "0.5",
                                 "--steps", "1", "--adapter", str(adapter), "--pretrained", str(tiny_sd_dir),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert f"error: {weights}: unreadable safetensors file (" in result.output, result.output
    assert "cut short" in result.output and not (tmp_path / "out").exists()
    export = runner.invoke(app, ["export", "--engagement", "0.5", "--time", "0.5", "--adapter", str(adapter),
                                 "--out", str(tmp_path / "lora.safetensors")])
    assert export.exit_code == 1 and f"error: {weights}: unreadable safetensors file" in export.output


def test_a_missing_adapter_folder_says_no_such_folder(tiny_sd_dir, tmp_path):
    missing = tmp_path / "no-adapter"
    result = runner.invoke(app, ["generate", "--prompt", "a man", "--engagement", "0.5", "--time", "0.5",
                                 "--steps", "1", "--adapter", str(missing), "--pretrained", str(tiny_sd_dir),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert f"error: {missing}: no such folder (the EC-LoRA adapter folder" in result.output, result.output


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_adapters_checkpoints_and_exports_are_written_with_the_umasks_mode(adapter_dir, tmp_path, umask):
    """Like a plain open(): 0644 under umask 022 (safetensors alone leaves its temporary file's 0600)."""
    import os

    import torch
    from accelerate import Accelerator
    from test_training import micro_unet

    from ec_lora_t.adapter import ECLoRAConfig, add_ec_lora, save_adapter
    from ec_lora_t.adapter.export import export_lora
    from ec_lora_t.training.checkpoint import save_checkpoint

    previous = os.umask(umask)
    try:
        adapter = add_ec_lora(micro_unet(), ECLoRAConfig(rank=2, alpha=2, ecm_hidden_size=4))
        saved = save_adapter(tmp_path / "adapter", adapter)
        optimizer = torch.optim.AdamW(adapter.lora_parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        (tmp_path / "run").mkdir()
        checkpoint = save_checkpoint(tmp_path / "run", 1, adapter, adapter.ecm, optimizer, scheduler,
                                     Accelerator(cpu=True), {"epoch": 1}, None)
        exported = export_lora(adapter_dir, (0.5, 0.5), tmp_path / "export" / "lora.safetensors")
    finally:
        os.umask(previous)
    files = [*saved.iterdir(), *checkpoint.iterdir(), exported]
    assert any(path.suffix == ".safetensors" for path in checkpoint.iterdir())
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes

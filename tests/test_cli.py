"""The `ec-lora-t` CLI through typer's CliRunner, asserting on what it writes."""

from __future__ import annotations

import json

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

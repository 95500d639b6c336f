"""The latents stage's shards and content caches: round trips, errors, and encoding only what is new."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from ec_lora_t.data.content_keys import file_sha256
from ec_lora_t.data.latent_shards import (
    INDEX_NAME,
    LatentShardWriter,
    load_shard_tensors,
    read_shard_index,
    write_shard_index,
)
from ec_lora_t.data.latents import (
    EncodingStats,
    TensorCache,
    encode_feed,
    image_cache_namespace,
    text_cache_namespace,
)
from ec_lora_t.training.cache import load_latent_cache

REPO = Path(__file__).resolve().parent.parent


def training_tensors(num_rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "latent_mean": torch.randn(num_rows, 4, 4, 4, generator=generator),
        "latent_std": torch.rand(num_rows, 4, 4, 4, generator=generator),
        "text_embeddings": torch.randn(num_rows, 77, 8, generator=generator),
        "generic_text_embeddings": torch.randn(num_rows, 77, 8, generator=generator),
        "engagement_time": torch.rand(num_rows, 2, generator=generator),
    }


def write_shards(out_dir, tensors: dict[str, torch.Tensor], shard_size: int, batch_size: int = 2):
    num_rows = len(tensors["latent_mean"])
    writer = LatentShardWriter(out_dir, shard_size, metadata={"pretrained": "test"})
    for start in range(0, num_rows, batch_size):
        writer.add({name: tensor[start : start + batch_size] for name, tensor in tensors.items()})
    shards = writer.close()
    write_shard_index(out_dir, pd.DataFrame({"shortcode": [f"p{i}" for i in range(num_rows)]}), shard_size)
    return shards


def test_shards_round_trip_in_index_order(tmp_path):
    tensors = training_tensors(7)
    # batches of 2 into shards of 3: batches straddle shard boundaries
    assert write_shards(tmp_path, tensors, shard_size=3) == [
        "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"
    ]
    index = read_shard_index(tmp_path, required_columns=["shortcode"])
    assert index["shard_row"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert index["shard"].tolist()[2:4] == ["shard-00000.safetensors", "shard-00001.safetensors"]

    loaded = load_shard_tensors(tmp_path)
    assert loaded.keys() == tensors.keys()
    for name in tensors:
        assert torch.equal(loaded[name], tensors[name]), name
    assert load_shard_tensors(tmp_path, ["latent_mean"]).keys() == {"latent_mean"}

    # Training reads the folder (and, as before shards, a single file) into the same cache.
    cache = load_latent_cache(tmp_path)
    save_file(tensors, tmp_path / "single.safetensors")
    single = load_latent_cache(tmp_path / "single.safetensors")
    for name in cache.tensor_names():
        assert torch.equal(getattr(cache, name), getattr(single, name)), name
    assert cache.fingerprint() == single.fingerprint()  # checkpoints made before shards still resume


def test_reading_follows_the_index_not_the_file_order(tmp_path):
    tensors = training_tensors(5)
    write_shards(tmp_path, tensors, shard_size=2)
    index = read_shard_index(tmp_path)
    reordered = index.iloc[[4, 0, 3, 1]].reset_index(drop=True)
    loaded = load_shard_tensors(tmp_path, ["latent_mean"], reordered)["latent_mean"]
    assert torch.equal(loaded, tensors["latent_mean"][[4, 0, 3, 1]])


def test_shard_errors_name_the_file(tmp_path):
    tensors = training_tensors(5)
    write_shards(tmp_path, tensors, shard_size=2)
    index = read_shard_index(tmp_path)

    too_far = index.copy()
    too_far.loc[4, "shard_row"] = 3
    with pytest.raises(ValueError, match=r"shard-00002.safetensors: the index names row 3 but latent_mean has 1 rows"):
        load_shard_tensors(tmp_path, ["latent_mean"], too_far)
    with pytest.raises(ValueError, match=r"shard-00000.safetensors: missing tensors \['ecm'\]"):
        load_shard_tensors(tmp_path, ["ecm"])
    (tmp_path / "shard-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-00001.safetensors: shard named in .*index.parquet is missing"):
        load_latent_cache(tmp_path)
    (tmp_path / INDEX_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="no index of the latent shards"):
        load_latent_cache(tmp_path)
    with pytest.raises(FileNotFoundError, match="run the latents stage first"):
        load_latent_cache(tmp_path / "absent")


def test_a_shard_without_a_training_tensor_is_refused(tmp_path):
    tensors = training_tensors(3)
    del tensors["engagement_time"]
    write_shards(tmp_path, tensors, shard_size=2)
    with pytest.raises(ValueError, match=r"missing tensors \['engagement_time'\]"):
        load_latent_cache(tmp_path)


WRITE_SHARD = """
import sys, torch
from ec_lora_t.data.latent_shards import LatentShardWriter
writer = LatentShardWriter(sys.argv[1], 4, metadata={"pretrained": "m", "resolution": 32, "more": "keys"})
writer.add({"latent_mean": torch.ones(3, 4, 2, 2), "engagement_time": torch.zeros(3, 2)})
writer.close()
"""


def test_shard_bytes_are_the_same_in_every_process(tmp_path):
    """DVC hashes the folder: a shard must not change between two runs that wrote the same rows
    (safetensors writes several metadata keys in a per-process random order)."""
    for run in ("a", "b"):
        subprocess.run([sys.executable, "-c", WRITE_SHARD, str(tmp_path / run)], check=True, cwd=REPO)
    name = "shard-00000.safetensors"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_tensor_cache_survives_reopening_and_passes_over_unfinished_and_damaged_parts(tmp_path):
    cache = TensorCache(tmp_path / "cache")
    cache.add({"k1": {"x": torch.ones(2)}, "k2": {"x": torch.zeros(2)}})
    cache.add({"k3": {"x": torch.full((2,), 3.0)}})
    (tmp_path / "cache" / "part-00002.safetensors.partial").write_bytes(b"cut short by a crash")
    damaged = (tmp_path / "cache" / "part-00001.safetensors").read_bytes()
    (tmp_path / "cache" / "part-00001.safetensors").write_bytes(damaged[:20])  # e.g. a full disk
    reopened = TensorCache(tmp_path / "cache")
    assert len(reopened) == 2 and "k2" in reopened and "k3" not in reopened  # k3 will be encoded again
    assert torch.equal(reopened.get_many(["k2", "k1"], ["x"])["x"], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    reopened.add({"k3": {"x": torch.ones(2)}})
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors")) == [
        "part-00000.safetensors", "part-00001.safetensors", "part-00002.safetensors"
    ]
    assert "k3" in TensorCache(tmp_path / "cache")


def test_cache_namespaces_change_with_model_files_and_resolution(tiny_sd_dir, tmp_path):
    assert image_cache_namespace(tiny_sd_dir, 32) != image_cache_namespace(tiny_sd_dir, 64)
    assert image_cache_namespace(tiny_sd_dir, 32) == image_cache_namespace(tiny_sd_dir, 32)
    assert image_cache_namespace("org/model-a", 32) != image_cache_namespace("org/model-b", 32)
    # A retrained VAE in place (same name, other bytes) must not reuse latents.
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, copy)
    before_images, before_texts = image_cache_namespace(copy, 32), text_cache_namespace(copy)
    weights = next((copy / "vae").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert image_cache_namespace(copy, 32) != before_images
    assert text_cache_namespace(copy) == before_texts  # the text encoder did not change


def write_feed(folder, num_images: int, start: int = 0) -> pd.DataFrame:
    """A tiny features table: one image per row, a distinct colour each; two seasons."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + num_images):
        path = folder / f"img{i}.png"
        Image.new("RGB", (40, 36), (20 * i % 256, 255 - 7 * i % 256, 90)).save(path)
        season = "summer" if i % 2 else "winter"
        rows.append({
            "shortcode": f"post{i}", "image_index": 0, "image_path": str(path), "image_sha256": file_sha256(path),
            "caption": f"picture number {i}", "season": season,
            "full_caption": f"(tiny style) picture number {i} ({season})",
            "normalized_engagement": i / 20, "normalized_time": 1 - i / 20,
        })
    return pd.DataFrame(rows)


def encode_table(components, table, cache_dir, stats, batch_size=3):
    from ec_lora_t.data.latents import generic_caption

    batches = list(encode_feed(
        components, table["image_path"].tolist(), table["image_sha256"].tolist(), table["full_caption"].tolist(),
        [generic_caption(f, c, s) for f, c, s in zip(table["full_caption"], table["caption"], table["season"])],
        table[["normalized_engagement", "normalized_time"]].to_numpy(),
        resolution=32, image_cache=TensorCache(cache_dir / "images"), text_cache=TensorCache(cache_dir / "texts"),
        batch_size=batch_size, stats=stats, progress=False,
    ))
    return {name: torch.cat([batch[name] for batch in batches]) for name in batches[0]}


def test_encode_feed_matches_direct_encoding_and_encodes_only_new_posts(tiny_sd_dir, tmp_path):
    from ec_lora_t.data.images import image_to_pixel_values, load_rgb_image
    from ec_lora_t.encoders import encode_images, encode_prompts
    from ec_lora_t.models import load_components

    components = load_components(tiny_sd_dir)
    table = write_feed(tmp_path / "posts", 7)
    table = pd.concat([table, table.iloc[[2]]], ignore_index=True)  # the same image twice in the feed
    stats = EncodingStats()
    first = encode_table(components, table, tmp_path / "cache", stats)
    assert (stats.images_encoded, stats.images_from_cache) == (7, 1)
    # 7 full + 2 generic captions encoded; from the cache: rows whose text an earlier batch encoded
    assert (stats.texts_encoded, stats.texts_from_cache) == (7 + 2, 6)

    pixel_values = torch.stack([image_to_pixel_values(load_rgb_image(p), 32) for p in table["image_path"]])
    mean, std = encode_images(components.vae, pixel_values)
    torch.testing.assert_close(first["latent_mean"], mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first["latent_std"], std, rtol=1e-5, atol=1e-5)
    text = encode_prompts(components.tokenizer, components.text_encoder, table["full_caption"].tolist())
    torch.testing.assert_close(first["text_embeddings"], text, rtol=1e-5, atol=1e-5)
    assert torch.equal(first["generic_text_embeddings"][0], first["generic_text_embeddings"][2])  # both winter
    assert torch.equal(first["engagement_time"], torch.tensor(
        table[["normalized_engagement", "normalized_time"]].to_numpy(), dtype=torch.float32))

    # Three new posts: only they are decoded and encoded; the old rows come back bit for bit.
    grown = pd.concat([table, write_feed(tmp_path / "posts", 3, start=7)], ignore_index=True)
    stats = EncodingStats()
    second = encode_table(components, grown, tmp_path / "cache", stats, batch_size=4)
    assert (stats.images_encoded, stats.images_from_cache) == (3, 8)
    assert (stats.texts_encoded, stats.texts_from_cache) == (3, 2 * 11 - 3)
    for name in first:
        assert torch.equal(second[name][: len(table)], first[name]), name


def test_latents_stage_writes_shards_and_reruns_from_the_cache(tiny_sd_dir, tmp_path, monkeypatch):
    from stages.latents import main

    monkeypatch.chdir(tmp_path)
    write_feed(tmp_path / "posts", 5).to_parquet("features.parquet")
    params = {"model": {"pretrained": str(tiny_sd_dir), "resolution": 32}, "latents": {"batch_size": 2, "shard_size": 3}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    def run(out: str) -> tuple[dict, dict]:
        main(["--features", "features.parquet", "--out", out, "--cache", "cache", "--metrics", f"{out}.json",
              "--run-info", f"{out}-run.json"])
        return json.loads((tmp_path / f"{out}.json").read_text()), json.loads((tmp_path / f"{out}-run.json").read_text())

    metrics, run_info = run("first")
    assert metrics == {"images": 5, "shards": 2, "latent_shape": [4, 8, 8], "text_embedding_shape": [77, 32]}
    assert run_info["images_encoded"] == 5 and run_info["seconds"] > 0
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == [
        INDEX_NAME, "shard-00000.safetensors", "shard-00001.safetensors"
    ]
    index = pd.read_parquet(tmp_path / "first" / INDEX_NAME)
    assert index["shortcode"].tolist() == [f"post{i}" for i in range(5)] and "image_sha256" in index

    # The same feed again: nothing is encoded, and the output is byte for byte the same.
    metrics_again, run_info = run("again")
    assert metrics_again == metrics and run_info["images_encoded"] == run_info["texts_encoded"] == 0
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", INDEX_NAME):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    first, again = load_latent_cache(tmp_path / "first"), load_latent_cache(tmp_path / "again")
    assert np.array_equal(first.latent_mean.numpy(), again.latent_mean.numpy())

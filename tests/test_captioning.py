"""Captions: seasons and hemispheres, the full caption, post text, the cache, a tiny BLIP."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from _posts import make_report_feed

from ec_lora_t.data.captioning import (
    CAPTIONS_SCHEMA,
    BlipCaptioner,
    CaptionCache,
    build_captions,
    caption_from_post_text,
    format_full_caption,
    model_cache_key,
    season_of,
)
from ec_lora_t.data.ingest import ingest_posts
from stages import caption as caption_stage

# --- seasons -----------------------------------------------------------------------------

NORTH = {1: "winter", 2: "winter", 3: "spring", 4: "spring", 5: "spring", 6: "summer",
         7: "summer", 8: "summer", 9: "fall", 10: "fall", 11: "fall", 12: "winter"}
SOUTH = {"winter": "summer", "summer": "winter", "spring": "fall", "fall": "spring"}


@pytest.mark.parametrize("month", range(1, 13))
def test_every_month_in_both_hemispheres(month):
    moment = pd.Timestamp(year=2024, month=month, day=15, tz="UTC")
    assert season_of(moment) == NORTH[month]
    assert season_of(moment, "south") == SOUTH[NORTH[month]]


@pytest.mark.parametrize(
    "last_instant, first_instant, before, after",
    [
        ("2024-02-29T23:59:59Z", "2024-03-01T00:00:00Z", "winter", "spring"),  # leap year
        ("2023-02-28T23:59:59Z", "2023-03-01T00:00:00Z", "winter", "spring"),
        ("2024-05-31T23:59:59Z", "2024-06-01T00:00:00Z", "spring", "summer"),
        ("2024-08-31T23:59:59Z", "2024-09-01T00:00:00Z", "summer", "fall"),
        ("2024-11-30T23:59:59Z", "2024-12-01T00:00:00Z", "fall", "winter"),
        ("2024-12-31T23:59:59Z", "2025-01-01T00:00:00Z", "winter", "winter"),
    ],
)
def test_season_boundaries_north_and_south(last_instant, first_instant, before, after):
    assert (season_of(last_instant), season_of(first_instant)) == (before, after)
    assert (season_of(last_instant, "south"), season_of(first_instant, "south")) == (SOUTH[before], SOUTH[after])


def test_season_uses_the_utc_month():
    # 00:30 on 1 March in UTC+1 is still 29 February in UTC.
    assert season_of(pd.Timestamp("2024-03-01T00:30:00+01:00")) == "winter"
    assert season_of("2024-03-01 00:30:00") == "spring"  # naive: taken as UTC


def test_unknown_hemisphere_is_an_error():
    with pytest.raises(ValueError, match="hemisphere"):
        season_of("2024-01-01", "east")


def test_full_caption_is_the_reports_format():
    assert format_full_caption(" a man in a coat ", "sungccess", "winter") == "(sungccess style) a man in a coat (winter)"


def test_post_text_drops_hashtags_and_mentions_and_is_cut_to_length():
    assert caption_from_post_text("sunset walk  with @friend\n#ootd #fashion", 30) == "sunset walk with"
    assert caption_from_post_text("#only #tags", 30) is None
    assert caption_from_post_text(None, 30) is None
    assert caption_from_post_text("one two three four", 2) == "one two"


# --- the cache, with a counting captioner ---------------------------------------------------


class CountingCaptioner:
    """Stands in for BLIP: records every image it was asked to caption."""

    def __init__(self):
        self.images_seen = 0
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        self.images_seen += len(images)
        return [f"caption of a {image.size[0]}x{image.size[1]} image" for image in images]


def _posts(tmp_path, num_posts, name="posts"):
    feed = make_report_feed(tmp_path / name, num_posts=num_posts, carousel_every=0, seed=0)
    return ingest_posts(feed.root).posts_table().to_pandas()


def test_adding_ten_posts_captions_those_ten_only(tmp_path):
    cache_dir = tmp_path / "cache"
    captioner = CountingCaptioner()
    factory_calls = []

    def factory():
        factory_calls.append(1)
        return captioner

    def run(posts):
        return build_captions(posts, source="blip", style_tag="tag", model="fake-model", cache_dir=cache_dir,
                              batch_size=4, captioner_factory=factory, progress=False)

    first = run(_posts(tmp_path, 10))
    assert captioner.images_seen == 10 and captioner.calls == 3  # batches of 4, 4, 2
    assert first.metrics["model_generated"] == 10

    # The same ten posts plus ten new ones (new images: make_report_feed seeds by index).
    second = run(_posts(tmp_path, 20, name="posts20"))
    assert captioner.images_seen == 20
    assert (second.metrics["model_generated"], second.metrics["model_cache_hits"]) == (10, 10)
    assert second.table.num_rows == 20

    # Nothing new: the model is not even loaded.
    run(_posts(tmp_path, 20, name="posts20"))
    assert len(factory_calls) == 2 and captioner.images_seen == 20


def test_cache_is_keyed_by_model_and_survives_a_cut_last_line(tmp_path):
    cache = CaptionCache(tmp_path, model_cache_key("model-a", 30))
    cache.add({"aa": "one", "bb": "two"})
    with open(cache.path, "a") as stream:
        stream.write('{"sha256": "cc", "capt')  # a crash mid-write
    reread = CaptionCache(tmp_path, model_cache_key("model-a", 30))
    assert (len(reread), reread.get("bb")) == (2, "two")
    assert len(CaptionCache(tmp_path, model_cache_key("model-b", 30))) == 0
    assert model_cache_key("model-a", 30) != model_cache_key("model-a", 20)


def _textless_posts(tmp_path):
    posts = _posts(tmp_path, 4)
    posts.loc[1, "post_text"] = "#nothing #but #tags"
    posts.loc[2, "post_text"] = None
    return posts


def test_post_text_source_uses_blip_for_textless_posts_only_when_asked(tmp_path):
    posts = _textless_posts(tmp_path)
    captioner = CountingCaptioner()
    result = build_captions(posts, source="post_text", style_tag="demo", hemisphere="south", model="fake",
                            missing_text="blip", cache_dir=tmp_path / "cache", captioner_factory=lambda: captioner,
                            progress=False)
    table = result.table.to_pandas()
    assert result.table.schema == CAPTIONS_SCHEMA
    assert captioner.images_seen == 2
    assert table["caption_source"].tolist() == ["post_text", "blip", "blip", "post_text"]
    assert table.loc[0, "full_caption"] == "(demo style) a person wearing outfit number 0 (summer)"  # January, south


def test_textless_posts_get_the_generic_caption_not_blip_by_default(tmp_path):
    posts = _textless_posts(tmp_path)

    def no_blip():
        raise AssertionError("BLIP was loaded though missing_text is 'generic'")
    # A model is configured (as in params.yaml), yet nothing reaches for it.
    result = build_captions(posts, source="post_text", style_tag="demo", model="Salesforce/blip-image-captioning-base",
                            cache_dir=tmp_path / "cache", captioner_factory=no_blip, progress=False)
    table = result.table.to_pandas()
    assert table["caption_source"].tolist() == ["post_text", "generic", "generic", "post_text"]
    assert table.loc[1, "full_caption"] == f"(demo style) ({table.loc[1, 'season']})"
    assert result.metrics["generic"] == 2 and result.metrics["from_model"] == 0


def test_post_text_skip_leaves_textless_images_out_and_says_so(tmp_path):
    posts = _posts(tmp_path, 3)
    posts.loc[0, "post_text"] = None
    result = build_captions(posts, source="post_text", style_tag="demo", model=None, missing_text="skip",
                            progress=False)
    assert result.table.num_rows == 2
    assert result.metrics["uncaptioned"] == 1
    assert result.metrics["uncaptioned_paths"] == [posts.loc[0, "image_path"]]


def test_blip_without_a_model_or_offline_fails_at_once(tmp_path, monkeypatch):
    import time

    from ec_lora_t.hub import HubUnreachableError

    with pytest.raises(ValueError, match="needs a BLIP model"):
        build_captions(_textless_posts(tmp_path), source="post_text", style_tag="demo", model=None,
                       missing_text="blip", progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="caption.model 'someone/blip-not-cached'.*HF_HUB_OFFLINE"):
        build_captions(_textless_posts(tmp_path), source="post_text", style_tag="demo",
                       model="someone/blip-not-cached", missing_text="blip", cache_dir=tmp_path / "cache",
                       progress=False)
    assert time.perf_counter() - started < 10


# --- a tiny BLIP through from_pretrained ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_blip_dir(tmp_path_factory):
    """A random BLIP small enough for CPU tests, saved like a hub checkpoint."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipProcessor,
    )

    try:  # transformers 5: the PIL processor by name; 4.x: the only one
        from transformers import BlipImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import BlipImageProcessor as ImageProcessor

    directory = tmp_path_factory.mktemp("tiny-blip")
    words = ["a", "an", "the", "person", "man", "woman", "street", "city", "coat", "in", "on", "with", "red"]
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizer(str(directory / "vocab.txt"))
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, bos_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
    )
    vision_config = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text_config, vision_config=vision_config,
                                                    projection_dim=16))
    processor = BlipProcessor(image_processor=ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    model_dir = directory / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return model_dir


def test_blip_captioner_loads_through_from_pretrained_and_captions_a_batch(tiny_blip_dir):
    from PIL import Image

    captioner = BlipCaptioner.from_pretrained(tiny_blip_dir, max_new_tokens=4, device="cpu")
    assert "Pil" in type(captioner.processor.image_processor).__name__ or not _has_pil_variant()
    captions = captioner([Image.new("RGB", (40, 30), (i * 60, 0, 0)) for i in range(3)])
    assert len(captions) == 3 and all(isinstance(text, str) for text in captions)


def _has_pil_variant() -> bool:
    import transformers

    return hasattr(transformers, "BlipImageProcessorPil")


def test_caption_stage_with_tiny_blip_then_rerun_from_cache(tmp_path, monkeypatch, tiny_blip_dir):
    posts = _posts(tmp_path, 5)
    posts.to_parquet(tmp_path / "posts.parquet")
    params = {"caption": {"source": "blip", "model": str(tiny_blip_dir), "style_tag": "tiny", "hemisphere": "north",
                          "batch_size": 2, "max_new_tokens": 5}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    args = ["--posts", "posts.parquet", "--out", "captions.parquet", "--cache", "cache", "--metrics", "caption.json",
            "--run-info", "run_info.json"]

    caption_stage.main(args)
    table = pq.read_table("captions.parquet")
    metrics = json.loads((tmp_path / "caption.json").read_text())
    run_info = json.loads((tmp_path / "run_info.json").read_text())
    assert table.schema == CAPTIONS_SCHEMA and table.num_rows == 5
    assert run_info["model_generated"] == 5 and metrics["from_model"] == 5
    frame = table.to_pandas()
    for row in frame.itertuples():
        assert row.full_caption == f"(tiny style) {row.caption} ({row.season})"
    assert set(frame["season"]) == {"winter"}  # make_report_feed posts weekly from 1 January

    caption_stage.main(args)
    # The rerun came from the cache (run info), and the committed metrics did not change.
    assert json.loads((tmp_path / "caption.json").read_text()) == metrics
    run_info = json.loads((tmp_path / "run_info.json").read_text())
    assert (run_info["model_generated"], run_info["model_cache_hits"]) == (0, 5)
    assert pq.read_table("captions.parquet").equals(table)


def test_blip_source_without_a_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="needs a BLIP model"):
        build_captions(_posts(tmp_path, 1), source="blip", style_tag="demo", model="", progress=False)

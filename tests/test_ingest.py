"""Ingest: the report layout, every kind of bad input, image normalisation, field parsers."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from _posts import (
    ACCEPTED_IMAGE_KINDS,
    TEST_MAX_IMAGE_PIXELS,
    image_bytes,
    make_bad_report_feed,
    make_report_feed,
    write_report_post,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ec_lora_t.data.ingest import (
    POSTS_SCHEMA,
    REJECT_REASONS,
    REJECTS_SCHEMA,
    ImageRejected,
    IngestError,
    InvalidPostData,
    ingest_posts,
    load_rgb_image,
    parse_count,
    parse_report_metadata,
    parse_timestamp,
)
from stages import ingest as ingest_stage

# --- report layout ----------------------------------------------------------------------


def test_clean_report_feed_gives_one_row_per_image_and_no_rejects(tmp_path):
    feed = make_report_feed(tmp_path / "posts", num_posts=6)
    result = ingest_posts(feed.root)
    table = result.posts_table()

    assert table.schema == POSTS_SCHEMA
    assert result.rejects == []
    assert table.num_rows == feed.valid_images == 8  # two 2-image carousels
    frame = table.to_pandas()
    assert set(frame["shortcode"]) == feed.valid_shortcodes
    carousel = frame[frame["shortcode"] == "Post0002"].sort_values("image_index")
    assert carousel["image_index"].tolist() == [0, 1]
    assert carousel["image_path"].str.startswith(str(feed.root)).all()
    first = frame[frame["shortcode"] == "Post0000"].iloc[0]
    assert (first["likes_count"], first["comments_count"]) == (100, 3)
    assert first["timestamp"] == pd.Timestamp("2024-01-01", tz="UTC")
    assert first["post_text"] == "a person wearing outfit number 0"
    assert (frame["source_format"] == "report").all()
    metrics = result.metrics()
    assert metrics["posts"] == 6 and metrics["images"] == 8 and metrics["carousel_posts"] == 2
    assert metrics["rejected"] == 0


def test_every_kind_of_bad_input_is_rejected_with_its_reason_and_valid_posts_survive(tmp_path):
    feed = make_bad_report_feed(tmp_path / "posts")
    result = ingest_posts(feed.root, max_image_pixels=feed.max_image_pixels)

    rejected = {reject.path: reject.reason for reject in result.rejects}
    assert rejected == feed.expected_rejects
    assert {record.shortcode for record in result.records} == feed.valid_shortcodes
    assert len(result.records) == feed.valid_images
    # Every reason of the report layout is exercised, so none can silently go missing.
    report_reasons = set(REJECT_REASONS) - {"video_skipped", "video_without_thumbnail", "not_a_post"}
    assert set(rejected.values()) == report_reasons
    counts = result.metrics()["rejected_by_reason"]
    for reason in report_reasons:
        assert counts[reason] == list(rejected.values()).count(reason)
    # Each reject explains itself.
    assert all(reject.detail for reject in result.rejects)


def test_accepted_oddities_are_normalised_not_rejected(tmp_path):
    feed = make_bad_report_feed(tmp_path / "posts")
    frame = ingest_posts(feed.root, max_image_pixels=feed.max_image_pixels).posts_table().to_pandas()
    by_code = frame.set_index("shortcode")
    assert by_code.loc["Millis01", "timestamp"] == pd.Timestamp(1_714_560_000, unit="s", tz="UTC")
    assert by_code.loc["IsoTime01", "timestamp"] == pd.Timestamp("2024-05-01T12:30:00", tz="UTC")
    assert by_code.loc["IsoTime02", "timestamp"] == pd.Timestamp("2024-05-02T06:00:00", tz="UTC")
    assert (by_code.loc["Thousands01", "likes_count"], by_code.loc["Thousands01", "comments_count"]) == (12345, 1024)
    assert by_code.loc["FloatCount01", "likes_count"] == 120
    assert pd.isna(by_code.loc["NoCaption01", "post_text"])
    # The carousel keeps slides 0 and 2; slide 1 (truncated) is in the rejects.
    assert sorted(frame.loc[frame["shortcode"] == "Carousel01", "image_index"]) == [0, 2]


def test_duplicate_shortcode_keeps_the_folder_named_like_it(tmp_path):
    root = tmp_path / "posts"
    copy = write_report_post(root, "000-copy", shortcode="DupX", likes=1)  # sorts first
    original = write_report_post(root, "DupX", likes=2)
    result = ingest_posts(root)
    assert [(r.shortcode, r.likes_count) for r in result.records] == [("DupX", 2)]
    assert [(r.path, r.reason) for r in result.rejects] == [(str(copy), "duplicate_shortcode")]
    assert str(original) in result.rejects[0].detail


def test_duplicate_with_broken_images_does_not_shadow_the_good_post(tmp_path):
    root = tmp_path / "posts"
    write_report_post(root, "DupY", images=("garbage",))
    write_report_post(root, "DupY-copy", shortcode="DupY", likes=9)
    result = ingest_posts(root)
    assert [(r.shortcode, r.likes_count) for r in result.records] == [("DupY", 9)]
    assert [r.reason for r in result.rejects] == ["unreadable_image"]


def test_report_posts_may_sit_one_level_deeper_under_an_account_folder(tmp_path):
    make_report_feed(tmp_path / "posts" / "sungccess", num_posts=3)
    result = ingest_posts(tmp_path / "posts", format="report")
    assert len({r.shortcode for r in result.records}) == 3 and result.rejects == []


def test_metadata_with_repeated_identical_rows_is_accepted_but_disagreeing_rows_are_not():
    header = "shortcode,likes_count,comments_count,timestamp\n"
    same = parse_report_metadata(header + "A,1,2,1714560000\nA,1,2,1714560000\n")
    assert (same.shortcode, same.likes_count, same.comments_count) == ("A", 1, 2)
    with pytest.raises(InvalidPostData, match="disagree") as raised:
        parse_report_metadata(header + "A,1,2,1714560000\nA,5,2,1714560000\n")
    assert raised.value.reason == "malformed_metadata"


def test_metadata_header_is_case_insensitive_and_shortcode_falls_back_to_folder():
    metadata = parse_report_metadata("\ufeffLikes_Count, Comments_Count ,TIMESTAMP\n5,1,2024-01-01\n", "Folder1")
    assert metadata.shortcode == "Folder1" and metadata.likes_count == 5
    assert metadata.timestamp == pd.Timestamp("2024-01-01", tz="UTC")


# --- failures with clear messages --------------------------------------------------------


def test_missing_posts_dir_names_the_path_and_the_expected_layout(tmp_path):
    with pytest.raises(IngestError) as raised:
        ingest_posts(tmp_path / "nowhere")
    message = str(raised.value)
    assert str(tmp_path / "nowhere") in message and "does not exist" in message
    assert "metadata.csv" in message and "instaloader" in message


def test_empty_or_unknown_posts_dir_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="is empty"):
        ingest_posts(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    with pytest.raises(IngestError, match="no posts found"):
        ingest_posts(tmp_path / "other")


def _write_params(directory, posts_dir, folds=2, **overrides):
    section = {"posts_dir": str(posts_dir), "format": "auto", "videos": "thumbnail", "max_image_pixels": 89478485}
    section.update(overrides)
    # The stage also reads regressor.folds: the smallest feed the evaluation can use.
    regressor = {"protocol": "grouped_kfold", "folds": folds, "alphas": [1.0], "seed": 42}
    (directory / "params.yaml").write_text(yaml.safe_dump({"ingest": section, "regressor": regressor}))


def _run_stage(tmp_path):
    ingest_stage.main(
        [
            "--out-table", str(tmp_path / "data/ingest/posts.parquet"),
            "--out-rejects", str(tmp_path / "data/ingest/rejects.parquet"),
            "--metrics", str(tmp_path / "metrics/ingest.json"),
        ]
    )


def test_stage_writes_table_rejects_and_metrics(tmp_path, monkeypatch):
    feed = make_bad_report_feed(tmp_path / "posts")
    _write_params(tmp_path, "posts", max_image_pixels=TEST_MAX_IMAGE_PIXELS)
    monkeypatch.chdir(tmp_path)
    _run_stage(tmp_path)

    posts = pq.read_table(tmp_path / "data/ingest/posts.parquet")
    rejects = pq.read_table(tmp_path / "data/ingest/rejects.parquet")
    metrics = json.loads((tmp_path / "metrics/ingest.json").read_text())
    assert posts.schema == POSTS_SCHEMA and rejects.schema == REJECTS_SCHEMA
    # The table keeps paths as given: relative to the working directory here.
    assert all(path.startswith("posts/") for path in posts.column("image_path").to_pylist())
    assert set(posts.column("shortcode").to_pylist()) == feed.valid_shortcodes
    assert rejects.num_rows == metrics["rejected"] == len(feed.expected_rejects)
    assert metrics["images"] == feed.valid_images


def test_stage_fails_clearly_when_nothing_valid_remains_but_still_writes_rejects(tmp_path, monkeypatch):
    root = tmp_path / "posts"
    write_report_post(root, "Bad1", images=("truncated",))
    write_report_post(root, "Bad2", likes=-3)
    _write_params(tmp_path, "posts")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as raised:
        _run_stage(tmp_path)
    assert "no valid post" in str(raised.value.code) and "truncated_image" in str(raised.value.code)
    assert pq.read_table(tmp_path / "data/ingest/rejects.parquet").num_rows == 2
    assert not (tmp_path / "data/ingest/posts.parquet").exists()


@pytest.mark.parametrize(("num_posts", "folds"), [(3, 5), (3, 3)])
def test_stage_stops_a_feed_too_small_to_evaluate_before_captioning(tmp_path, monkeypatch, num_posts, folds):
    """3 posts: too few for 5 grouped folds; with 3 folds the report protocol's 5 images are missing."""
    make_report_feed(tmp_path / "posts", num_posts=num_posts, carousel_every=0)
    _write_params(tmp_path, "posts", folds=folds)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as raised:
        _run_stage(tmp_path)
    message = str(raised.value.code)
    assert message.startswith(f"ingest: {num_posts} usable posts ({num_posts} images) in posts are too few"), message
    assert f"regressor.folds={folds} needs at least {ingest_stage.minimum_posts(folds)} posts" in message
    assert "at least 5 images" in message and "stopped before captioning" in message
    assert json.loads((tmp_path / "metrics/ingest.json").read_text())["posts"] == num_posts
    assert not (tmp_path / "data/ingest/posts.parquet").exists()  # nothing for caption to start on


def test_stage_on_missing_folder_exits_with_the_path(tmp_path, monkeypatch):
    _write_params(tmp_path, "data/demo_posts")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as raised:
        _run_stage(tmp_path)
    assert "data/demo_posts" in str(raised.value.code)


def test_embedded_demo_data_ingests_with_zero_rejects(tmp_path):
    from ec_lora_t.demo.demo_data import write_demo_posts

    write_demo_posts(tmp_path / "demo_posts", num_posts=12, image_size=64, seed=7)
    result = ingest_posts(tmp_path / "demo_posts")
    assert result.rejects == []
    assert result.metrics()["posts"] == 12
    assert all(record.post_text for record in result.records)


# --- images ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ACCEPTED_IMAGE_KINDS)
def test_load_rgb_image_gives_8bit_rgb_for_every_accepted_kind(tmp_path, kind):
    path = tmp_path / f"image_{kind}"
    path.write_bytes(image_bytes(kind, size=(48, 32)))
    image = load_rgb_image(path)
    assert image.mode == "RGB"
    assert image.size == ((32, 48) if kind == "exif_rotated" else (48, 32))
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.std() > 0  # not a blank (e.g. clipped 16-bit) image


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    path.write_bytes(image_bytes("exif_rotated", size=(48, 32)))
    pixels = np.asarray(load_rgb_image(path)).astype(int)
    # Stored left half red: displayed 90 degrees clockwise, red is on top.
    assert pixels[4, 16, 0] > 200 and pixels[4, 16, 2] < 60
    assert pixels[44, 16, 2] > 200 and pixels[44, 16, 0] < 60


def test_transparency_is_composited_on_white_and_cmyk_keeps_colour(tmp_path):
    rgba = tmp_path / "half_transparent.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(rgba)
    assert np.asarray(load_rgb_image(rgba)).min() == 255
    cmyk = tmp_path / "red.jpg"
    Image.new("RGB", (8, 8), (220, 20, 20)).convert("CMYK").save(cmyk, quality=95)
    red, green, blue = np.asarray(load_rgb_image(cmyk)).reshape(-1, 3).mean(axis=0)
    assert red > 180 and green < 70 and blue < 70


def test_grey16_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(path)
    assert abs(int(np.asarray(load_rgb_image(path))[0, 0, 0]) - 128) <= 1


@pytest.mark.parametrize(
    "kind, reason",
    [("truncated", "truncated_image"), ("garbage", "unreadable_image"), ("empty", "unreadable_image"),
     ("bomb", "decompression_bomb"), ("oversized", "decompression_bomb")],
)
def test_load_rgb_image_rejects_bad_files_naming_them(tmp_path, kind, reason):
    path = tmp_path / f"bad_{kind}.img"
    path.write_bytes(image_bytes(kind))
    with pytest.raises(ImageRejected) as raised:
        load_rgb_image(path, max_image_pixels=TEST_MAX_IMAGE_PIXELS)
    assert raised.value.reason == reason and str(path) in str(raised.value)


def test_pixel_limit_is_the_callers_and_pillows_global_is_restored(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(image_bytes("oversized"))
    before = Image.MAX_IMAGE_PIXELS
    assert load_rgb_image(path, max_image_pixels=None).size[0] > 64
    with pytest.raises(ImageRejected):
        load_rgb_image(path, max_image_pixels=100)
    assert Image.MAX_IMAGE_PIXELS == before


# --- field parsers ---------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [(0, 0), ("17", 17), (" 1,234 ", 1234), ("120.0", 120), (5.0, 5), (np.int64(3), 3)])
def test_parse_count_accepts(value, expected):
    assert parse_count(value) == expected


@pytest.mark.parametrize("value", [-1, "-5", "1.5", 2.5, "abc", "1k", "", None, True, float("nan"), float("inf"), "12,34"])
def test_parse_count_rejects(value):
    with pytest.raises(InvalidPostData) as raised:
        parse_count(value, "likes_count")
    assert raised.value.reason == "invalid_count" and "likes_count" in str(raised.value)


@given(st.integers(min_value=0, max_value=2**62))
def test_parse_count_reads_every_spelling_of_a_count(count):
    assert parse_count(count) == count
    assert parse_count(str(count)) == count
    assert parse_count(f"{count:,}") == count
    if count < 2**53:
        assert parse_count(float(count)) == count


@given(st.integers(max_value=-1))
def test_parse_count_rejects_every_negative(count):
    with pytest.raises(InvalidPostData):
        parse_count(count)
    with pytest.raises(InvalidPostData):
        parse_count(str(count))


@given(st.one_of(st.text(), st.floats(allow_nan=True), st.integers(), st.none(), st.booleans()))
def test_parse_count_returns_a_count_or_an_invalid_post_reason(value):
    try:
        count = parse_count(value)
    except InvalidPostData as error:
        assert error.reason == "invalid_count"
    else:
        assert isinstance(count, int) and count >= 0


_post_times = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2099, 1, 1), timezones=st.just(timezone.utc)
).map(lambda moment: moment.replace(microsecond=0))


@given(_post_times)
def test_parse_timestamp_reads_seconds_milliseconds_and_iso_alike(moment):
    seconds = int(moment.timestamp())
    expected = pd.Timestamp(moment)
    assert parse_timestamp(seconds) == expected
    assert parse_timestamp(str(seconds)) == expected
    assert parse_timestamp(seconds * 1000) == expected
    assert parse_timestamp(seconds * 1_000_000) == expected
    assert parse_timestamp(moment.isoformat()) == expected
    assert parse_timestamp(moment.strftime("%Y-%m-%dT%H:%M:%SZ")) == expected
    assert parse_timestamp(moment.replace(tzinfo=None).isoformat(sep=" ")) == expected  # naive = UTC
    shifted = moment.astimezone(timezone(timedelta(hours=-5)))
    assert parse_timestamp(shifted.isoformat()) == expected


@given(st.one_of(st.text(), st.floats(), st.integers(), st.none()))
def test_parse_timestamp_returns_a_utc_time_in_range_or_an_invalid_post_reason(value):
    try:
        timestamp = parse_timestamp(value)
    except InvalidPostData as error:
        assert error.reason == "invalid_timestamp"
    else:
        assert str(timestamp.tz) == "UTC" and 1970 <= timestamp.year < 2100


@pytest.mark.parametrize("value", ["yesterday", "2024-13-01", -1, 5e20 * 1e9, "", None, float("nan")])
def test_parse_timestamp_rejects(value):
    with pytest.raises(InvalidPostData) as raised:
        parse_timestamp(value)
    assert raised.value.reason == "invalid_timestamp"


_csv_cells = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r"), max_size=30)


@settings(max_examples=60)
@given(
    shortcode=st.from_regex(r"[A-Za-z0-9_-]{1,11}", fullmatch=True),
    likes=st.integers(0, 10**9),
    comments=st.integers(0, 10**7),
    moment=_post_times,
    caption=_csv_cells,
)
def test_report_metadata_round_trips_through_csv(shortcode, likes, comments, moment, caption):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["shortcode", "likes_count", "comments_count", "timestamp", "caption"])
    writer.writerow([shortcode, likes, comments, int(moment.timestamp()), caption])
    metadata = parse_report_metadata(buffer.getvalue(), "folder")
    assert (metadata.shortcode, metadata.likes_count, metadata.comments_count) == (shortcode, likes, comments)
    assert metadata.timestamp == pd.Timestamp(moment)
    assert metadata.post_text == (caption.strip() or None)


@settings(max_examples=80)
@given(st.text(max_size=200))
def test_report_metadata_parser_never_raises_anything_but_a_reason(text):
    try:
        parse_report_metadata(text, "folder")
    except InvalidPostData as error:
        assert error.reason in REJECT_REASONS


def test_carousel_order_follows_the_numbers_in_file_names(tmp_path):
    post_dir = write_report_post(tmp_path / "posts", "Order01", images=())
    for number in (10, 2, 1):
        (post_dir / f"img_{number}.jpg").write_bytes(image_bytes("rgb", seed=number))
    records = ingest_posts(tmp_path / "posts").records
    assert [(r.image_index, r.image_path.rsplit("/", 1)[-1]) for r in records] == [
        (0, "img_1.jpg"), (1, "img_2.jpg"), (2, "img_10.jpg")
    ]

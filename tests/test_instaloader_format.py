"""Ingest of instaloader downloads, on files written by instaloader's own code (offline)."""

from __future__ import annotations

import json
import lzma

import pandas as pd
import pytest
from _posts import InstaloaderPostSpec, make_instaloader_profile
from hypothesis import given, settings
from hypothesis import strategies as st

from ec_lora_t.data.ingest import (
    REJECT_REASONS,
    InvalidPostData,
    detect_format,
    ingest_posts,
    parse_instaloader_structure,
)

instaloader = pytest.importorskip("instaloader")

SPECS = [
    InstaloaderPostSpec("Single01", likes=120, comments=4, taken_at=1_704_110_400),  # 2024-01-01 12:00
    InstaloaderPostSpec(
        "Carousel01", likes=300, comments=10, taken_at=1_714_560_000, slides=("rgb", "video", "palette")
    ),
    InstaloaderPostSpec("Video01", likes=50, comments=1, taken_at=1_719_792_000, slides=("video",)),
    InstaloaderPostSpec("AltText01", caption=None, alt_text="May be an image of 1 person", taken_at=1_725_148_800),
]


@pytest.fixture(params=[False, True], ids=["anonymous", "logged_in"])
def profile(request, tmp_path):
    root = tmp_path / "downloads"
    make_instaloader_profile(root, "somecreator", SPECS, logged_in=request.param)
    return root, request.param


def test_files_are_instaloaders_own_layout_and_node_schemas(profile):
    root, logged_in = profile
    folder = root / "somecreator"
    names = sorted(p.name for p in folder.iterdir())
    # {date_utc}_UTC naming, carousel slides _1.._3 with no unsuffixed image, .json.xz metadata.
    assert "2024-01-01_12-00-00_UTC.jpg" in names and "2024-01-01_12-00-00_UTC.json.xz" in names
    assert {"2024-05-01_10-40-00_UTC_1.jpg", "2024-05-01_10-40-00_UTC_2.mp4", "2024-05-01_10-40-00_UTC_3.png"} <= set(names)
    assert "2024-05-01_10-40-00_UTC.jpg" not in names
    with lzma.open(folder / "2024-01-01_12-00-00_UTC.json.xz", "rt") as stream:
        saved = json.load(stream)
    assert saved["instaloader"]["node_type"] == "Post"
    node = saved["node"]
    if logged_in:
        assert node["comments"] == 4 and node["date"] == 1_704_110_400 and isinstance(node["caption"], str)
        assert node["iphone_struct"]["like_count"] == 120
    else:
        assert node["edge_media_to_comment"]["count"] == 4 and node["taken_at_timestamp"] == 1_704_110_400
        assert node["edge_media_to_caption"]["edges"][0]["node"]["text"]


def test_instaloader_profile_ingests_with_video_thumbnails(profile):
    root, _ = profile
    assert detect_format(root) == "instaloader"
    result = ingest_posts(root, videos="thumbnail")
    assert result.rejects == []
    frame = result.posts_table().to_pandas()
    assert (frame["source_format"] == "instaloader").all()
    assert frame.groupby("shortcode")["image_index"].apply(sorted).to_dict() == {
        "Single01": [0], "Carousel01": [0, 1, 2], "Video01": [0], "AltText01": [0],
    }
    single = frame[frame["shortcode"] == "Single01"].iloc[0]
    assert (single["likes_count"], single["comments_count"]) == (120, 4)
    assert single["timestamp"] == pd.Timestamp("2024-01-01T12:00:00", tz="UTC")
    assert single["post_text"] == "a person on a city street #ootd"
    assert frame.loc[frame["shortcode"] == "AltText01", "post_text"].item() == "May be an image of 1 person"
    video_slide = frame[(frame["shortcode"] == "Carousel01") & (frame["image_index"] == 1)]["image_path"].item()
    assert video_slide.endswith("2024-05-01_10-40-00_UTC_2.jpg")  # the thumbnail, not the .mp4
    assert result.metrics()["ignored_files"] > 0  # caption .txt files and .mp4s, counted


def test_videos_skip_rejects_every_video_with_its_reason(profile):
    root, _ = profile
    result = ingest_posts(root, videos="skip")
    skipped = sorted(r.path.rsplit("/", 1)[-1] for r in result.rejects if r.reason == "video_skipped")
    assert skipped == ["2024-05-01_10-40-00_UTC_2.jpg", "2024-07-01_00-00-00_UTC.jpg"]
    frame = result.posts_table().to_pandas()
    assert "Video01" not in set(frame["shortcode"])
    assert sorted(frame.loc[frame["shortcode"] == "Carousel01", "image_index"]) == [0, 2]


def test_bad_instaloader_input_is_rejected_with_reasons(tmp_path):
    root = tmp_path / "downloads"
    folder = make_instaloader_profile(
        root,
        "creator",
        [
            InstaloaderPostSpec("Good01", taken_at=1_704_110_400),
            InstaloaderPostSpec("Corrupt01", taken_at=1_704_200_000),
            InstaloaderPostSpec("Truncated01", taken_at=1_704_300_000, slides=("rgb", "truncated")),
            InstaloaderPostSpec("NoThumb01", taken_at=1_704_400_000, slides=("video",)),
            InstaloaderPostSpec("NoImage01", taken_at=1_704_500_000),
        ],
    )
    stem = {code: pd.Timestamp(t, unit="s").strftime("%Y-%m-%d_%H-%M-%S_UTC") for code, t in [
        ("Corrupt01", 1_704_200_000), ("Truncated01", 1_704_300_000), ("NoThumb01", 1_704_400_000),
        ("NoImage01", 1_704_500_000)]}
    (folder / f"{stem['Corrupt01']}.json.xz").write_bytes(b"\xfd7zXZ\x00 cut short")
    (folder / f"{stem['NoThumb01']}.jpg").unlink()
    (folder / f"{stem['NoImage01']}.jpg").unlink()
    (folder / "2020-01-01_00-00-00_UTC.jpg").write_bytes((folder / "2024-01-01_12-00-00_UTC.jpg").read_bytes())
    # The profile's own JSON, as instaloader saves it, is not a post and not a reject.
    profile = instaloader.Profile(instaloader.Instaloader().context, {"username": "creator", "id": "1"})
    instaloader.save_structure_to_file(profile, str(folder / "creator_1.json.xz"))

    result = ingest_posts(root)
    reasons = {r.path.rsplit("/", 1)[-1]: r.reason for r in result.rejects}
    assert reasons == {
        f"{stem['Corrupt01']}.json.xz": "malformed_metadata",
        f"{stem['Truncated01']}_2.jpg": "truncated_image",
        f"{stem['NoThumb01']}.mp4": "video_without_thumbnail",
        f"{stem['NoImage01']}.json.xz": "no_images",
        "2020-01-01_00-00-00_UTC.jpg": "missing_metadata",
    }
    assert {r.shortcode for r in result.records} == {"Good01", "Truncated01"}


def test_same_post_in_two_profile_folders_is_a_duplicate(tmp_path):
    root = tmp_path / "downloads"
    make_instaloader_profile(root, "alice", [InstaloaderPostSpec("Collab01")])
    make_instaloader_profile(root, "bob", [InstaloaderPostSpec("Collab01")])
    result = ingest_posts(root)
    assert [r.shortcode for r in result.records] == ["Collab01"]
    assert [(r.reason, "/bob/" in r.path) for r in result.rejects] == [("duplicate_shortcode", True)]


def test_uncompressed_json_from_no_compress_json_is_read(tmp_path):
    folder = make_instaloader_profile(tmp_path / "d", "creator", [InstaloaderPostSpec("Plain01", likes=7)])
    for packed in folder.glob("*.json.xz"):
        with lzma.open(packed, "rt") as stream:
            (folder / packed.name.removesuffix(".xz")).write_text(stream.read())
        packed.unlink()
    result = ingest_posts(tmp_path / "d", format="instaloader")
    assert [(r.shortcode, r.likes_count) for r in result.records] == [("Plain01", 7)]


# --- the node parser, property-based ------------------------------------------------------

_counts = st.integers(min_value=0, max_value=10**9)
_times = st.integers(min_value=1_286_000_000, max_value=4_000_000_000)  # Instagram's launch .. 2096
_texts = st.one_of(st.none(), st.text(max_size=50))


@settings(max_examples=100)
@given(likes=_counts, comments=_counts, taken_at=_times, caption=_texts, logged_in=st.booleans(),
       sidecar=st.lists(st.booleans(), min_size=2, max_size=5))
def test_both_node_schemas_parse_to_the_same_post(likes, comments, taken_at, caption, logged_in, sidecar):
    if logged_in:
        node = {"shortcode": "Abc", "__typename": "GraphSidecar", "date": taken_at, "caption": caption,
                "comments": comments, "edge_media_preview_like": {"count": likes},
                "iphone_struct": {"like_count": likes, "comment_count": comments, "taken_at": taken_at}}
    else:
        node = {"shortcode": "Abc", "__typename": "GraphSidecar", "taken_at_timestamp": taken_at,
                "edge_media_preview_like": {"count": likes}, "edge_media_to_comment": {"count": comments},
                "edge_media_to_caption": {"edges": [{"node": {"text": caption}}] if caption is not None else []}}
    node["edge_sidecar_to_children"] = {"edges": [{"node": {"is_video": v}} for v in sidecar]}
    parsed = parse_instaloader_structure({"node": node, "instaloader": {"node_type": "Post"}})
    assert (parsed.metadata.likes_count, parsed.metadata.comments_count) == (likes, comments)
    assert parsed.metadata.timestamp == pd.Timestamp(taken_at, unit="s", tz="UTC")
    assert parsed.metadata.post_text == ((caption or "").strip() or None)
    assert parsed.slide_is_video == tuple(sidecar)


@settings(max_examples=100)
@given(st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(
        st.sampled_from(["node", "shortcode", "date", "comments", "caption", "taken_at_timestamp",
                         "edge_media_preview_like", "count", "edges", "iphone_struct", "__typename"]),
        children, max_size=6)),
    max_leaves=20,
))
def test_node_parser_never_raises_anything_but_a_reason(structure):
    try:
        parse_instaloader_structure(structure, "2024-01-01_00-00-00_UTC")
    except InvalidPostData as error:
        assert error.reason in REJECT_REASONS


def test_time_falls_back_to_the_filename_date():
    parsed = parse_instaloader_structure(
        {"node": {"shortcode": "A", "edge_media_preview_like": {"count": 1}, "comments": 0}},
        "2023-07-15_08-30-00_UTC",
    )
    assert parsed.metadata.timestamp == pd.Timestamp("2023-07-15T08:30:00", tz="UTC")


def test_negative_or_missing_counts_in_a_node_are_invalid_count():
    for node in ({"shortcode": "A", "date": 1_700_000_000, "edge_media_preview_like": {"count": -1}, "comments": 0},
                 {"shortcode": "A", "date": 1_700_000_000, "comments": 3}):
        with pytest.raises(InvalidPostData) as raised:
            parse_instaloader_structure({"node": node})
        assert raised.value.reason == "invalid_count"

"""The demo feed's insights export: saves, shares and reach follow their own hidden functions,
ingest joins them, and the evaluation knows which function an engagement follows."""

import csv
import hashlib

import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from ec_lora_t.data.ingest import ingest_posts
from ec_lora_t.demo import world
from ec_lora_t.demo.demo_data import (
    DEMO_INSIGHTS,
    DEMO_SIGNAL_RATES,
    FIRST_POST,
    SPAN_DAYS,
    read_demo_manifest,
    write_demo_posts,
)
from ec_lora_t.demo.ground_truth import DemoGroundTruth, demo_scores, signal_audience_weights
from stages.evaluate import resolve_ground_truth

NUM_POSTS = 80


@pytest.fixture(scope="module")
def feed(tmp_path_factory):
    root = tmp_path_factory.mktemp("feed") / "posts"
    write_demo_posts(root, num_posts=NUM_POSTS, image_size=64, seed=7)
    return root


def _posts(root):
    """Per post (in the insights' order): shortcode, followers(t), its images at 32 px."""
    posts = {}
    for post in sorted(path for path in root.iterdir() if path.is_dir()):
        row = next(csv.DictReader(open(post / "metadata.csv")))
        days = (int(row["timestamp"]) - FIRST_POST.timestamp()) / 86400.0
        images = [Image.open(path).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
                  for path in sorted(post.glob("img_*.jpg"))]
        posts[row["shortcode"]] = (1.0 + 1.5 * days / SPAN_DAYS, int(row["likes_count"]), images)
    return posts


def test_each_signal_follows_its_own_audience(feed):
    """Per follower, saves rank the posts as the savers' function (caps) does and likes as the
    likers' (vivid_bright), each far better than by the other's; reach follows only the trend."""
    posts = _posts(feed)
    insights = {row["Permalink"].split("/")[-2]: row for row in csv.DictReader(open(feed / DEMO_INSIGHTS))}
    assert set(insights) == set(posts)
    followers = np.array([posts[code][0] for code in insights])
    per_follower = {
        "likes": np.array([posts[code][1] for code in insights]) / followers,
        "saves": np.array([float(row["Saves"]) for row in insights.values()]) / followers,
        "shares": np.array([float(row["Shares"]) for row in insights.values()]) / followers,
    }
    appeal = {name: np.array([demo_scores(posts[code][2], [None] * len(posts[code][2]), name)["ground_truth_score"].mean()
                              for code in insights]) for name in ("vivid_bright", "caps", "beach")}
    rho = {(signal, name): spearmanr(per_follower[signal], appeal[name]).statistic
           for signal in per_follower for name in appeal}
    assert rho["likes", "vivid_bright"] > 0.8 and rho["saves", "caps"] > 0.8, rho
    assert rho["saves", "vivid_bright"] < 0.3 and rho["likes", "caps"] < 0.3, rho
    assert rho["shares", "beach"] > 0.5 and rho["shares", "beach"] > rho["shares", "caps"] + 0.3, rho
    reach = np.array([float(row["Reach"]) for row in insights.values()])
    assert spearmanr(reach, followers).statistic > 0.7  # the follower trend
    assert abs(spearmanr(reach / followers, appeal["vivid_bright"]).statistic) < 0.3  # not the picture


def test_the_insights_do_not_change_the_posts(tmp_path):
    """The insights draw from their own random stream: the images and likes are those a feed
    with other savers gets (and those written before the demo had insights)."""

    def digest(root):
        files = sorted(path for path in root.rglob("*") if path.is_file() and path.parent != root)
        return hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()

    write_demo_posts(tmp_path / "a", num_posts=12, saves_audience="caps")
    write_demo_posts(tmp_path / "b", num_posts=12, saves_audience="light_outfits", shares_audience="cool_outfits")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert (tmp_path / "a" / DEMO_INSIGHTS).read_text() != (tmp_path / "b" / DEMO_INSIGHTS).read_text()
    with pytest.raises(ValueError, match=r"unknown audience\(s\) \['savers'\]"):
        write_demo_posts(tmp_path / "c", num_posts=2, saves_audience="savers")


def test_ingest_joins_the_demo_insights_by_permalink(feed):
    result = ingest_posts(feed, insights=feed / DEMO_INSIGHTS)
    signals = result.signals_table().to_pandas()
    counts = signals.groupby("signal")["shortcode"].nunique().to_dict()
    assert {name: counts.get(name) for name in ("likes", "comments", "saves", "shares", "reach")} == dict.fromkeys(
        ("likes", "comments", "saves", "shares", "reach"), NUM_POSTS)
    assert not result.signal_issues


def test_the_engagements_hidden_function_follows_its_signals(feed):
    manifest = read_demo_manifest(feed)
    assert signal_audience_weights(manifest, {"likes": 1, "comments": 3}, None, False) == {"vivid_bright": 1.0}
    assert signal_audience_weights(manifest, {"saves": 1}, "reach", True) == {"caps": 1.0}
    mixed = signal_audience_weights(manifest, {"likes": 1, "saves": 2}, None, True)
    expected = DEMO_SIGNAL_RATES["saves"] * 2 / (DEMO_SIGNAL_RATES["likes"] + DEMO_SIGNAL_RATES["saves"] * 2)
    assert mixed["caps"] == pytest.approx(expected) and sum(mixed.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"no hidden function for \['views'\]"):
        signal_audience_weights(manifest, {"views": 1}, None, True)
    with pytest.raises(ValueError, match=r"no hidden function for \['impressions'\]"):
        signal_audience_weights(manifest, {"likes": 1}, "impressions", True)
    with pytest.raises(ValueError, match="not the demo feed's insights export"):
        signal_audience_weights(manifest, {"saves": 1}, None, False)
    # A feed written before the demo had insights: likes and comments follow its audience.
    old = {key: value for key, value in manifest.items() if key not in ("signals", "insights")}
    assert signal_audience_weights(old, {"likes": 1, "comments": 3}, None, False) == {"vivid_bright": 1.0}


def test_the_evaluate_stage_scores_with_the_trained_signals_function(feed):
    features = {"signals": {"saves": 1}, "per": None}
    truth, source = resolve_ground_truth("auto", str(feed), features, str(feed / DEMO_INSIGHTS))
    assert truth.audience == "caps" and source["used"] and source["engagement_follows"] == {"caps": 1.0}
    assert truth.signal_columns == {"likes": "appeal_vivid_bright", "saves": "appeal_caps", "shares": "appeal_beach"}
    # Someone else's insights table on the demo posts: the world cannot say what saves follow.
    truth, source = resolve_ground_truth("auto", str(feed), features, "data/other_insights.csv")
    assert truth is None and "not the demo feed's insights export" in source["reason"]
    with pytest.raises(SystemExit, match="evaluate.ground_truth is true but the demo world has no hidden function"):
        resolve_ground_truth(True, str(feed), {"signals": {"sentiment": 1}, "per": None}, None)


def test_demo_scores_mix_the_audiences_by_weight(feed):
    images = _posts(feed)[next(iter(_posts(feed)))][2]
    truth = DemoGroundTruth({"vivid_bright": 0.25, "caps": 0.75}, {"likes": "vivid_bright", "saves": "caps"})
    scores = truth.scores(images, [None] * len(images))
    for row, image in zip(scores.itertuples(), images):
        assert row.appeal_vivid_bright == world.audience_appeal(image, "vivid_bright")
        assert row.ground_truth_score == pytest.approx(0.25 * row.appeal_vivid_bright + 0.75 * row.appeal_caps)

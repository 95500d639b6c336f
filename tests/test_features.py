"""Engagement and time features: each normalisation, degenerate ranges, saved statistics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ec_lora_t.data.features import (
    DEGENERATE_LEVEL,
    FEATURES_SCHEMA,
    NORMALIZATIONS,
    EngagementTimeNormalizer,
    build_feature_table,
    signals_from_posts,
    total_engagement,
)
from stages import features as features_stage
from stages._common import ParamsError, validate_section
from stages.params.features import FeaturesParams

DAY = 86_400
T0 = 1_704_067_200  # 2024-01-01T00:00:00Z


def _times(*days):
    return pd.Series(pd.to_datetime([T0 + d * DAY for d in days], unit="s", utc=True))


def test_total_engagement_weights_comments():
    assert total_engagement([10, 0], [2, 5]).tolist() == [16.0, 15.0]
    assert total_engagement([10], [2], comment_weight=0.5).tolist() == [11.0]
    with pytest.raises(ValueError):
        total_engagement([-1], [0])


def test_minmax_matches_the_report_formula():
    normalizer = EngagementTimeNormalizer.fit([100, 200, 400], [0, 0, 0], _times(0, 10, 40))
    assert normalizer.normalize_engagement([100, 200, 400]).tolist() == [0.0, 1 / 3, 1.0]
    assert normalizer.days_since_earliest(_times(0, 10, 40)).tolist() == [0.0, 10.0, 40.0]
    assert normalizer.normalize_time(_times(0, 10, 40)).tolist() == [0.0, 0.25, 1.0]


def test_log_minmax_scales_log1p():
    normalizer = EngagementTimeNormalizer.fit([0, 9, 99], [0, 0, 0], _times(0, 1, 2), normalization="log_minmax")
    assert np.allclose(normalizer.normalize_engagement([0, 9, 99]), [0.0, 0.5, 1.0])


def test_rank_gives_mid_ranks_with_ties_and_interpolates_between():
    normalizer = EngagementTimeNormalizer.fit([10, 20, 20, 1000, 5], [0] * 5, _times(0, 1, 2, 3, 4), normalization="rank")
    # sorted: 5 (rank 0), 10 (1), 20 20 (2, 3 -> 2.5), 1000 (4); n - 1 = 4
    assert normalizer.normalize_engagement([5, 10, 20, 1000]).tolist() == [0.0, 0.25, 0.625, 1.0]
    assert normalizer.normalize_engagement([15]).tolist() == [pytest.approx(0.4375)]
    assert normalizer.normalize_engagement([0, 10**9]).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("normalization", ["minmax", "log_minmax", "rank"])
@pytest.mark.parametrize(
    "likes, comments, days",
    [([500], [7], [0]), ([50, 50, 50], [2, 2, 2], [0, 5, 9]), ([10, 20, 30], [0, 0, 0], [0, 0, 0])],
    ids=["one_post", "all_counts_equal", "all_on_one_day"],
)
def test_degenerate_ranges_give_the_documented_middle_level(normalization, likes, comments, days):
    normalizer = EngagementTimeNormalizer.fit(likes, comments, _times(*days), normalization=normalization)
    engagement = normalizer.normalize_engagement(total_engagement(likes, comments))
    time = normalizer.normalize_time(_times(*days))
    assert np.all(np.isfinite(engagement)) and np.all(np.isfinite(time))
    if len(set(zip(likes, comments))) == 1:
        assert normalizer.engagement_is_degenerate and np.all(engagement == DEGENERATE_LEVEL)
    if len(set(days)) == 1:
        assert normalizer.time_is_degenerate and np.all(time == DEGENERATE_LEVEL)
        assert normalizer.vector(likes=1, date="2030-01-01")[1] == DEGENERATE_LEVEL


def test_posts_hours_apart_count_as_one_day():
    times = pd.Series(pd.to_datetime([T0, T0 + 3600 * 20], unit="s", utc=True))
    assert EngagementTimeNormalizer.fit([1, 2], [0, 0], times).time_is_degenerate


@pytest.mark.parametrize("normalization", ["minmax", "log_minmax", "rank"])
def test_vector_from_saved_statistics_matches_the_table(tmp_path, normalization):
    likes, comments, days = [120, 5000, 800, 40], [3, 120, 10, 0], [0, 100, 200, 400]
    normalizer = EngagementTimeNormalizer.fit(likes, comments, _times(*days), normalization=normalization)
    normalizer.to_json(tmp_path / "normalization.json")
    loaded = EngagementTimeNormalizer.from_json(tmp_path / "normalization.json")
    assert loaded == normalizer
    date = (pd.Timestamp(T0, unit="s", tz="UTC") + pd.Timedelta(days=100)).strftime("%Y-%m-%d")
    vector = loaded.vector(likes=5000, comments=120, date=date)
    assert vector.dtype == np.float32 and vector.shape == (2,)
    assert vector[0] == pytest.approx(normalizer.normalize_engagement(total_engagement([5000], [120]))[0])
    assert vector[1] == pytest.approx(0.25)
    assert loaded.vector(likes=5000, comments=120)[1] == 1.0  # no date: the latest post


def test_vector_saturates_outside_the_training_range_unless_asked_not_to():
    normalizer = EngagementTimeNormalizer.fit([100, 200], [0, 0], _times(0, 10))
    assert normalizer.vector(likes=300, date="2030-01-01").tolist() == [1.0, 1.0]
    assert normalizer.vector(likes=0, date="2020-01-01").tolist() == [0.0, 0.0]
    assert normalizer.vector(likes=300, date=_times(20)[0], clip=False).tolist() == [2.0, 2.0]


def test_vector_reads_dates_like_the_ingest_does():
    normalizer = EngagementTimeNormalizer.fit([1, 2], [0, 0], _times(0, 10))
    day5 = T0 + 5 * DAY
    for date in ["2024-01-06", "2024-01-06T00:00:00Z", day5, day5 * 1000, pd.Timestamp(day5, unit="s")]:
        assert normalizer.vector(likes=1, date=date)[1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="date"):
        normalizer.vector(likes=1, date="sometime")


def test_unusable_statistics_file_names_itself(tmp_path):
    path = tmp_path / "normalization.json"
    path.write_text('{"format_version": 99}')
    with pytest.raises(ValueError, match=str(path)):
        EngagementTimeNormalizer.from_json(path)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 10**5), st.integers(0, 3000)), min_size=1, max_size=30),
    st.sampled_from(["minmax", "log_minmax", "rank"]),
)
def test_normalised_values_lie_in_unit_range_and_keep_the_order(posts, normalization):
    likes, comments, days = map(list, zip(*posts))
    normalizer = EngagementTimeNormalizer.fit(likes, comments, _times(*days), normalization=normalization)
    totals = total_engagement(likes, comments)
    engagement = normalizer.normalize_engagement(totals)
    time = normalizer.normalize_time(_times(*days))
    for values in (engagement, time):
        assert np.all((values >= 0) & (values <= 1))
    order = np.argsort(totals, kind="stable")
    assert np.all(np.diff(engagement[order]) >= 0)
    if not normalizer.engagement_is_degenerate:
        assert engagement[order[0]] == 0.0 and engagement[order[-1]] == 1.0


# --- the table and the stage ----------------------------------------------------------------


def _tables(num_posts=4):
    posts = pd.DataFrame(
        {
            "shortcode": [f"P{i}" for i in range(num_posts)] + ["P0"],  # P0 is a 2-image carousel
            "image_index": [0] * num_posts + [1],
            "image_path": [f"posts/P{i}/0.jpg" for i in range(num_posts)] + ["posts/P0/1.jpg"],
            "likes_count": [100 * (i + 1) for i in range(num_posts)] + [100],
            "comments_count": [i for i in range(num_posts)] + [0],
            "timestamp": pd.to_datetime([T0 + 30 * i * DAY for i in range(num_posts)] + [T0], unit="s", utc=True),
            "post_text": ["text"] * (num_posts + 1),
            "source_format": ["report"] * (num_posts + 1),
        }
    )
    captions = pd.DataFrame(
        {
            "image_path": posts["image_path"],
            "image_sha256": [f"{i:064x}" for i in range(num_posts + 1)],
            "caption": ["a person"] * (num_posts + 1),
            "season": ["winter"] * (num_posts + 1),
            "full_caption": ["(x style) a person (winter)"] * (num_posts + 1),
            "caption_source": ["post_text"] * (num_posts + 1),
        }
    )
    return posts, captions


def test_feature_table_has_the_documented_schema_and_fits_per_post():
    posts, captions = _tables()
    result = build_feature_table(posts, captions, comment_weight=3, normalization="rank")
    assert result.table.schema == FEATURES_SCHEMA
    frame = result.table.to_pandas()
    assert len(frame) == 5 and result.normalizer.num_posts == 4
    # Rank among 4 posts, not 5 images: the carousel's two rows share P0's level 0.
    assert np.allclose(sorted(frame["normalized_engagement"]), [0.0, 0.0, 1 / 3, 2 / 3, 1.0])
    assert frame["total_engagement"].tolist()[:2] == [100.0, 100.0]
    assert np.allclose(np.stack(frame["engagement_time"]), frame[["normalized_engagement", "normalized_time"]])
    assert frame["days_since_earliest_post"].max() == 90.0


def test_images_without_a_caption_are_left_out_and_counted():
    posts, captions = _tables()
    result = build_feature_table(posts, captions.iloc[1:], normalization="minmax")
    assert result.table.num_rows == 4 and result.metrics["images_without_caption"] == 1


def test_stage_writes_table_statistics_and_metrics(tmp_path, monkeypatch):
    posts, captions = _tables()
    posts.to_parquet(tmp_path / "posts.parquet")
    captions.to_parquet(tmp_path / "captions.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"features": {"signals": {"likes": 1, "comments": 3}, "per": None, "normalization": "log_minmax"}}))
    monkeypatch.chdir(tmp_path)
    features_stage.main(["--posts", "posts.parquet", "--captions", "captions.parquet", "--out", "out/train.parquet",
                         "--stats", "out/normalization.json", "--metrics", "metrics/features.json"])
    table = pq.read_table(tmp_path / "out/train.parquet")
    assert table.schema == FEATURES_SCHEMA
    normalizer = EngagementTimeNormalizer.from_json(tmp_path / "out/normalization.json")
    frame = table.to_pandas()
    recomputed = [normalizer.vector(likes=r.likes_count, comments=r.comments_count, date=r.timestamp) for r in frame.itertuples()]
    assert np.allclose(np.stack(recomputed), np.stack(frame["engagement_time"]), atol=1e-6)
    metrics = json.loads((tmp_path / "metrics/features.json").read_text())
    assert metrics == {"images": 5, "posts": 4, "images_without_caption": 0, "engagement_degenerate": False,
                       "time_degenerate": False, "span_days": pytest.approx(metrics["span_days"])}
    assert json.loads((tmp_path / "out/normalization.json").read_text())["normalization"] == "log_minmax"


def test_detrended_engagement_is_relative_to_the_time_trend():
    """Every post 2x the trend of an audience growing 10x over the span: all alike; one post
    4x its time's level stands out, whether it was early or late."""
    days = np.arange(0, 101, 10, dtype=float)
    trend = 100 * 10 ** (days / 100)
    likes = np.round(trend * 2).astype(int)
    likes[3] *= 2  # day 30
    dates = [pd.Timestamp("2024-01-01", tz="UTC") + pd.Timedelta(days=d) for d in days]
    normalizer = EngagementTimeNormalizer.fit(likes, np.zeros_like(likes), dates, normalization="detrended")
    normalized = normalizer.normalize_engagement(likes, dates=dates)
    assert normalized.argmax() == 3 and normalized[3] == pytest.approx(1.0)
    others = np.delete(normalized, 3)
    assert np.ptp(others) < 0.1  # the growth itself is gone
    # the same raw likes mean less later, when the audience is larger
    early, late = (normalizer.vector(likes=2000, date=d)[0] for d in ("2024-01-11", "2024-04-01"))
    assert early > late
    with pytest.raises(ValueError, match="give its dates"):
        normalizer.normalize_engagement(likes)
    restored = EngagementTimeNormalizer.from_dict(normalizer.to_dict())
    assert restored == normalizer


def test_a_detrended_query_warns_only_outside_the_range_at_its_date():
    """The range a detrended query is checked against moves with the trend: a training post's
    own numbers at its own date are inside it; ten times the best post's, at any date, are not."""
    days = np.arange(0, 101, 10, dtype=float)
    likes = np.round(100 * 10 ** (days / 100) * (1 + 0.3 * np.sin(days))).astype(int)
    dates = [pd.Timestamp("2024-01-01", tz="UTC") + pd.Timedelta(days=d) for d in days]
    normalizer = EngagementTimeNormalizer.fit(likes, np.zeros_like(likes), dates, normalization="detrended")
    for index in (0, 5, 10):
        inside = normalizer.query(likes=int(likes[index]), date=dates[index])
        assert inside.warnings == () and 0 <= inside.vector[0] <= 1
        assert inside.vector[0] == pytest.approx(normalizer.normalize_engagement(
            likes[index : index + 1], dates=dates[index : index + 1])[0], abs=1e-6)
    outside = normalizer.query(likes=int(10 * likes.max()), date=dates[5])
    assert outside.unclipped[0] > 1 and outside.vector[0] == 1.0
    assert len(outside.warnings) == 1 and "above the training posts' range" in outside.warnings[0]


# --- engagement from named signals --------------------------------------------------------------


def _signal_rows(values: dict[str, dict[str, float]]) -> pd.DataFrame:
    """A signals table from {shortcode: {signal: value}}."""
    return pd.DataFrame([{"shortcode": code, "signal": name, "value": float(value), "source": "test"}
                         for code, signals in values.items() for name, value in signals.items()])


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_the_default_signals_give_the_report_formula_bit_for_bit(normalization):
    """{likes: 1, comments: 3} over the signals table is today's likes + 3 x comments: the same
    float64 totals (compared exactly, computed here without the library) and the same vectors."""
    rng = np.random.default_rng(0)
    posts, captions = _tables(num_posts=40)
    posts["likes_count"] = rng.integers(0, 10**6, len(posts))
    posts["comments_count"] = rng.integers(0, 10**4, len(posts))
    posts.loc[len(posts) - 1, ["likes_count", "comments_count"]] = posts.loc[0, ["likes_count", "comments_count"]].values
    posts["timestamp"] = pd.to_datetime(T0 + rng.integers(0, 400 * DAY, len(posts)), unit="s", utc=True)
    posts.loc[len(posts) - 1, "timestamp"] = posts.loc[0, "timestamp"]  # the carousel's second image
    legacy = build_feature_table(posts, captions, comment_weight=3, normalization=normalization)
    named = build_feature_table(posts, captions, normalization=normalization, signals=signals_from_posts(posts),
                                weights={"likes": 1, "comments": 3}, per=None)
    frame = named.table.to_pandas()
    by_hand = frame["likes_count"].to_numpy(np.float64) + 3 * frame["comments_count"].to_numpy(np.float64)
    assert np.array_equal(frame["total_engagement"].to_numpy(), by_hand)
    assert named.table.equals(legacy.table)
    assert named.normalizer.to_dict()["engagement"] == legacy.normalizer.to_dict()["engagement"]
    assert "posts_left_out" not in named.metrics and named.left_out.num_rows == 0


def test_engagement_rate_per_reach_leaves_out_and_reports_posts_without_a_signal_or_reach():
    posts, captions = _tables(num_posts=6)
    signals = signals_from_posts(posts)
    extra = _signal_rows({"P0": {"saves": 10, "reach": 100}, "P1": {"saves": 5, "reach": 1000},
                          "P2": {"reach": 50},  # no saves
                          "P3": {"saves": 1, "reach": 0},  # reach 0: no rate
                          "P4": {"saves": 8, "reach": 1000}, "P5": {"saves": 2, "reach": 3000}})
    result = build_feature_table(posts, captions, normalization="minmax", signals=pd.concat([signals, extra]),
                                 weights={"likes": 1, "saves": 2}, per="reach")
    frame = result.table.to_pandas().drop_duplicates("shortcode").set_index("shortcode")
    assert sorted(frame.index) == ["P0", "P1", "P4", "P5"]
    likes = {f"P{i}": 100 * (i + 1) for i in range(6)}
    assert frame.loc["P0", "total_engagement"] == pytest.approx((likes["P0"] + 2 * 10) / 100)
    assert frame.loc["P4", "total_engagement"] == pytest.approx((likes["P4"] + 2 * 8) / 1000)
    # the best rate is the post that reached fewest, not the one with most likes
    assert frame["normalized_engagement"].idxmax() == "P0" and frame["likes_count"].idxmax() == "P5"
    left_out = result.left_out.to_pandas().set_index("shortcode")
    assert left_out.loc["P2", "reason"] == "missing_signal" and "saves" in left_out.loc["P2", "detail"]
    assert left_out.loc["P3", "reason"] == "zero_denominator" and "reach is 0" in left_out.loc["P3", "detail"]
    assert result.metrics["posts_left_out"] == {"missing_signal": 1, "zero_denominator": 1}
    assert result.metrics["posts"] == 4 and result.metrics["images"] == 5  # P0's carousel keeps both images
    assert result.normalizer.formula == "(likes + 2 x saves) / reach"


def test_a_signal_in_no_post_or_twice_for_one_post_is_an_error():
    posts, captions = _tables()
    with pytest.raises(ValueError, match=r"signal\(s\) \['save'\] are in no post; the signals found are \['comments', 'likes'\]"):
        build_feature_table(posts, captions, signals=signals_from_posts(posts), weights={"save": 1})
    doubled = pd.concat([signals_from_posts(posts), _signal_rows({"P1": {"likes": 3}})])
    with pytest.raises(ValueError, match="post P1 has signal 'likes' more than once"):
        build_feature_table(posts, captions, signals=doubled, weights={"likes": 1})


def test_sentiment_may_be_negative_but_log_normalisations_need_totals_above_minus_one():
    posts, captions = _tables()
    sentiment = _signal_rows({f"P{i}": {"sentiment": s} for i, s in enumerate([-0.9, -0.2, 0.4, 0.8])})
    signals = pd.concat([signals_from_posts(posts), sentiment])
    result = build_feature_table(posts, captions, normalization="minmax", signals=signals, weights={"sentiment": 1})
    frame = result.table.to_pandas().drop_duplicates("shortcode").set_index("shortcode")
    assert frame.loc["P0", "normalized_engagement"] == 0 and frame.loc["P3", "normalized_engagement"] == 1
    with pytest.raises(ValueError, match="log1p"):
        build_feature_table(posts, captions, normalization="log_minmax", signals=signals, weights={"sentiment": 2})


def test_a_rate_normalizer_round_trips_and_queries_need_every_signal(tmp_path):
    days = [0, 10, 20, 30]
    normalizer = EngagementTimeNormalizer.fit_signals(
        {"saves": [1, 5, 9, 20], "reach": [100, 100, 300, 200]}, _times(*days), {"saves": 1.0}, per="reach",
        normalization="detrended")
    normalizer.to_json(tmp_path / "n.json")
    loaded = EngagementTimeNormalizer.from_json(tmp_path / "n.json")
    assert loaded == normalizer and loaded.formula == "saves / reach"
    date = _times(20)[0]
    assert loaded.vector(signals={"saves": 9, "reach": 300}, date=date)[0] == pytest.approx(
        normalizer.normalize_engagement([9 / 300], dates=[date])[0], abs=1e-6)
    with pytest.raises(ValueError, match="the engagement is saves / reach: give saves, reach too"):
        loaded.vector(likes=100, date=date)
    query = loaded.query(signals={"saves": 90, "reach": 100}, date=date)
    assert query.vector[0] == 1.0 and "saves / reach: saves 90, reach 100" in query.warnings[0]
    assert query.metadata()["raw_saves"] == 90 and query.metadata()["raw_reach"] == 100


def test_statistics_of_format_1_still_load_as_likes_plus_weighted_comments():
    normalizer = EngagementTimeNormalizer.fit([100, 200, 400], [1, 2, 3], _times(0, 10, 40), comment_weight=2)
    old = normalizer.to_dict()
    old["format_version"] = 1
    old["comment_weight"] = 2.0
    for key in ("signals", "per", "formula"):
        del old[key]
    loaded = EngagementTimeNormalizer.from_dict(old)
    assert loaded == normalizer and loaded.comment_weight == 2.0


def test_params_take_signals_and_per_and_name_the_old_comment_weight_key():
    params = validate_section(FeaturesParams, "features",
                              {"signals": {"likes": 1, "saves": 2}, "per": "reach", "normalization": "rank"})
    assert params.signals == {"likes": 1.0, "saves": 2.0} and params.per == "reach"
    with pytest.raises(ParamsError, match=r"features: comment_weight = 3 was replaced by signals: write "
                                          r"`signals: \{likes: 1, comments: 3\}`"):
        validate_section(FeaturesParams, "features", {"comment_weight": 3, "normalization": "minmax"})
    for bad, message in (({"signals": {"likes": 1}, "per": "likes"}, "per = 'likes'"),
                         ({"signals": {"reach": 1}, "per": "reach"}, "also a weighted signal"),
                         ({"signals": {"likes": 0}}, "at least one weight must be > 0"),
                         ({"signals": {"Likes": 1}}, "Likes"),
                         ({"signals": {}}, "signals")):
        with pytest.raises(ParamsError, match=message):
            validate_section(FeaturesParams, "features", {"normalization": "minmax", **bad})


def test_stage_reads_signal_tables_and_writes_the_posts_left_out(tmp_path, monkeypatch):
    posts, captions = _tables()
    posts.to_parquet(tmp_path / "posts.parquet")
    captions.to_parquet(tmp_path / "captions.parquet")
    signals_from_posts(posts).to_parquet(tmp_path / "ingest_signals.parquet")
    _signal_rows({"P0": {"sentiment": 0.5}, "P1": {"sentiment": -0.5}, "P2": {"sentiment": 0.1}}).to_parquet(
        tmp_path / "sentiment.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"features": {"signals": {"likes": 1, "sentiment": 100}, "per": None, "normalization": "minmax"}}))
    monkeypatch.chdir(tmp_path)
    features_stage.main(["--posts", "posts.parquet", "--captions", "captions.parquet",
                         "--signals", "ingest_signals.parquet", "--signals", "sentiment.parquet",
                         "--out", "out/train.parquet", "--stats", "out/normalization.json",
                         "--left-out", "out/left_out.parquet", "--metrics", "metrics/features.json"])
    frame = pq.read_table(tmp_path / "out/train.parquet").to_pandas()
    assert sorted(set(frame["shortcode"])) == ["P0", "P1", "P2"]
    assert frame.set_index("shortcode").loc["P1", "total_engagement"] == 200 - 50
    left_out = pq.read_table(tmp_path / "out/left_out.parquet").to_pylist()
    assert left_out == [{"shortcode": "P3", "reason": "missing_signal", "detail": "no sentiment for this post"}]
    metrics = json.loads((tmp_path / "metrics/features.json").read_text())
    assert metrics["posts_left_out"] == {"missing_signal": 1, "zero_denominator": 0}
    assert json.loads((tmp_path / "out/normalization.json").read_text())["signals"] == {"likes": 1.0, "sentiment": 100.0}


def test_params_per_choices_are_the_librarys_denominators():
    from typing import get_args

    from ec_lora_t.data.features import DENOMINATORS

    literal, _ = get_args(FeaturesParams.model_fields["per"].annotation)
    assert set(get_args(literal)) == set(DENOMINATORS)

"""Ingest's signals: an insights table joined by shortcode / permalink / post id, and comment texts."""

from __future__ import annotations

import base64
import json
import lzma

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from _posts import InstaloaderPostSpec, make_instaloader_profile, make_report_feed, write_metadata_csv

from ec_lora_t.data.ingest import (
    COMMENTS_SCHEMA,
    SIGNAL_ISSUES_SCHEMA,
    SIGNALS_SCHEMA,
    IngestError,
    ingest_posts,
    mediaid_to_shortcode,
    read_insights,
)
from stages import ingest as ingest_stage


def _shortcode_to_mediaid(shortcode: str) -> int:
    """instaloader's Post.shortcode_to_mediaid, written out independently of the code under test."""
    padded = "A" * (12 - len(shortcode)) + shortcode
    return int.from_bytes(base64.b64decode(padded.encode(), b"-_"), "big")


def _signals(result) -> dict[tuple[str, str], float]:
    return {(r.shortcode, r.signal): r.value for r in result.signals}


def _feed_with_ids(root):
    """Six report posts; Post0001's metadata.csv also has the Graph API id an export uses."""
    feed = make_report_feed(root, num_posts=6)
    write_metadata_csv(root / "Post0001", [{"shortcode": "Post0001", "likes_count": 137, "comments_count": 4,
                                             "timestamp": 1_704_672_000, "post_id": "17900000000000001"}])
    return feed


INSIGHTS_CSV = (
    # header as Meta Business Suite writes it: mixed case, spaces, extra columns
    "Post ID,Permalink,Publish time,Description,Reach,Likes,Saves,Shares,Profile visits,Account ID\n"
    # line 2: by permalink (a reel link); likes differ from the export's and win
    ",https://www.instagram.com/reel/Post0000/,2024-01-01,first,1000,150,12,3,7,99\n"
    # line 3: by the post id metadata.csv gave
    "17900000000000001,,2024-01-08,second,800,137,\"1,024\",1,2,99\n"
    # line 4: by the media id a shortcode encodes, with the private API's _owner suffix
    f"{_shortcode_to_mediaid('Post0002')}_42,,2024-01-15,third,0,180,5,0,1,99\n"
    # line 5: a non-numeric cell (saves): that value stays absent, the rest is used
    ",https://www.instagram.com/p/Post0003/,2024-01-22,fourth,900,210,n/a,2,3,99\n"
    # line 6: the same post again
    ",https://www.instagram.com/p/Post0003/,2024-01-22,again,901,211,9,2,3,99\n"
    # line 7: a post that was not ingested
    ",https://www.instagram.com/p/Elsewhere/,2024-01-29,gone,10,1,1,1,1,99\n"
)


def test_insights_rows_join_by_permalink_post_id_and_media_id_and_report_every_problem(tmp_path):
    _feed_with_ids(tmp_path / "posts")
    insights = tmp_path / "insights.csv"
    insights.write_text(INSIGHTS_CSV)
    result = ingest_posts(tmp_path / "posts", insights=insights)
    signals = _signals(result)

    assert signals[("Post0000", "likes")] == 150  # the table's figure wins over the export's 100
    assert (signals[("Post0000", "reach")], signals[("Post0000", "saves")], signals[("Post0000", "shares")]) == (1000, 12, 3)
    assert signals[("Post0001", "saves")] == 1024  # thousands separator
    assert signals[("Post0002", "reach")] == 0  # a 0 stays a 0 (features leaves it out as a rate's denominator)
    assert ("Post0003", "saves") not in signals and signals[("Post0003", "reach")] == 900  # first row kept
    assert signals[("Post0000", "profile_visits")] == 7  # any numeric column is a signal
    assert not any(name in ("account_id", "publish_time", "description") for _, name in signals)
    # posts without a row keep the export's likes and comments, and have nothing else
    assert {name for code, name in signals if code == "Post0004"} == {"likes", "comments"}
    sources = {(r.shortcode, r.signal): r.source for r in result.signals}
    assert sources[("Post0000", "saves")] == f"{insights}:2"

    issues = {(i.location, i.reason): i for i in result.signal_issues}
    assert (f"{insights}:5", "non_numeric") in issues and "'n/a'" in issues[(f"{insights}:5", "non_numeric")].detail
    assert issues[(f"{insights}:6", "duplicate_key")].shortcode == "Post0003"
    assert "Elsewhere" in issues[(f"{insights}:7", "unmatched_row")].detail
    without_row = sorted(i.shortcode for i in result.signal_issues if i.reason == "no_insights_row")
    assert without_row == ["Post0004", "Post0005"]
    metrics = result.metrics()["insights"]
    assert metrics["rows"] == 6 and metrics["posts_matched"] == 4
    assert metrics["issues_by_reason"]["unmatched_row"] == 1 and metrics["posts_by_signal"]["saves"] == 3
    assert result.signals_table().schema == SIGNALS_SCHEMA
    assert result.signal_issues_table().schema == SIGNAL_ISSUES_SCHEMA


def test_insights_as_parquet_with_other_header_spellings(tmp_path):
    make_report_feed(tmp_path / "posts", num_posts=3)
    frame = pd.DataFrame({"SHORTCODE": ["Post0000", "Post0001", "Post0009"], "accounts_reached": [10, 20, 30],
                          "Video-Plays": [5.0, None, 7.0], "Impressions": ["1 200", "30", "x"]})
    frame.to_parquet(tmp_path / "insights.parquet")
    result = ingest_posts(tmp_path / "posts", insights=tmp_path / "insights.parquet")
    signals = _signals(result)
    assert signals[("Post0000", "reach")] == 10 and signals[("Post0000", "views")] == 5
    assert signals[("Post0000", "impressions")] == 1200
    assert ("Post0001", "views") not in signals  # an empty cell is absent, not 0
    reasons = {(i.location, i.reason) for i in result.signal_issues}
    assert (f"{tmp_path / 'insights.parquet'}:row 3", "unmatched_row") in reasons
    assert (f"{tmp_path / 'insights.parquet'}:row 3", "non_numeric") in reasons


def test_insights_table_without_a_key_column_or_missing_is_a_clear_error(tmp_path):
    make_report_feed(tmp_path / "posts", num_posts=3)
    (tmp_path / "nokey.csv").write_text("Reach,Likes\n1,2\n")
    with pytest.raises(IngestError, match="no key column.*Shortcode, Permalink or Post ID"):
        ingest_posts(tmp_path / "posts", insights=tmp_path / "nokey.csv")
    with pytest.raises(IngestError, match="does not exist"):
        ingest_posts(tmp_path / "posts", insights=tmp_path / "absent.csv")


def test_semicolon_and_utf16_exports_are_read(tmp_path):
    (tmp_path / "a.csv").write_text("Shortcode;Saves\nPost0000;4\n")
    (tmp_path / "b.csv").write_bytes("Shortcode\tSaves\nPost0000\t4\n".encode("utf-16"))
    for name in ("a.csv", "b.csv"):
        table = read_insights(tmp_path / name)
        assert table.signals == ["saves"] and table.rows[0].values == {"saves": 4.0}


def test_mediaid_to_shortcode_inverts_the_shortcode_encoding():
    for shortcode in ("Post0002", "CzX1_-aBcDe", "B"):
        assert mediaid_to_shortcode(_shortcode_to_mediaid(shortcode)) == shortcode


def test_without_insights_the_signals_are_the_exports_likes_and_comments_and_metrics_unchanged(tmp_path):
    make_report_feed(tmp_path / "posts", num_posts=3)
    result = ingest_posts(tmp_path / "posts")
    assert _signals(result) == {(f"Post{i:04d}", name): float(value) for i in range(3)
                                for name, value in (("likes", 100 + 37 * i), ("comments", 3 + i))}
    metrics = result.metrics()
    assert "insights" not in metrics and "comment_texts" not in metrics
    assert result.signal_issues == [] and result.comments_table().num_rows == 0


# --- comments' texts --------------------------------------------------------------------------


def test_instaloader_comments_json_gives_comment_texts_with_replies(tmp_path):
    profile = make_instaloader_profile(tmp_path / "dl", "someone", [
        InstaloaderPostSpec("Talk01", taken_at=1_714_560_000), InstaloaderPostSpec("Quiet01", taken_at=1_714_600_000),
        InstaloaderPostSpec("Broken01", taken_at=1_714_700_000)])
    stems = {json.loads(lzma.open(p).read())["node"]["shortcode"]: p.name.removesuffix(".json.xz")
             for p in profile.glob("*.json.xz")}
    # what instaloader --comments writes next to the post
    (profile / f"{stems['Talk01']}_comments.json").write_text(json.dumps([
        {"id": 1, "created_at": 1_714_560_100, "text": "love this!", "owner": {"username": "a"}, "likes_count": 2,
         "answers": [{"id": 2, "created_at": 1_714_560_200, "text": "me too", "owner": {"username": "b"}}]},
        {"id": 3, "created_at": 1_714_560_300, "text": "  ", "owner": {"username": "c"}, "answers": []},
    ]))
    (profile / f"{stems['Broken01']}_comments.json").write_text("{not json")
    result = ingest_posts(tmp_path / "dl")
    assert result.comments == [("Talk01", 0, "love this!"), ("Talk01", 1, "me too")]
    assert result.comments_table().schema == COMMENTS_SCHEMA
    issue, = result.signal_issues
    assert (issue.shortcode, issue.reason) == ("Broken01", "malformed_comments") and "_comments.json" in issue.location
    assert result.metrics()["ignored_files"] == 3  # the three caption .txt files; comments are read, not ignored
    assert result.metrics()["comment_texts"] == {"comments": 2, "posts": 1}


def test_report_comments_csv_is_read_not_offered_as_an_image(tmp_path):
    make_report_feed(tmp_path / "posts", num_posts=3)
    (tmp_path / "posts/Post0001/comments.csv").write_text("author,Text\nx,great fit\ny,\nz,not for me\n")
    result = ingest_posts(tmp_path / "posts")
    assert result.comments == [("Post0001", 0, "great fit"), ("Post0001", 1, "not for me")]
    assert result.rejects == []


# --- the stage ---------------------------------------------------------------------------------


def test_stage_writes_signals_comments_and_issues(tmp_path, monkeypatch, capsys):
    _feed_with_ids(tmp_path / "posts")
    (tmp_path / "posts/insights.csv").write_text(INSIGHTS_CSV)
    section = {"posts_dir": "posts", "format": "auto", "videos": "thumbnail", "max_image_pixels": 89478485,
               "insights": "posts/insights.csv"}
    regressor = {"protocol": "grouped_kfold", "folds": 2, "alphas": [1.0], "seed": 42}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"ingest": section, "regressor": regressor}))
    monkeypatch.chdir(tmp_path)
    ingest_stage.main(["--out-table", "out/posts.parquet", "--out-rejects", "out/rejects.parquet",
                       "--out-signals", "out/signals.parquet", "--out-comments", "out/comments.parquet",
                       "--out-signal-issues", "out/signal_issues.parquet", "--metrics", "metrics/ingest.json"])
    signals = pq.read_table(tmp_path / "out/signals.parquet").to_pandas()
    assert signals.set_index(["shortcode", "signal"]).loc[("Post0000", "saves"), "value"] == 12
    issues = pq.read_table(tmp_path / "out/signal_issues.parquet").to_pandas()
    assert set(issues["reason"]) == {"non_numeric", "duplicate_key", "unmatched_row", "no_insights_row"}
    assert pq.read_table(tmp_path / "out/comments.parquet").num_rows == 0
    metrics = json.loads((tmp_path / "metrics/ingest.json").read_text())
    assert metrics["insights"]["posts_matched"] == 4
    err = capsys.readouterr().err
    assert f"posts/insights.csv:7: unmatched_row" in err and "outside" not in err

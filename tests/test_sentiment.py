"""Comment sentiment: a tiny text classifier built from a config, loaded through from_pretrained."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from ec_lora_t.data.schemas import SIGNALS_SCHEMA
from ec_lora_t.data.sentiment import (
    SentimentCache,
    SentimentClassifier,
    build_sentiment,
    label_signs,
    post_sentiment,
    sentiment_cache_key,
)
from stages import sentiment as sentiment_stage

WORDS = ["love", "great", "fit", "not", "for", "me", "bad", "this"]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A 2-layer BERT sentiment head with a WordLevel tokenizer, saved as a model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-sentiment")
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=32, num_labels=3,
                        id2label={0: "negative", 1: "neutral", 2: "positive"},
                        label2id={"negative": 0, "neutral": 1, "positive": 2})
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    return folder


def _comments(rows):
    return pd.DataFrame(rows, columns=["shortcode", "comment_index", "text"])


COMMENTS = _comments([("A", 0, "love this"), ("A", 1, "great fit"), ("B", 0, "not for me"),
                      ("C", 0, "love this")])  # C repeats A's text: scored once


def test_label_signs_read_positive_and_negative_by_name():
    assert label_signs({0: "NEGATIVE", 1: "POSITIVE"}).tolist() == [-1, 1]
    assert label_signs({0: "negative", 1: "neutral", 2: "positive"}).tolist() == [-1, 0, 1]
    assert label_signs({0: "LABEL_0", 1: "LABEL_1"}).tolist() == [-1, 1]
    with pytest.raises(ValueError, match="cannot tell the positive and negative classes"):
        label_signs({0: "1 star", 1: "3 stars", 2: "5 stars"})


def test_scores_are_p_positive_minus_p_negative_of_the_model_loaded_from_its_folder(tiny_classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    classifier = SentimentClassifier.from_pretrained(str(tiny_classifier), max_length=16, device="cpu")
    scores = classifier(["love this", "not for me"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    with torch.no_grad():
        probabilities = model(**tokenizer(["love this", "not for me"], padding=True, return_tensors="pt")).logits.softmax(-1)
    expected = (probabilities[:, 2] - probabilities[:, 0]).numpy()
    assert np.allclose(scores, expected, atol=1e-6)
    assert scores[0] != scores[1] and all(-1 <= s <= 1 for s in scores)


def test_post_sentiment_is_the_mean_over_comments_and_cached_by_text(tiny_classifier, tmp_path):
    result = build_sentiment(COMMENTS, str(tiny_classifier), tmp_path / "cache", batch_size=2, max_length=16)
    assert result.table.schema == SIGNALS_SCHEMA and result.scored_now == 3  # distinct texts
    values = dict(zip(result.table.column("shortcode").to_pylist(), result.table.column("value").to_pylist()))
    classifier = SentimentClassifier.from_pretrained(str(tiny_classifier), max_length=16, device="cpu")
    love, great, not_for_me = classifier(["love this", "great fit", "not for me"])
    assert values == pytest.approx({"A": (love + great) / 2, "B": not_for_me, "C": love}, abs=1e-6)
    assert set(result.table.column("signal").to_pylist()) == {"sentiment"}
    assert result.metrics["posts_scored"] == 3 and result.metrics["comments"] == 4

    # A rerun with one new comment scores only that one; the model is built only because of it.
    cache = SentimentCache(tmp_path / "cache", sentiment_cache_key(str(tiny_classifier), 16))
    built = []

    def factory():
        built.append(1)
        return lambda texts: [0.25 for _ in texts]

    more = pd.concat([COMMENTS, _comments([("D", 0, "bad")])], ignore_index=True)
    rerun = post_sentiment(more, factory, cache, source="test")
    assert rerun.scored_now == 1 and built == [1]
    assert dict(zip(rerun.table.column("shortcode").to_pylist(), rerun.table.column("value").to_pylist()))["D"] == 0.25
    cached_only = post_sentiment(more, lambda: pytest.fail("the model must not be loaded"), cache, source="test")
    assert cached_only.scored_now == 0
    # another truncation length is another cache
    assert sentiment_cache_key(str(tiny_classifier), 16) != sentiment_cache_key(str(tiny_classifier), 32)


def _params(tmp_path, model):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"sentiment": {"model": model, "batch_size": 4, "max_length": 16}}))


def _run(tmp_path):
    sentiment_stage.main(["--comments", "comments.parquet", "--out", "out/signals.parquet", "--cache", "cache",
                          "--metrics", "metrics/sentiment.json", "--run-info", "run_info.json"])


def test_stage_is_off_by_default_and_scores_when_a_model_is_set(tiny_classifier, tmp_path, monkeypatch):
    COMMENTS.to_parquet(tmp_path / "comments.parquet")
    monkeypatch.chdir(tmp_path)
    _params(tmp_path, None)
    _run(tmp_path)
    assert pq.read_table(tmp_path / "out/signals.parquet").num_rows == 0
    assert json.loads((tmp_path / "metrics/sentiment.json").read_text()) == {"enabled": False, "comments": 4}
    assert not (tmp_path / "cache").exists()

    _params(tmp_path, str(tiny_classifier))
    _run(tmp_path)
    table = pq.read_table(tmp_path / "out/signals.parquet")
    assert table.schema == SIGNALS_SCHEMA and sorted(table.column("shortcode").to_pylist()) == ["A", "B", "C"]
    metrics = json.loads((tmp_path / "metrics/sentiment.json").read_text())
    assert metrics["enabled"] is True and metrics["posts_scored"] == 3
    assert json.loads((tmp_path / "run_info.json").read_text())["scored_now"] == 3

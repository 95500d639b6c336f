"""Comment sentiment: a per-post signal from a transformers text-classification model.

Each comment's score is P(positive) - P(negative) under the model (in [-1, 1]; a neutral
class counts 0); a post's ``sentiment`` is the mean over its comments (replies included).
Which class is positive and which negative is read from the model's ``id2label`` by name
(``POSITIVE``/``negative``/``LABEL_2``... see :func:`label_signs`).

The model is loaded with ``from_pretrained`` from a hub id or a local folder, and only when a
comment's score is not cached: scores are cached by the comment's text (SHA-256) per model
(its id or folder, with its weight files' sizes and times) and ``max_length``, like captions
by image content, so adding posts scores only the new comments. A post without comment
texts gets no sentiment row (the features stage then reports it, never counts it as 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa

from ec_lora_t.data.content_keys import ContentCache, model_files_key, text_sha256
from ec_lora_t.data.schemas import SIGNALS_SCHEMA
from ec_lora_t.hub import resolve_pretrained
from ec_lora_t.progress import progress_bar

SENTIMENT_SIGNAL = "sentiment"


class CommentScorer(Protocol):
    """Anything that turns a batch of comment texts into one score in [-1, 1] each."""

    def __call__(self, texts: Sequence[str]) -> list[float]: ...


def label_signs(id2label: Mapping[int, str]) -> np.ndarray:
    """+1 for the positive class, -1 for the negative one, 0 for any other, by class index.

    Labels are read by name (``positive``, ``POSITIVE``, ``pos``; ``negative``, ``neg``); a
    two-class model whose labels say nothing (``LABEL_0``, ``LABEL_1``) is read as
    (negative, positive), the order of SST-2 and of most binary sentiment heads.
    """
    names = {int(index): str(label).lower() for index, label in id2label.items()}
    signs = np.zeros(len(names))
    for index, name in names.items():
        if name.startswith("pos"):
            signs[index] = 1.0
        elif name.startswith("neg"):
            signs[index] = -1.0
    if (signs == 1).sum() == 1 and (signs == -1).sum() == 1:
        return signs
    if len(names) == 2 and not signs.any():
        return np.array([-1.0, 1.0])
    raise ValueError(f"cannot tell the positive and negative classes from the model's labels {dict(id2label)}: "
                     "use a sentiment model whose id2label names them")


class SentimentClassifier:
    """A ``AutoModelForSequenceClassification`` and its tokenizer, scoring texts by P(pos) - P(neg)."""

    def __init__(self, model: Any, tokenizer: Any, device: str, max_length: int):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_length = max_length
        self.signs = label_signs(model.config.id2label)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, max_length: int = 128, device: str | None = None) -> SentimentClassifier:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        model = AutoModelForSequenceClassification.from_pretrained(str(name_or_path))
        model.to(device).eval()
        return cls(model, tokenizer, device, max_length)

    def __call__(self, texts: Sequence[str]) -> list[float]:
        import torch

        inputs = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        with torch.inference_mode():
            probabilities = self.model(**inputs).logits.float().softmax(dim=-1).cpu().numpy()
        return (probabilities @ self.signs).astype(float).tolist()


def sentiment_cache_key(name_or_path: str | Path, max_length: int) -> str:
    """What makes two scores of one text interchangeable: the model and the truncation length."""
    return model_files_key(name_or_path, max_length=int(max_length))


class SentimentCache(ContentCache):
    """Scores by comment text SHA-256 for one model key, in ``<cache_dir>/sentiment-<key>.jsonl``."""

    prefix, field = "sentiment", "score"
    convert = staticmethod(float)


@dataclass
class SentimentResult:
    table: pa.Table  # SIGNALS_SCHEMA: one `sentiment` row per post with comment texts
    metrics: dict[str, Any]
    scored_now: int  # distinct texts the model scored in this run (the rest came from the cache)


def post_sentiment(
    comments: pd.DataFrame,
    scorer_factory: Callable[[], CommentScorer],
    cache: SentimentCache,
    source: str,
    batch_size: int = 32,
    progress: bool | None = None,
) -> SentimentResult:
    """Mean comment score per post, scoring only texts not in the cache (the model is built only then).

    `comments`: ``shortcode, comment_index, text`` (COMMENTS_SCHEMA); `source` names the model
    in the signals table's ``source`` column.
    """
    texts_by_sha = {text_sha256(text): text for text in comments["text"]}
    missing = [(sha, text) for sha, text in texts_by_sha.items() if sha not in cache]
    if missing:
        scorer = scorer_factory()
        with progress_bar(total=len(missing), desc="sentiment", unit="comment", enabled=progress) as bar:
            for start in range(0, len(missing), batch_size):
                batch = missing[start : start + batch_size]
                scores = scorer([text for _, text in batch])
                if len(scores) != len(batch):
                    raise RuntimeError(f"scorer returned {len(scores)} scores for {len(batch)} comments")
                cache.add({sha: float(score) for (sha, _), score in zip(batch, scores)})
                bar.update(len(batch))
    scored = comments.assign(score=[cache.get(text_sha256(text)) for text in comments["text"]])
    per_post = scored.groupby("shortcode", sort=True)["score"].mean()
    table = pa.Table.from_pydict(
        {"shortcode": per_post.index.tolist(), "signal": [SENTIMENT_SIGNAL] * len(per_post),
         "value": per_post.astype(np.float64).tolist(), "source": [source] * len(per_post)},
        schema=SIGNALS_SCHEMA,
    )
    metrics = {
        "posts_scored": len(per_post),
        "comments": len(comments),
        "mean_sentiment": float(per_post.mean()) if len(per_post) else None,
    }
    return SentimentResult(table=table, metrics=metrics, scored_now=len(missing))


def empty_signals() -> pa.Table:
    """The signals table with no row: what the stage writes when sentiment is off."""
    return SIGNALS_SCHEMA.empty_table()


def build_sentiment(
    comments: pd.DataFrame, model: str, cache_dir: str | Path, batch_size: int = 32, max_length: int = 128,
    progress: bool | None = None,
) -> SentimentResult:
    """`post_sentiment` with the model `model` (hub id or local folder; the hub is asked only
    when a text is not cached, and fails within seconds when unreachable)."""
    cache = SentimentCache(cache_dir, sentiment_cache_key(model, max_length))
    return post_sentiment(
        comments,
        lambda: SentimentClassifier.from_pretrained(resolve_pretrained(model, what="sentiment.model"), max_length),
        cache, source=f"sentiment:{model}", batch_size=batch_size, progress=progress,
    )

"""Stage `sentiment`: a per-post comment-sentiment signal, when `sentiment.model` is set.

Reads the comments' texts ingest found; writes a signals table (one `sentiment` row per post
with comments) that the features stage reads beside ingest's. With `sentiment.model: null`
(the default) it loads nothing and writes an empty table, so the default pipeline's numbers
do not depend on it.
"""

import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from ec_lora_t.data.sentiment import build_sentiment, empty_signals
from stages._common import load_section, run_stage, stage_parser, write_metrics
from stages.params.sentiment import SentimentParams


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--comments", required=True, help="comments.parquet from the ingest stage")
    parser.add_argument("--out", required=True, help="signals.parquet to write (shortcode, signal, value, source)")
    parser.add_argument("--cache", required=True, help="score cache folder (kept between runs)")
    parser.add_argument("--run-info", required=True, help="JSON of this run's timing and cache use (not a metric)")
    args = parser.parse_args(argv)
    params = load_section(SentimentParams, "sentiment", args.params)

    started = time.perf_counter()
    comments = pd.read_parquet(args.comments)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if params.model is None:
        pq.write_table(empty_signals(), args.out)
        write_metrics(args.metrics, {"enabled": False, "comments": len(comments)})
        return
    if comments.empty:
        print("sentiment: the export has no comment texts (instaloader --comments, or comments.csv per post): "
              "no post gets a sentiment", file=sys.stderr)
    result = build_sentiment(comments, params.model, args.cache, params.batch_size, params.max_length)
    pq.write_table(result.table, args.out)
    write_metrics(args.metrics, {"enabled": True, **result.metrics})
    write_metrics(args.run_info, {"seconds": time.perf_counter() - started, "scored_now": result.scored_now})


if __name__ == "__main__":
    run_stage(main)

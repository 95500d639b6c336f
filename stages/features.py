"""Stage `features`: weighted engagement, normalised time and the engagement_time vector."""

import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from ec_lora_t.data.features import build_feature_table
from stages._common import load_section, run_stage, stage_parser, write_metrics
from stages.params.features import FeaturesParams


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--posts", required=True, help="posts.parquet from the ingest stage")
    parser.add_argument("--captions", required=True, help="captions.parquet from the caption stage")
    parser.add_argument("--signals", action="append", default=[],
                        help="signals table (shortcode, signal, value, source) from ingest or sentiment; repeat. "
                             "None: the posts table's likes and comments")
    parser.add_argument("--out", required=True, help="train.parquet to write (schema: docs/schema.md)")
    parser.add_argument("--stats", required=True, help="normalization.json: statistics for later queries")
    parser.add_argument("--left-out", help="left_out.parquet: posts without a signal of the engagement, and why")
    args = parser.parse_args(argv)
    params = load_section(FeaturesParams, "features", args.params)

    signals = pd.concat([pd.read_parquet(path) for path in args.signals], ignore_index=True) if args.signals else None
    result = build_feature_table(
        pd.read_parquet(args.posts),
        pd.read_parquet(args.captions),
        normalization=params.normalization,
        signals=signals,
        weights=params.signals,
        per=params.per,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(result.table, args.out)
    if args.left_out:
        Path(args.left_out).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(result.left_out, args.left_out)
    result.normalizer.to_json(args.stats)
    write_metrics(args.metrics, result.metrics)
    for row in result.left_out.to_pylist():
        print(f"features: left out post {row['shortcode']}: {row['reason']}: {row['detail']}", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)

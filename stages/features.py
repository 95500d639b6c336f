"""Stage `features`: weighted engagement, normalised time and the engagement_time vector."""

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
    parser.add_argument("--out", required=True, help="train.parquet to write (schema: docs/schema.md)")
    parser.add_argument("--stats", required=True, help="normalization.json: statistics for later queries")
    args = parser.parse_args(argv)
    params = load_section(FeaturesParams, "features", args.params)

    result = build_feature_table(
        pd.read_parquet(args.posts),
        pd.read_parquet(args.captions),
        comment_weight=params.comment_weight,
        normalization=params.normalization,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(result.table, args.out)
    result.normalizer.to_json(args.stats)
    write_metrics(args.metrics, result.metrics)


if __name__ == "__main__":
    run_stage(main)

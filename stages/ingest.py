"""Stage `ingest`: read the post export (report or instaloader layout) into one row per image."""

import sys
from pathlib import Path

import pyarrow.parquet as pq

from ec_lora_t.data.ingest import IngestError, ingest_posts
from stages._common import load_params, stage_parser, write_metrics


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out-table", required=True, help="posts.parquet: one row per usable image")
    parser.add_argument("--out-rejects", required=True, help="rejects.parquet: path, reason, detail")
    args = parser.parse_args(argv)
    params = load_params("ingest", args.params)

    try:
        result = ingest_posts(
            params["posts_dir"],
            format=params.get("format", "auto"),
            videos=params.get("videos", "thumbnail"),
            max_image_pixels=int(params["max_image_pixels"]),
        )
    except IngestError as error:
        sys.exit(f"ingest: {error}")

    # Rejects and metrics are written even when nothing is usable: they say why.
    for path in (args.out_table, args.out_rejects):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(result.rejects_table(), args.out_rejects)
    metrics = result.metrics()
    write_metrics(args.metrics, metrics)
    for reject in result.rejects:
        print(f"ingest: rejected {reject.path}: {reject.reason}: {reject.detail}", file=sys.stderr)
    if not result.records:
        sys.exit(
            f"ingest: no valid post left in {params['posts_dir']} ({metrics['rejected']} rejected, "
            f"by reason {_nonzero(metrics['rejected_by_reason'])}); see {args.out_rejects}"
        )
    pq.write_table(result.posts_table(), args.out_table)
    print(
        f"ingest: {metrics['images']} images of {metrics['posts']} posts ({metrics['format']} layout), "
        f"{metrics['rejected']} rejected",
        file=sys.stderr,
    )


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {reason: count for reason, count in counts.items() if count}


if __name__ == "__main__":
    main()

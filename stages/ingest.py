"""Stage `ingest`: read the post export (report or instaloader layout) into one row per image.

Also stops a feed too small to evaluate here, before captioning and encoding: the regressor
stage runs both protocols, and reads `regressor.folds` for the grouped one.
"""

import math
import sys
from pathlib import Path

import pyarrow.parquet as pq

from ec_lora_t.data.ingest import IngestError, ingest_posts
from stages._common import load_section, run_stage, stage_parser, write_metrics
from stages.params.ingest import IngestParams
from stages.params.regressor import RegressorParams

# The report protocol's random 80/20 image split needs this many images
# (ec_lora_t.evaluation.regressor.evaluate_report_protocol).
REPORT_PROTOCOL_MIN_IMAGES = 5


def minimum_posts(folds: int) -> int:
    """Fewest posts the grouped `folds`-fold protocol runs on.

    Each outer fold holds out about 1/folds of the posts, and the ridge penalty is chosen by
    a grouped split of the posts left, which needs at least 2 of them
    (ec_lora_t.evaluation.regressor.evaluate_grouped_kfold; tests/test_regressor.py checks
    this against it).
    """
    posts = folds
    while posts - math.ceil(posts / folds) < 2:
        posts += 1
    return posts


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out-table", required=True, help="posts.parquet: one row per usable image")
    parser.add_argument("--out-rejects", required=True, help="rejects.parquet: path, reason, detail")
    parser.add_argument("--out-signals", help="signals.parquet: shortcode, signal, value, source")
    parser.add_argument("--out-comments", help="comments.parquet: the comments' texts, where the export has them")
    parser.add_argument("--out-signal-issues", help="signal_issues.parquet: location, shortcode, reason, detail")
    args = parser.parse_args(argv)
    params = load_section(IngestParams, "ingest", args.params)
    folds = load_section(RegressorParams, "regressor", args.params).folds

    try:
        result = ingest_posts(
            params.posts_dir, format=params.format, videos=params.videos, max_image_pixels=params.max_image_pixels,
            insights=params.insights,
        )
    except IngestError as error:
        sys.exit(f"ingest: {error}")

    # Rejects and metrics are written even when nothing is usable: they say why.
    outputs = {args.out_rejects: result.rejects_table(), args.out_signals: result.signals_table(),
               args.out_comments: result.comments_table(), args.out_signal_issues: result.signal_issues_table()}
    for path, table in outputs.items():
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
    Path(args.out_table).parent.mkdir(parents=True, exist_ok=True)
    metrics = result.metrics()
    write_metrics(args.metrics, metrics)
    for reject in result.rejects:
        print(f"ingest: rejected {reject.path}: {reject.reason}: {reject.detail}", file=sys.stderr)
    for issue in result.signal_issues:
        print(f"ingest: signals: {issue.location}: {issue.reason}: {issue.detail}", file=sys.stderr)
    if params.insights is not None and not _inside(params.insights, params.posts_dir):
        print(f"ingest: note: {params.insights} is outside {params.posts_dir}, so DVC does not see it change: "
              "move it into the posts folder or rerun with `dvc repro -f -s ingest`", file=sys.stderr)
    if not result.records:
        sys.exit(
            f"ingest: no valid post left in {params.posts_dir} ({metrics['rejected']} rejected, "
            f"by reason {_nonzero(metrics['rejected_by_reason'])}); see {args.out_rejects}"
        )
    needed = minimum_posts(folds)
    if metrics["posts"] < needed or metrics["images"] < REPORT_PROTOCOL_MIN_IMAGES:
        sys.exit(
            f"ingest: {metrics['posts']} usable posts ({metrics['images']} images) in {params.posts_dir} are too few "
            f"to evaluate: the regressor's grouped protocol with regressor.folds={folds} needs at least {needed} "
            f"posts, its report protocol at least {REPORT_PROTOCOL_MIN_IMAGES} images. Add posts, or lower "
            "regressor.folds (>= 2); stopped before captioning"
        )
    pq.write_table(result.posts_table(), args.out_table)
    print(
        f"ingest: {metrics['images']} images of {metrics['posts']} posts ({metrics['format']} layout), "
        f"{metrics['rejected']} rejected",
        file=sys.stderr,
    )


def _inside(path: str, folder: str) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {reason: count for reason, count in counts.items() if count}


if __name__ == "__main__":
    run_stage(main)

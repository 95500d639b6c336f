"""Stage `caption`: BLIP (or the post's own text) captions with style and season tags."""

import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from ec_lora_t.data.captioning import build_captions
from stages._common import load_section, run_stage, stage_parser, write_metrics
from stages.params.caption import CaptionParams

# How this run went (cache use), not what it produced: kept out of the committed metrics so
# that a rerun with the same captions leaves git clean.
RUN_INFO_KEYS = ("model_generated", "model_cache_hits")


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--posts", required=True, help="posts.parquet from the ingest stage")
    parser.add_argument("--out", required=True, help="captions.parquet to write")
    parser.add_argument("--cache", required=True, help="caption cache folder (kept between runs)")
    parser.add_argument("--run-info", required=True, help="JSON of this run's timing and cache use (not a metric)")
    args = parser.parse_args(argv)
    params = load_section(CaptionParams, "caption", args.params)

    started = time.perf_counter()
    posts = pd.read_parquet(args.posts)
    result = build_captions(
        posts,
        source=params.source,
        style_tag=params.style_tag,
        hemisphere=params.hemisphere,
        model=params.model or None,
        missing_text=params.missing_text,
        cache_dir=args.cache,
        batch_size=params.batch_size,
        max_new_tokens=params.max_new_tokens,
        # Ingest already rejected images over its own ingest.max_image_pixels.
        max_image_pixels=None,
    )
    metrics = {key: value for key, value in result.metrics.items() if key not in RUN_INFO_KEYS}
    write_metrics(args.metrics, metrics)
    write_metrics(
        args.run_info,
        {"seconds": time.perf_counter() - started, **{key: result.metrics[key] for key in RUN_INFO_KEYS}},
    )
    if metrics["uncaptioned"]:
        print(
            f"caption: {metrics['uncaptioned']} image(s) have no caption (no post text and caption.missing_text "
            f"is {params.missing_text!r}); left out: {metrics['uncaptioned_paths']}",
            file=sys.stderr,
        )
    if metrics["generic"]:
        print(f"caption: {metrics['generic']} image(s) have no post text; they train on the generic caption "
              "(caption.missing_text: generic)", file=sys.stderr)
    if result.table.num_rows == 0:
        sys.exit(f"caption: no image of {args.posts} could be captioned (source {params.source})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(result.table, args.out)


if __name__ == "__main__":
    run_stage(main)

"""Stage `caption`: BLIP (or the post's own text) captions with style and season tags."""

import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from ec_lora_t.data.captioning import build_captions
from stages._common import load_section, run_stage, stage_parser, write_metrics
from stages.params.caption import CaptionParams


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--posts", required=True, help="posts.parquet from the ingest stage")
    parser.add_argument("--out", required=True, help="captions.parquet to write")
    parser.add_argument("--cache", required=True, help="caption cache folder (kept between runs)")
    args = parser.parse_args(argv)
    params = load_section(CaptionParams, "caption", args.params)

    started = time.perf_counter()
    # DVC declares the cache as an output: it must exist even when no model was called.
    Path(args.cache).mkdir(parents=True, exist_ok=True)
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
    metrics = {**result.metrics, "seconds": time.perf_counter() - started}
    write_metrics(args.metrics, metrics)
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

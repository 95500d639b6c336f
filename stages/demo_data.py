"""Stage `demo_data`: write the synthetic demo creator's posts and their insights export (the embedded
default's data)."""

import shutil
from pathlib import Path

from ec_lora_t.demo.demo_data import write_demo_posts
from stages._common import load_section, run_stage, stage_parser, write_metrics
from stages.params.demo_data import DemoDataParams


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", required=True, help="folder to write <shortcode>/img_XX.jpg + metadata.csv into")
    args = parser.parse_args(argv)
    params = load_section(DemoDataParams, "demo_data", args.params)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    summary = write_demo_posts(out, num_posts=params.num_posts, image_size=params.image_size, seed=params.seed,
                               audience=params.audience, saves_audience=params.saves_audience,
                               shares_audience=params.shares_audience)
    write_metrics(args.metrics, summary)


if __name__ == "__main__":
    run_stage(main)

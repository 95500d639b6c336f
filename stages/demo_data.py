"""Stage `demo_data`: write the synthetic demo creator's posts (the embedded default's data)."""

import argparse
import shutil
from pathlib import Path

from ec_lora_t.demo_data import write_demo_posts
from stages._common import load_params, write_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder to write <shortcode>/img_XX.jpg + metadata.csv into")
    parser.add_argument("--metrics", required=True)
    args = parser.parse_args()
    params = load_params("demo_data")
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    summary = write_demo_posts(out, num_posts=params["num_posts"], image_size=params["image_size"], seed=params["seed"])
    write_metrics(args.metrics, summary)


if __name__ == "__main__":
    main()

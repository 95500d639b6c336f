"""A large feed through ingest -> caption -> features -> latents on the CPU: time and peak memory.

Writes the demo creator's feed at each size in --posts (`write_demo_posts`, 64 px images), runs
the real stage modules on it in a scratch folder with the repo's params (the embedded base
model, 32 px), each stage in its own process, and records per stage the wall time, the time
per 1,000 images and the process's peak RSS. If memory is bounded, peak RSS hardly moves
between feed sizes. Then --extra-posts more posts are added to the largest feed and the four
stages run again with the caches kept: the latents stage must encode only the new images.

    python benchmarks/large_feed.py --posts 1000 5000 --out benchmarks/results/large_feed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
# Run as a script from anywhere: the stages package lives one folder up.
sys.path.insert(0, str(REPO))

from ec_lora_t.demo.demo_data import write_demo_posts
from stages._common import merge_params

STAGES = {
    "ingest": ["--out-table", "data/ingest/posts.parquet", "--out-rejects", "data/ingest/rejects.parquet"],
    "caption": ["--posts", "data/ingest/posts.parquet", "--out", "data/caption/captions.parquet",
                "--cache", "data/caption_cache", "--run-info", "data/run_info/caption.json"],
    "features": ["--posts", "data/ingest/posts.parquet", "--captions", "data/caption/captions.parquet",
                 "--out", "data/features/train.parquet", "--stats", "data/features/normalization.json"],
    "latents": ["--features", "data/features/train.parquet", "--out", "data/latents", "--cache", "data/latent_cache",
                "--run-info", "data/run_info/latents.json"],
}


def run_stage(stage: str, workdir: Path) -> dict[str, float]:
    """Run `python -m stages.<stage>` in `workdir`; its wall seconds and peak RSS (its own process)."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", CI="1")
    command = [sys.executable, "-m", f"stages.{stage}", *STAGES[stage], "--metrics", f"metrics/{stage}.json"]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"stages.{stage} failed:\n{output.decode()[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}  # Linux: KiB


def run_feed(workdir: Path) -> dict:
    images = None
    stages = {}
    for stage in STAGES:
        stages[stage] = run_stage(stage, workdir)
        if stage == "ingest":
            images = json.loads((workdir / "metrics/ingest.json").read_text())["images"]
    for figures in stages.values():
        figures["seconds_per_1000_images"] = figures["seconds"] * 1000 / images
    return {
        "images": images,
        "stages": stages,
        "seconds": sum(f["seconds"] for f in stages.values()),
        "seconds_per_1000_images": sum(f["seconds_per_1000_images"] for f in stages.values()),
        "peak_rss_mb": max(f["peak_rss_mb"] for f in stages.values()),
        "latents_run": json.loads((workdir / "data/run_info/latents.json").read_text()),
        "latents_metrics": json.loads((workdir / "metrics/latents.json").read_text()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, nargs="+", default=[1000, 5000], help="feed sizes (posts)")
    parser.add_argument("--extra-posts", type=int, default=100, help="posts added to the largest feed, then rerun")
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    args = parser.parse_args()

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model": params["model"],
        "latents": params["latents"],
        "feeds": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for num_posts in sorted(args.posts):
            workdir = Path(scratch) / f"feed-{num_posts}"
            workdir.mkdir(parents=True)
            (workdir / "models").symlink_to(REPO / "models")
            feed_params = merge_params(params, {"ingest": {"posts_dir": "posts"}})
            (workdir / "params.yaml").write_text(yaml.safe_dump(feed_params, sort_keys=False))
            started = time.perf_counter()
            write_demo_posts(workdir / "posts", num_posts=num_posts)
            feed = {"demo_data_seconds": time.perf_counter() - started, **run_feed(workdir)}
            results["feeds"][str(num_posts)] = feed
            print(num_posts, json.dumps({k: feed[k] for k in ("images", "seconds_per_1000_images", "peak_rss_mb")}),
                  flush=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")

        # Add posts (another seed: new shortcodes) to the largest feed and run again with the caches.
        write_demo_posts(workdir / "posts", num_posts=args.extra_posts, seed=8)
        grown = run_feed(workdir)
        results["added_posts"] = {
            "posts_added": args.extra_posts,
            "images_added": grown["images"] - feed["images"],
            **{k: grown[k] for k in ("images", "stages", "seconds", "latents_run")},
        }
        print("added", json.dumps(grown["latents_run"]), flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

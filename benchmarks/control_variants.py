"""Does the vector control generation? Train and evaluate several variants and tabulate the verdicts.

For a machine without DVC (the GPU box): each variant runs the real stage modules
(`stages.train`, then `stages.evaluate`) in a scratch folder whose params.yaml is the repo's
with the variant's overrides, reading the repo's `data/latents` and `data/regressor` (made by
`dvc repro`). With DVC, `dvc exp run -S ...` per variant and `dvc exp show` do the same.

    python benchmarks/control_variants.py --out results.json \
        --variants '{"report": {"train": {"caption_dropout": 0.0}}, "dropout": {"train": {"caption_dropout": 0.5}}}'

The results file is rewritten after every variant, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
# Run as a script from anywhere: the stages package lives one folder up.
sys.path.insert(0, str(REPO))

from stages._common import merge_params  # noqa: E402

SWEEP_KEYS = ("spearman", "p_value", "slope", "range_ratio", "mean")


def run_stage(args: list[str], cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{args[0]} failed in {cwd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def summarise(workdir: Path) -> dict:
    train = json.loads((workdir / "metrics/train.json").read_text())
    train |= json.loads((workdir / "data/run_info/train.json").read_text())  # images/s lives with the timings
    evaluate = json.loads((workdir / "metrics/evaluate.json").read_text())
    summary = {
        "train": {k: train[k] for k in ("final_epoch_mean_loss", "steps", "images_per_second", "device")},
        "verdict": evaluate["verdict"],
    }
    for mode, metrics in evaluate["engagement_sweep"].items():
        summary[mode] = {k: metrics.get(k) for k in SWEEP_KEYS}
        if "ground_truth" in metrics:
            summary[mode]["ground_truth"] = {k: metrics["ground_truth"].get(k) for k in SWEEP_KEYS}
    return summary


def run_variant(name: str, overrides: dict, scratch: Path, out_dir: Path) -> dict:
    workdir = scratch / name
    (workdir / "data").mkdir(parents=True)
    for shared in ("data/latents", "data/regressor", "models"):
        (workdir / shared).symlink_to(REPO / shared)
    params = merge_params(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.perf_counter()
    run_stage(["stages.train", "--latents", "data/latents", "--out", "data/train/adapter",
               "--checkpoints", "data/train/checkpoints", "--live", "data/train/live",
               "--metrics", "metrics/train.json", "--run-info", "data/run_info/train.json"], workdir)
    trained = time.perf_counter()
    run_stage(["stages.evaluate", "--adapter", "data/train/adapter", "--regressor", "data/regressor",
               "--out", "data/evaluate", "--sweep-plot", "data/plots/sweep.csv", "--metrics", "metrics/evaluate.json"],
              workdir)
    summary = summarise(workdir)
    summary["seconds"] = {"train": trained - started, "evaluate": time.perf_counter() - trained}
    summary["overrides"] = overrides
    grid = workdir / "data/evaluate/grid.png"
    if grid.exists():
        shutil.copy(grid, out_dir / f"grid_{name}.png")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", required=True, help="JSON object {name: params overrides}, or a path to one")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (grids are written beside it)")
    args = parser.parse_args()
    text = Path(args.variants).read_text() if Path(args.variants).is_file() else args.variants
    variants = json.loads(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, overrides in variants.items():
            try:
                results[name] = run_variant(name, overrides, Path(scratch), args.out.parent)
            except RuntimeError as error:
                results[name] = {"error": str(error), "overrides": overrides}
            args.out.write_text(json.dumps(results, indent=2))
            outcome = results[name].get("error", "")[-2000:] or json.dumps(
                {"verdict": results[name]["verdict"], "ec_lora": results[name]["ec_lora"]}
            )
            print(name, outcome, flush=True)


if __name__ == "__main__":
    main()

"""Does the vector control generation? Train and evaluate several variants and tabulate the verdicts.

For a machine without DVC (the GPU box): each variant runs the real stage commands of dvc.yaml
(train, then evaluate; `${...}` params interpolated as DVC does) in a scratch folder whose
params.yaml is the repo's with the variant's overrides, reading the data stages' outputs
(`data/demo_posts`, `ingest`, `caption`, `features`, `latents`, `regressor`) of `--data`
(default: this repo, after `dvc repro`). With DVC, `dvc exp run -S ...` per variant and
`dvc exp show` do the same.

    python benchmarks/control_variants.py --out results.json \
        --variants '{"report": {"train": {"caption_dropout": 0.0}}, "dropout": {"train": {"caption_dropout": 0.5}}}'

The results file is rewritten after every variant, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
# Run as a script from anywhere: the stages and benchmarks packages live one folder up.
sys.path.insert(0, str(REPO))

from benchmarks.control_research import link_world, run_stage, stage_command  # noqa: E402
from stages._common import merge_params  # noqa: E402

SWEEP_KEYS = ("spearman", "p_value", "slope", "range_ratio", "mean")


def summarise(workdir: Path) -> dict:
    train = json.loads((workdir / "metrics/train.json").read_text())
    train |= json.loads((workdir / "data/run_info/train.json").read_text())  # images/s lives with the timings
    details = json.loads((workdir / "data/evaluate/details.json").read_text())
    summary = {
        "train": {k: train.get(k) for k in ("final_epoch_mean_loss", "steps", "images_per_second", "device")},
        "verdict": details["verdict"],
    }
    for mode, metrics in details["engagement_sweep"].items():
        summary[mode] = {k: metrics.get(k) for k in SWEEP_KEYS}
        if "ground_truth" in metrics:
            summary[mode]["ground_truth"] = {k: metrics["ground_truth"].get(k) for k in SWEEP_KEYS}
    return summary


def run_variant(name: str, overrides: dict, scratch: Path, out_dir: Path, data_root: Path = REPO) -> dict:
    workdir = scratch / name
    link_world(workdir, data_root.resolve())
    params = merge_params(yaml.safe_load((data_root / "params.yaml").read_text()), overrides)
    # The feed the data stages read: ground truth applies when it is the demo world's.
    posts_dir = Path(params["ingest"]["posts_dir"])
    params = merge_params(params, {"ingest": {"posts_dir": str(posts_dir if posts_dir.is_absolute()
                                                                 else (data_root / posts_dir).resolve())}})
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.perf_counter()
    run_stage(stage_command("train", params), workdir, device=None)
    trained = time.perf_counter()
    run_stage(stage_command("evaluate", params), workdir, device=None)
    summary = summarise(workdir)
    summary["seconds"] = {"train": trained - started, "evaluate": time.perf_counter() - trained}
    summary["overrides"] = overrides
    grid = workdir / "data/evaluate/engagement_sweep.png"
    if grid.exists():
        shutil.copy(grid, out_dir / f"grid_{name}.png")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", required=True, help="JSON object {name: params overrides}, or a path to one")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (grids are written beside it)")
    parser.add_argument("--data", type=Path, default=REPO,
                        help="folder with params.yaml and the data stages' outputs under data/ (default: this repo)")
    args = parser.parse_args(argv)
    text = Path(args.variants).read_text() if Path(args.variants).is_file() else args.variants
    variants = json.loads(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, overrides in variants.items():
            try:
                results[name] = run_variant(name, overrides, Path(scratch), args.out.parent, args.data)
            except (RuntimeError, KeyError, ValueError) as error:
                results[name] = {"error": str(error), "overrides": overrides}
            args.out.write_text(json.dumps(results, indent=2))
            outcome = results[name].get("error", "")[-2000:] or json.dumps(
                {"verdict": results[name]["verdict"], "ec_lora": results[name]["ec_lora"]}
            )
            print(name, outcome, flush=True)


if __name__ == "__main__":
    main()

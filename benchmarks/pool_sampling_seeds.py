"""How much of a ground-truth Spearman is the evaluation's own noise? One adapter, several sets of sampling seeds.

The evaluate stage's ground-truth Spearman is taken over every image of EC-LoRA-T's sweep (by
default 8 prompts x 4 sampling seeds x 5 targets). A `control_research.py` sampling variant with
other `evaluate.seeds` (e.g. `[5, 6, 7, 8]`) samples the same adapter again; this script reads
the variants' `sweep.csv` in every run folder of a harness work folder and reports, per run and
sweep (engagement, time):

- the Spearman of each variant and of all of them pooled, which is the figure the evaluate
  stage would give with the union of their seeds (the statistic is over images);
- the block-bootstrap standard error of each: (prompt, sampling seed) pairs resampled with
  replacement (`stats.block_bootstrap_se`, the evaluate stage's own), since the images of one
  pair share their initial noise.

and, over the runs, mean ± std (population) and the worst run of each.

    python benchmarks/pool_sampling_seeds.py --work /tmp/research --variants w4-fp32 w4-seeds5-8-fp32 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ec_lora_t.evaluation.stats import block_bootstrap_se, spearman  # noqa: E402  (the evaluate stage's own)
from ec_lora_t.evaluation.sweep import BLOCK_COLUMNS as BLOCK  # noqa: E402  (its permutation test's blocks)
from ec_lora_t.evaluation.sweep import SWEEP_COLUMNS as SWEEPS  # noqa: E402  (its target/truth columns)


def sweep_csv(run: Path, variant: str) -> Path:
    """Where control_research.py's sampling variant `variant` wrote the evaluate stage's sweep.csv."""
    return run / "data" / f"evaluate-{variant}" / "sweep.csv"


def read_variants(run: Path, variants: Sequence[str]) -> dict[str, pd.DataFrame]:
    """EC-LoRA-T's rows of each variant's sweep.csv in one run folder (both sweeps), read once.

    Refuses a variant named twice and sampling seeds shared by two variants: pooling would count
    their images twice."""
    if len(set(variants)) != len(variants):
        raise ValueError(f"variants {list(variants)} name one variant twice; pooling would count its images twice")
    needed = {"mode", "sweep", *BLOCK, *(column for columns in SWEEPS.values() for column in columns)}
    frames = {}
    for variant in variants:
        path = sweep_csv(run, variant)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: variant {variant!r} was not sampled in {run.name}")
        frame = pd.read_csv(path)
        missing = needed - set(frame.columns)
        if missing:
            raise ValueError(f"{path}: not an evaluate stage's sweep.csv (no column {sorted(missing)})")
        frames[variant] = frame[frame["mode"] == "ec_lora"]
    seen: dict[int, str] = {}
    for variant, frame in frames.items():
        for sampling_seed in sorted(set(frame["seed"])):
            if sampling_seed in seen:
                raise ValueError(f"{run.name}: sampling seed {sampling_seed} is in both {seen[sampling_seed]!r} and "
                                 f"{variant!r}; pooling would count its images twice")
            seen[sampling_seed] = variant
    return frames


def spearman_with_se(frame: pd.DataFrame, sweep: str, *, resamples: int = 999, seed: int = 0) -> dict[str, float]:
    """Spearman of target vs ground truth over the frame's images, and its block-bootstrap standard error."""
    target_column, truth_column = SWEEPS[sweep]
    target, truth = frame[target_column].to_numpy(float), frame[truth_column].to_numpy(float)
    blocks = frame.groupby(BLOCK).ngroup().to_numpy()  # numbered in (prompt, seed) order
    return {"spearman": spearman(target, truth),
            "se": block_bootstrap_se(target, truth, blocks, resamples=resamples, seed=seed),
            "blocks": int(blocks.max()) + 1}


def pool_run(run: Path, variants: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per sweep, each variant's figure for one run folder and the pooled one under the key "pooled"."""
    frames = read_variants(run, variants)
    result = {}
    for sweep in SWEEPS:
        rows = {variant: frame[frame["sweep"] == sweep].reset_index(drop=True) for variant, frame in frames.items()}
        figures = {variant: spearman_with_se(frame, sweep) for variant, frame in rows.items()}
        figures["pooled"] = spearman_with_se(pd.concat(rows.values(), ignore_index=True), sweep)
        result[sweep] = figures
    return result


def summarise(per_run: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Over the runs, per variant (and pooled): mean, population std and the worst Spearman."""
    columns = next(iter(per_run.values())).keys()
    summary = {}
    for column in columns:
        values = np.array([figures[column]["spearman"] for figures in per_run.values()])
        summary[column] = {"mean": float(values.mean()), "std": float(values.std()), "worst": float(values.min()),
                           "runs": len(values)}
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="the work folder of control_research.py")
    parser.add_argument("--variants", nargs="+", required=True, help="sampling variants with disjoint evaluate.seeds")
    parser.add_argument("--runs", default="run-*", help="glob of the run folders in --work (default: all)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    runs = []
    for run in sorted(path for path in args.work.glob(args.runs) if path.is_dir()):
        absent = [v for v in args.variants if not sweep_csv(run, v).is_file()]
        if absent:  # a run still training or sampling: said, not counted
            print(f"skipped {run.name}: not sampled yet as {', '.join(absent)}")
        else:
            runs.append(run)
    if not runs:
        raise SystemExit(f"{args.work}: no run folder matching {args.runs!r} has every variant sampled")
    pooled = {run.name: pool_run(run, args.variants) for run in runs}
    result = {}
    for sweep in SWEEPS:
        per_run = {name: figures[sweep] for name, figures in pooled.items()}
        result[sweep] = {"runs": per_run, "summary": summarise(per_run)}
        for name, figures in per_run.items():
            cells = ", ".join(f"{column} {f['spearman']:.4f} (se {f['se']:.3f})" for column, f in figures.items())
            print(f"{sweep:10s} {name}: {cells}")
        for column, s in result[sweep]["summary"].items():
            print(f"{sweep:10s} {column}: {s['mean']:.3f} ± {s['std']:.3f} (worst {s['worst']:.3f}) over {s['runs']} runs")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()

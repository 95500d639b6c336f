"""Tabulate `control_research.py` results as the README's ablation table (Markdown).

One row per (training variant, sampling variant, audience): the mean ± std over training seeds
of the ground-truth Spearman, its share of the retrieval ceiling, the range ratio, how many
seeds had monotone per-target means, the worst adherence drop against the base model (points;
negative: EC-LoRA-T keeps the prompt better), the time sweep's ground-truth Spearman and how
many seeds passed `controls_ground_truth`.

    python benchmarks/summarise_research.py benchmarks/results/control_research_round3_h200.json
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np


def rows(results: dict) -> list[str]:
    grouped = collections.defaultdict(list)
    for key, run in results["runs"].items():
        audience, train, _seed = key.split("/")
        for sample, outcome in run.get("samples", {}).items():
            if "headline" in outcome:
                grouped[(train, sample, audience)].append(outcome["headline"])
    lines = []
    for (train, sample, audience), headlines in sorted(grouped.items()):
        truth = [h["ground_truth"] for h in headlines]
        rho = np.array([t["spearman"] for t in truth])
        share = np.array([t["share_of_ceiling"] for t in truth])
        ratio = np.array([t["range_ratio"] for t in truth])
        drop = max(h["adherence"]["worst_drop"] for h in headlines)
        time = np.array([h["time"]["spearman"] for h in headlines])
        lines.append(
            f"| {train} | {sample} | {audience} | {rho.mean():.2f} ± {rho.std():.2f} | {share.mean():.2f} | "
            f"{ratio.mean():.2f} | {sum(t['monotone'] for t in truth)}/{len(truth)} | {100 * drop:+.0f} | "
            f"{time.mean():.2f} | {sum(h['verdict']['controls_ground_truth'] for h in headlines)}/{len(headlines)} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    args = parser.parse_args()
    print("| training | sampling | audience | GT Spearman | share of ceiling | range ratio | monotone | "
          "worst adherence drop (pts) | time Spearman | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in args.results:
        for line in rows(json.loads(path.read_text())):
            print(line)


if __name__ == "__main__":
    main()

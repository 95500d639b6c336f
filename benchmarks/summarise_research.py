"""Tabulate `control_research.py` results: every control figure as mean ± std over training seeds, and the worst seed.

One row per (recipe, sampling variant, split, audience). Each figure is given as
`mean ± std (worst)` over the training seeds that finished, std the population std (ddof 0),
worst the lowest value (the highest for the adherence drop, where more is worse):

- ground-truth Spearman of EC-LoRA-T's engagement sweep, its share of the retrieval ceiling
  and (when the evaluation reports it) of the prompt-aware ceiling, its range ratio;
- seeds with monotone per-target means, with `controls_ground_truth`, with `keeps_prompt`;
- the worst adherence drop against the base model over the targets (points; negative:
  EC-LoRA-T keeps the prompt better);
- the time sweep's ground-truth Spearman and its share of the ceiling (and of the prompt-aware
  one); seeds with `controls_time`.

    python benchmarks/summarise_research.py results.jsonl [more.jsonl ...] [--json summary.json]

Reads the JSON-lines files of `control_research.py` (a run listed twice counts once, its last
finished row) and the older single-JSON results (benchmarks/results/control_research_round*.json).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

# (name, path into a row's headline, worse direction): the figures aggregated over seeds.
FIGURES = [
    ("gt_spearman", ("ground_truth", "spearman"), "low"),
    ("share_of_ceiling", ("ground_truth", "share_of_ceiling"), "low"),
    ("share_of_prompt_aware_ceiling", ("ground_truth", "share_of_prompt_aware_ceiling"), "low"),
    ("range_ratio", ("ground_truth", "range_ratio"), "low"),
    ("adherence_drop_points", ("adherence", "worst_drop"), "high"),
    ("time_adherence_drop_points", ("time_adherence", "worst_drop"), "high"),
    ("time_spearman", ("time", "spearman"), "low"),
    ("time_share_of_ceiling", ("time", "share_of_ceiling"), "low"),
    ("time_share_of_prompt_aware_ceiling", ("time", "share_of_prompt_aware_ceiling"), "low"),
]
# (name, path into a row's headline): yes/no figures counted over seeds.
COUNTS = [
    ("monotone", ("ground_truth", "monotone")),
    ("controls", ("verdict", "controls_ground_truth")),
    ("keeps_prompt", ("verdict", "keeps_prompt")),
    ("controls_time", ("verdict", "controls_time")),
]


def read_rows(path: Path) -> list[dict]:
    """The rows of a results file: JSON lines, or an older results JSON ({"runs": {...}})."""
    text = path.read_text()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # JSON lines (or broken: reported per line below)
    if isinstance(whole, dict) and "runs" in whole:
        return list(_rows_of_old_results(whole))
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
    return rows


def _rows_of_old_results(results: dict) -> Iterable[dict]:
    for key, run in results["runs"].items():
        audience, recipe, seed = key.split("/")
        for sample, outcome in run.get("samples", {}).items():
            yield {"audience": audience, "split": "tuning", "recipe": recipe, "seed": int(seed.lstrip("s")),
                   "sample": sample, **outcome}


def _value(headline: dict, path: tuple[str, ...]):
    value = headline
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def aggregate(rows: Iterable[dict]) -> list[dict]:
    """One dict per (recipe, sample, split, audience): seeds, errors, and per figure
    {"mean", "std", "worst", "n"} (None where no seed reports it) and per count {"yes", "n"}."""
    latest: dict[tuple, dict] = {}
    errors: dict[tuple, set] = collections.defaultdict(set)
    for row in rows:
        group = (row["recipe"], row["sample"], row.get("split", "tuning"), row["audience"])
        if "headline" in row:
            latest[(*group, row["seed"])] = row
        else:
            errors[group].add(row["seed"])
    grouped: dict[tuple, list[dict]] = collections.defaultdict(list)
    for (*group, _seed), row in sorted(latest.items(), key=lambda item: str(item[0])):
        grouped[tuple(group)].append(row)
    summaries = []
    for group in sorted(set(grouped) | set(errors)):
        runs = grouped.get(group, [])
        recipe, sample, split, audience = group
        seeds = sorted(row["seed"] for row in runs)
        summary = {"recipe": recipe, "sample": sample, "split": split, "audience": audience, "seeds": seeds,
                   "failed_seeds": sorted(errors.get(group, set()) - set(seeds))}
        for name, path, worse in FIGURES:
            values = [float(v) for v in (_value(row["headline"], path) for row in runs)
                      if v is not None and not (isinstance(v, float) and math.isnan(v))]
            if not values:
                summary[name] = None
                continue
            array = np.array(values)
            summary[name] = {"mean": float(array.mean()), "std": float(array.std()), "n": len(values),
                             "worst": float(array.min() if worse == "low" else array.max())}
        for name, path in COUNTS:
            values = [v for v in (_value(row["headline"], path) for row in runs) if v is not None]
            summary[name] = {"yes": int(sum(bool(v) for v in values)), "n": len(values)} if values else None
        summaries.append(summary)
    return summaries


def _figure(summary: dict, name: str, scale: float = 1.0, sign: bool = False) -> str:
    figure = summary[name]
    if figure is None:
        return "–"
    number = "{:+.0f}" if sign else "{:.2f}"
    return (f"{number.format(scale * figure['mean'])} ± {scale * figure['std']:.{0 if sign else 2}f} "
            f"({number.format(scale * figure['worst'])})")


def _count(summary: dict, name: str) -> str:
    count = summary[name]
    return "–" if count is None else f"{count['yes']}/{count['n']}"


HEADER = ("| recipe | sampling | split | audience | seeds | GT Spearman | share of ceiling | "
          "share of prompt-aware ceiling | range ratio | monotone | worst adherence drop (pts) | "
          "keeps prompt | time Spearman | time share of ceiling | time share of prompt-aware ceiling | controls | "
          "controls time |")


def markdown(summaries: list[dict]) -> list[str]:
    """The table: each figure as `mean ± std (worst seed)`."""
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for s in summaries:
        seeds = f"{len(s['seeds'])}" + (f" ({len(s['failed_seeds'])} failed)" if s["failed_seeds"] else "")
        lines.append(
            f"| {s['recipe']} | {s['sample']} | {s['split']} | {s['audience']} | {seeds} | "
            f"{_figure(s, 'gt_spearman')} | {_figure(s, 'share_of_ceiling')} | "
            f"{_figure(s, 'share_of_prompt_aware_ceiling')} | {_figure(s, 'range_ratio')} | {_count(s, 'monotone')} | "
            f"{_figure(s, 'adherence_drop_points', 100.0, sign=True)} | {_count(s, 'keeps_prompt')} | "
            f"{_figure(s, 'time_spearman')} | {_figure(s, 'time_share_of_ceiling')} | "
            f"{_figure(s, 'time_share_of_prompt_aware_ceiling')} | {_count(s, 'controls')} | "
            f"{_count(s, 'controls_time')} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, default=None, help="also write the aggregates as JSON here")
    args = parser.parse_args(argv)
    rows = [row for path in args.results for row in read_rows(path)]
    summaries = aggregate(rows)
    print("\n".join(markdown(summaries)))
    if args.json is not None:
        args.json.write_text(json.dumps(summaries, indent=1))


if __name__ == "__main__":
    main()

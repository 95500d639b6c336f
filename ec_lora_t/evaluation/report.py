"""A one-page Markdown report of one evaluate run: the verdicts, the numbers against the ceiling,
per-target tables and the labelled sweep figures, all from the run's own files."""

from __future__ import annotations

from typing import Any

from ec_lora_t.evaluation.sweep import RETRIEVAL

MODE_NAMES = {"ec_lora": "EC-LoRA-T", "plain_lora": "plain LoRA", "base": "base model", RETRIEVAL: "retrieval (ceiling)"}


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _spearman(metrics: dict[str, Any]) -> str:
    """The Spearman with its block-bootstrap standard error, where the run recorded one."""
    se = metrics.get("spearman_se")
    return _number(metrics["spearman"]) + (f" ± {se:.3f}" if isinstance(se, float) and se == se else "")


def _by_target_table(sweep: dict[str, Any], score: str) -> list[str]:
    modes = [mode for mode in ("ec_lora", "plain_lora", "base", RETRIEVAL) if mode in sweep]
    metrics = {mode: (sweep[mode] if score == "regressor" else sweep[mode].get("ground_truth")) for mode in modes}
    modes = [mode for mode in modes if metrics[mode]]
    if not modes:
        return []
    targets = list(metrics[modes[0]]["by_target"])
    lines = ["| target | " + " | ".join(MODE_NAMES[mode] for mode in modes) + " |",
             "|---" * (len(modes) + 1) + "|"]
    for target in targets:
        cells = [f"{metrics[mode]['by_target'][target]['mean']:.3f}" for mode in modes]
        lines.append(f"| {int(target[-3:]) / 100:.2f} | " + " | ".join(cells) + " |")
    lines.append("| Spearman ± block-bootstrap SE | " + " | ".join(_spearman(metrics[mode]) for mode in modes) + " |")
    return lines


def _ceilings(details: dict[str, Any]) -> list[str]:
    """EC-LoRA-T's Spearman as a share of each ceiling: the retrieval baseline's (nearest training
    images to the target, whatever the prompt names) and the prompt-aware one (only among images
    that show what the prompt names; on a world whose attributes can be read back)."""
    lines = []
    for sweep_name in ("engagement_sweep", "time_sweep"):
        ec_lora = details.get(sweep_name, {}).get("ec_lora")
        if not ec_lora:
            continue
        for score, metrics in (("ground truth", ec_lora.get("ground_truth")), ("regressor", ec_lora)):
            if metrics:
                lines.append(f"| {sweep_name.replace('_', ' ')} | {score} | {_spearman(metrics)} | "
                             f"{_number(metrics.get('share_of_ceiling'))} | "
                             f"{_number(metrics.get('share_of_prompt_aware_ceiling'))} |")
    if not lines:
        return []
    return ["", "## EC-LoRA-T against the ceilings", "",
            "| sweep | score | Spearman ± SE | share of the retrieval ceiling | share of the prompt-aware ceiling |",
            "|---|---|---|---|---|", *lines]


def markdown_report(details: dict[str, Any], figures: dict[str, str], title: str = "EC-LoRA-T evaluation") -> str:
    """The report's Markdown; `figures` maps a caption to an image path relative to the report."""
    lines = [f"# {title}", "", "## Verdicts", ""]
    lines += [f"- `{name}`: **{_number(value)}**" for name, value in details["verdict"].items()]
    source = details.get("ground_truth_source", {})
    lines += ["", f"Ground truth: {'the demo audience `' + source['audience'] + '`' if source.get('used') else 'off (' + source.get('reason', '') + ')'}."]
    for sweep_name in ("engagement_sweep", "time_sweep"):
        sweep = details.get(sweep_name)
        if not sweep:
            continue
        label = sweep_name.replace("_", " ")
        for score in ("ground_truth", "regressor"):
            table = _by_target_table(sweep, score)
            if table:
                lines += ["", f"## {label.capitalize()}: mean {score.replace('_', ' ')} score per target", ""] + table
    lines += ["", "± is the block-bootstrap standard error: (prompt, sampling seed) pairs resampled, so how far",
              "other prompts and sampling seeds of the same kind would move the figure."]
    lines += _ceilings(details)
    for key, sweep in (("adherence", "engagement"), ("time_adherence", "time")):
        adherence = details.get(key)
        if not adherence:
            continue
        modes = [mode for mode in ("ec_lora", "plain_lora", "base") if adherence.get(mode)]
        targets = list(adherence[modes[0]])
        lines += ["", f"## Prompt adherence per {sweep} target (share of named attributes drawn as named)", "",
                  "| target | " + " | ".join(MODE_NAMES[mode] for mode in modes) + " |", "|---" * (len(modes) + 1) + "|"]
        lines += [f"| {int(target[-3:]) / 100:.2f} | " + " | ".join(f"{adherence[m][target]:.2f}" for m in modes) + " |"
                  for target in targets]
    for caption, path in figures.items():
        lines += ["", f"## {caption}", "", f"![{caption}]({path})"]
    return "\n".join(lines) + "\n"

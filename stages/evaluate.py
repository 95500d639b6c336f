"""Stage `evaluate`: the engagement (and time) sweep through EC-LoRA-T, the plain LoRA and the base model,
beside the retrieval baseline (the ceiling the data allows).

The algorithm is `ec_lora_t.evaluation.evaluate.evaluate_adapter`: every image is encoded by the
base model's VAE in fp32 and scored by the saved latent regressor; on the demo feed
(`evaluate.ground_truth: auto` finds the demo world's manifest in `ingest.posts_dir`) it is also
scored with the hidden function of the signal it trained on (`features.signals`: the likers'
audience, the savers', ...; each signal's own in `details.json`), the creator's drift (time sweep) and prompt
adherence. This stage reads the params, loads the models, and writes the images, the scored
table, the sweep plot CSV, labelled figures of both sweeps, every detail in `details.json`, a
one-page `report.md`, and the headline numbers in metrics/evaluate.json (keys documented in
docs/metrics.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from dvclive import Live

from ec_lora_t.demo.demo_data import DEMO_INSIGHTS, DEMO_MANIFEST, read_demo_manifest
from ec_lora_t.demo.ground_truth import DemoGroundTruth, signal_audience_weights, signal_audiences_of
from ec_lora_t.evaluation.evaluate import (
    TRAINING_COLUMNS,
    Evaluation,
    EvaluationSettings,
    evaluate_adapter,
    figure_file_name,
    save_images,
)
from ec_lora_t.evaluation.regressor import load_regressor
from ec_lora_t.evaluation.report import markdown_report
from ec_lora_t.evaluation.sweep import headline_metrics
from ec_lora_t.generation import PRECISIONS, VectorSampling, load_pipeline
from ec_lora_t.models import load_vae
from stages._common import load_params, load_section, run_stage, stage_parser, write_metrics
from stages.params.evaluate import EvaluateParams

PLOT_COLUMNS = [
    "mode", "prompt_index", "prompt", "seed", "target_engagement", "target_time", "predicted_engagement",
    "ground_truth_score",
]


def resolve_ground_truth(setting: str | bool, posts_dir: str, features: dict,
                         insights: str | None) -> tuple[DemoGroundTruth | None, dict]:
    """The demo world's ground truth when it applies, else None, and where it came from (for the
    report). `auto`: when the posts are the demo feed and the world knows the engagement's hidden
    function (`features.signals`, `features.per`); True: required (an error elsewhere); False: never."""
    manifest = None if setting is False else read_demo_manifest(posts_dir)
    if manifest is None and setting is True:
        raise SystemExit(f"evaluate.ground_truth is true but {posts_dir} is not the demo feed (no demo_world.json)")
    if manifest is None:
        reason = f"{posts_dir} is not the demo feed" if setting == "auto" else "evaluate.ground_truth is false"
        return None, {"used": False, "reason": reason}
    feeds_insights = insights is not None and Path(insights).resolve() == (
        Path(posts_dir) / manifest.get("insights", DEMO_INSIGHTS)).resolve()
    try:
        weights = signal_audience_weights(manifest, features["signals"], features["per"], feeds_insights)
    except ValueError as error:
        if setting is True:
            raise SystemExit(f"evaluate.ground_truth is true but {error}") from error
        return None, {"used": False, "reason": str(error)}
    audiences = signal_audiences_of(manifest)
    # Every counted signal of the feed is scored by its own function too; comments follow the
    # likers, so they add nothing beside likes.
    shown = {name: audience for name, audience in audiences.items() if name != "comments"}
    if len(set(shown.values())) < 2:
        shown = {}  # one function: the headline already says it
    source = {"used": True, "audience": manifest["audience"], "engagement_follows": weights,
              "signal_audiences": audiences, "manifest": str(Path(posts_dir) / DEMO_MANIFEST)}
    return DemoGroundTruth(next(iter(weights)) if len(weights) == 1 else weights, shown), source


def evaluation_settings(params: EvaluateParams, resolution: int) -> EvaluationSettings:
    """The library's settings from the checked `evaluate` section."""
    anchor = params.vector_guidance_anchor
    return EvaluationSettings(
        prompts=params.prompts, seeds=params.seeds, engagement_targets=params.engagement_targets, time=params.time,
        fixed_engagement=params.fixed_engagement, num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale, permutations=params.permutations, resolution=resolution,
        time_targets=params.time_targets, batch_size=params.batch_size, retrieval_k=params.retrieval_k,
        sampling=VectorSampling(params.vector_guidance, params.vector_scale, None if anchor is None else tuple(anchor),
                                tuple(params.vector_guidance_interval), params.time_guidance),
    )


def log_response_curves(live: Live, scored: pd.DataFrame) -> None:
    """dvclive plots of each sweep's mean score per target, one file per (sweep, score, mode), so
    that `dvc plots show` draws one line per mode: how far each mode's images follow the target."""
    for sweep, target in (("engagement", "target_engagement"), ("time", "target_time")):
        scores = {"regressor": "predicted_engagement", "ground_truth": "time_ground_truth" if sweep == "time"
                  else "ground_truth_score"}
        for mode, rows in scored[scored["sweep"] == sweep].groupby("mode"):
            for score, column in scores.items():
                means = rows.groupby(target)[column].mean()
                if means.notna().all() and len(means) > 0:
                    live.log_plot(f"{sweep}_{score}/{mode}", means.rename("mean_score").reset_index(),
                                  x=target, y="mean_score")


def write_outputs(evaluation: Evaluation, source: dict, out: Path, sweep_plots: Path, live_dir: Path,
                  metrics: Path) -> None:
    """Images, sweep.csv, the plots' CSVs and dvclive curves, figures, details, report and metrics."""
    scored = evaluation.scored
    save_images(scored, evaluation.images)
    out.mkdir(parents=True, exist_ok=True)
    scored.to_csv(out / "sweep.csv", index=False)
    # One file per mode, so that `dvc plots show` colours the scatter by mode.
    sweep_plots.mkdir(parents=True, exist_ok=True)
    for mode, rows in scored[scored["sweep"] == "engagement"].groupby("mode"):
        rows[PLOT_COLUMNS].to_csv(sweep_plots / f"{mode}.csv", index=False)
    # dvc.yaml names the plots; dvclive must not write a dvc.yaml or an experiment of its own.
    with Live(str(live_dir), dvcyaml=False, save_dvc_exp=False) as live:
        log_response_curves(live, scored)
    figures = {title: figure_file_name(title) for title in evaluation.figures}
    for title, figure in evaluation.figures.items():
        figure.save(out / figures[title])
    if evaluation.style_profiles is not None:
        (out / "style_profiles.json").write_text(json.dumps(evaluation.style_profiles, indent=2))
    report = evaluation.report | {"ground_truth_source": source}
    details = write_metrics(out / "details.json", report)
    write_metrics(metrics, headline_metrics(report))
    (out / "report.md").write_text(markdown_report(details, figures))


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--adapter", type=Path, required=True, help="adapter folder from the train stage")
    parser.add_argument("--regressor", type=Path, required=True, help="folder from the regressor stage")
    parser.add_argument("--features", type=Path, required=True, help="training table: the baseline's and creator's images")
    parser.add_argument("--out", type=Path, required=True, help="folder for images, figures, sweep.csv, details.json, report.md")
    parser.add_argument("--sweep-plots", type=Path, required=True,
                        help="folder of the engagement sweep's DVC plots: one CSV per mode")
    parser.add_argument("--live", type=Path, required=True,
                        help="dvclive folder: each sweep's mean score per target, by mode")
    parser.add_argument("--run-info", type=Path, required=True, help="JSON of this run's timing (not a metric)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    # 1. Params: the section, the model, and the ground truth the posts folder allows.
    params = load_section(EvaluateParams, "evaluate", args.params)
    model_params = load_params("model", args.params)
    ingest = load_params("ingest", args.params)
    ground_truth, source = resolve_ground_truth(params.ground_truth, ingest["posts_dir"],
                                                load_params("features", args.params), ingest["insights"])
    settings = evaluation_settings(params, int(model_params["resolution"]))

    # 2. The models: the pipeline with the adapter, the fp32 scoring VAE, the regressor.
    pipeline = load_pipeline(model_params["pretrained"], adapter_dir=args.adapter, sampler=params.sampler,
                             torch_dtype=PRECISIONS[params.precision])
    scoring_vae = load_vae(model_params["pretrained"], device=pipeline.device)
    regressor = load_regressor(args.regressor)

    # 3. Evaluate, then write what it found.
    training_table = pd.read_parquet(args.features, columns=TRAINING_COLUMNS)
    evaluation = evaluate_adapter(pipeline, scoring_vae, regressor, training_table, settings,
                                  images_dir=args.out / "images", ground_truth=ground_truth)
    write_outputs(evaluation, source, args.out, args.sweep_plots, args.live, args.metrics)
    # Outside the outputs: wall time differs between two runs with the same results.
    write_metrics(args.run_info, {"seconds": time.perf_counter() - started, "device": pipeline.device.type,
                                  "sampling_dtype": str(pipeline.unet.dtype).removeprefix("torch.")})


if __name__ == "__main__":
    run_stage(main)

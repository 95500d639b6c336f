"""Stage `evaluate`: the engagement (and time) sweep through EC-LoRA-T, the plain LoRA and the base model,
beside the retrieval baseline (the ceiling the data allows).

Every generated image is encoded by the pipeline's VAE and scored by the saved latent
regressor. On the demo feed (`evaluate.ground_truth: auto` finds the demo world's manifest in
`ingest.posts_dir`) it is also scored with the audience's hidden function, the creator's drift
(time sweep) and prompt adherence. Writes the images, the scored table, the sweep plot
CSV, labelled figures of both sweeps, every detail in `details.json`, a one-page `report.md`, and
the headline numbers in metrics/evaluate.json (keys documented in docs/metrics.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import AutoencoderKL
from dvclive import Live

from ec_lora_t.adapter.conditioning import MODES
from ec_lora_t.data.images import load_rgb_image, resize_and_crop
from ec_lora_t.demo.attribute_check import style_distance, style_profile
from ec_lora_t.demo.demo_data import read_demo_manifest
from ec_lora_t.demo.ground_truth import SCORE_COLUMNS, demo_scores
from ec_lora_t.evaluation.figures import sweep_figure
from ec_lora_t.evaluation.regressor import load_regressor
from ec_lora_t.evaluation.report import markdown_report
from ec_lora_t.evaluation.sweep import (
    MODES_WITHOUT_VECTOR,
    RETRIEVAL,
    generate_sweep,
    headline_metrics,
    latent_means,
    retrieval_plan,
    sweep_plan,
    sweep_report,
)
from ec_lora_t.generation import VectorSampling, load_pipeline, save_png
from ec_lora_t.models import diffusers_dtype, quiet_loading
from stages._common import load_params, load_section, run_stage, stage_parser, write_metrics
from stages.params.evaluate import EvaluateParams

PLOT_COLUMNS = [
    "mode", "prompt_index", "prompt", "seed", "target_engagement", "target_time", "predicted_engagement",
    "ground_truth_score",
]


def image_name(mode: str, row) -> str:
    """File of a row's image; rows that share an image (no vector in this mode) share the name."""
    if mode in MODES_WITHOUT_VECTOR:
        return f"{mode}/p{row.prompt_index:02d}_seed{row.seed}.png"
    return f"{mode}/p{row.prompt_index:02d}_seed{row.seed}_e{row.target_engagement:.2f}_t{row.target_time:.2f}.png"


def resolve_ground_truth(setting: str | bool, posts_dir: str) -> dict | None:
    """The demo manifest when ground truth applies, else None. `auto`: when the posts are the
    demo feed; True: required (an error elsewhere); False: never."""
    if setting is False:
        return None
    manifest = read_demo_manifest(posts_dir)
    if manifest is None and setting is not True:
        return None
    if manifest is None:
        raise SystemExit(f"evaluate.ground_truth is true but {posts_dir} is not the demo feed (no demo_world.json)")
    return manifest


def style_shift(creator_images: list, images: dict[str, list], profiles_path: Path) -> dict:
    """Distance of each mode's style profile to the creator's posts (demo world's checker)."""
    profiles = {"creator": style_profile(creator_images)}
    profiles |= {mode: style_profile(mode_images) for mode, mode_images in images.items()}
    profiles_path.write_text(json.dumps(profiles, indent=2))
    return {mode: style_distance(profiles[mode], profiles["creator"]) for mode in images}


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
    params = load_section(EvaluateParams, "evaluate", args.params)
    model_params = load_params("model", args.params)
    posts_dir = load_params("ingest", args.params)["posts_dir"]
    started = time.perf_counter()
    resolution = int(model_params["resolution"])
    manifest = resolve_ground_truth(params.ground_truth, posts_dir)

    # 1. The plan, the retrieval baseline's training images, and the scorers.
    plan = sweep_plan(
        params.prompts, params.seeds, params.engagement_targets, params.time, params.time_targets,
        params.fixed_engagement,
    )
    features = pd.read_parquet(args.features, columns=["image_path", "normalized_engagement", "normalized_time"])
    retrieval = retrieval_plan(plan, features[["normalized_engagement", "normalized_time"]].to_numpy(),
                               params.retrieval_k)
    # Training images at the model's resolution, as the generated images are and as the latents stage saw them.
    training_images = {
        index: resize_and_crop(load_rgb_image(features["image_path"].iloc[index], max_image_pixels=None), resolution)
        for index in sorted(set(retrieval["train_index"]) | (set(range(len(features))) if manifest else set()))
    }
    regressor = load_regressor(args.regressor)
    pipeline = load_pipeline(model_params["pretrained"], adapter_dir=args.adapter, sampler=params.sampler)
    anchor = params.vector_guidance_anchor
    sampling = VectorSampling(params.vector_guidance, params.vector_scale, None if anchor is None else tuple(anchor))

    # 2. Generate every mode.
    images = {
        mode: generate_sweep(
            pipeline, plan, mode, num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale, resolution=resolution, sampling=sampling,
            batch_size=params.batch_size,
        )
        for mode in MODES
    }
    images[RETRIEVAL] = [training_images[index] for index in retrieval["train_index"]]
    # The scoring VAE is loaded in fp32, as the latents stage loads it for the training images
    # (the pipeline's own VAE is fp16 on GPU).
    with quiet_loading():
        vae = AutoencoderKL.from_pretrained(model_params["pretrained"], subfolder="vae", **diffusers_dtype(torch.float32))
    vae.to(pipeline.device).eval().requires_grad_(False)

    # 3. Score, save images, assemble the table.
    tables, saved = [], set()
    for mode in (*MODES, RETRIEVAL):
        table = (retrieval.drop(columns="train_index").assign(prompt=None) if mode == RETRIEVAL else plan.copy())
        table.insert(0, "mode", mode)
        table["predicted_engagement"] = regressor.predict(
            latent_means(vae, images[mode], resolution, batch_size=params.batch_size)
        )
        if manifest is not None:
            scores = demo_scores(images[mode], list(table["prompt"]), manifest["audience"])
            table[SCORE_COLUMNS] = scores.to_numpy()
        else:
            table[SCORE_COLUMNS] = np.nan
        if mode == RETRIEVAL:
            table["image_path"] = [features["image_path"].iloc[i] for i in retrieval["train_index"]]
        else:
            paths = []
            for row, image in zip(table.itertuples(index=False), images[mode]):
                path = args.out / "images" / image_name(mode, row)
                if path not in saved:
                    metadata = {"mode": mode, "prompt": row.prompt, "seed": int(row.seed)}
                    if mode not in MODES_WITHOUT_VECTOR:
                        metadata["engagement_time"] = [float(row.target_engagement), float(row.target_time)]
                    saved.add(save_png(image, path, metadata))
                paths.append(str(path))
            table["image_path"] = paths
        tables.append(table)
    scored = pd.concat(tables, ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    scored.to_csv(args.out / "sweep.csv", index=False)
    # One file per mode, so that `dvc plots show` colours the scatter by mode.
    args.sweep_plots.mkdir(parents=True, exist_ok=True)
    engagement_rows = scored[scored["sweep"] == "engagement"]
    for mode, rows in engagement_rows.groupby("mode"):
        rows[PLOT_COLUMNS].to_csv(args.sweep_plots / f"{mode}.csv", index=False)
    # dvc.yaml names the plots; dvclive must not write a dvc.yaml or an experiment of its own.
    with Live(str(args.live), dvcyaml=False, save_dvc_exp=False) as live:
        log_response_curves(live, scored)

    # 4. Labelled figures: a row per (prompt, seed), the base model and plain LoRA beside
    #    EC-LoRA-T's targets, the scores under each image.
    generated = scored[scored["mode"] != RETRIEVAL]
    figures = {}
    for sweep in ("engagement", "time"):
        if (generated["sweep"] == sweep).any():
            name = f"{sweep}_sweep.png"
            sweep_figure(generated, images, sweep, params.prompts, params.seeds,
                         title=f"{sweep.capitalize()} sweep (rows: prompt x seed; truth: the audience's hidden score"
                               f"{' / creator drift' if sweep == 'time' else ''}, reg: the latent regressor)"
                         ).save(args.out / name)
            figures[f"{sweep.capitalize()} sweep"] = name

    # 5. Metrics: every detail in details.json, the headline in metrics/evaluate.json.
    report = sweep_report(scored, permutations=params.permutations)
    report["ground_truth_source"] = (
        {"used": True, "audience": manifest["audience"], "manifest": str(Path(posts_dir) / "demo_world.json")}
        if manifest else {"used": False, "reason": f"{posts_dir} is not the demo feed"
                          if params.ground_truth == "auto" else "evaluate.ground_truth is false"}
    )
    if manifest is not None:
        creator = [training_images[index] for index in range(len(features))]
        report["style"] = style_shift(creator, {mode: images[mode] for mode in MODES}, args.out / "style_profiles.json")
        report["verdict"]["style_shift"] = report["style"]["ec_lora"]["mean"] < report["style"]["base"]["mean"]
    report |= {
        "num_prompts": len(params.prompts),
        "num_seeds": len(params.seeds),
        "num_images": int(scored.loc[scored["mode"] != RETRIEVAL, "image_path"].nunique()),
    }
    details = write_metrics(args.out / "details.json", report)
    write_metrics(args.metrics, headline_metrics(report))
    (args.out / "report.md").write_text(markdown_report(details, figures))
    # Outside the outputs: wall time differs between two runs with the same results.
    write_metrics(args.run_info, {"seconds": time.perf_counter() - started})


if __name__ == "__main__":
    run_stage(main)

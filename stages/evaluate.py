"""Stage `evaluate`: the engagement (and time) sweep through EC-LoRA-T, the plain LoRA and the base model.

Every generated image is encoded by the pipeline's VAE and scored by the saved latent
regressor; on the embedded default (`evaluate.ground_truth: true`) also by the demo world's
hidden engagement function. Writes the images, a grid, the scored table, the sweep plot CSV
and metrics/evaluate.json (keys documented in docs/metrics.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch
from diffusers import AutoencoderKL

from ec_lora_t.adapter.conditioning import MODES
from ec_lora_t.data.images import load_rgb_image
from ec_lora_t.demo.attribute_check import style_distance, style_profile
from ec_lora_t.demo.world import engagement_appeal
from ec_lora_t.evaluation.regressor import load_regressor
from ec_lora_t.evaluation.sweep import (
    MODES_WITHOUT_VECTOR,
    generate_sweep,
    image_grid,
    latent_means,
    sweep_plan,
    sweep_report,
)
from ec_lora_t.generation import load_pipeline, save_png
from stages._common import load_params, stage_parser, write_metrics

PARAM_KEYS = (
    "prompts", "seeds", "engagement_targets", "time", "time_targets", "fixed_engagement", "num_inference_steps",
    "guidance_scale", "permutations", "ground_truth",
)
PLOT_COLUMNS = [
    "mode", "prompt_index", "prompt", "seed", "target_engagement", "target_time", "predicted_engagement",
    "ground_truth_score",
]


def image_name(mode: str, row: pd.Series) -> str:
    """File of a row's image; rows that share an image (no vector in this mode) share the name."""
    if mode in MODES_WITHOUT_VECTOR:
        return f"{mode}/p{row.prompt_index:02d}_seed{row.seed}.png"
    return f"{mode}/p{row.prompt_index:02d}_seed{row.seed}_e{row.target_engagement:.2f}_t{row.target_time:.2f}.png"


def style_shift(features: Path, images: dict[str, list], resolution: int, profiles_path: Path) -> dict:
    """Distance of each mode's style profile to the creator's posts (demo world's checker).

    The creator's profile is read off the training images at the model's resolution, where
    the generated images are read too.
    """
    creator_images = [
        load_rgb_image(path, max_image_pixels=None).resize((resolution, resolution))
        for path in pd.read_parquet(features, columns=["image_path"])["image_path"]
    ]
    profiles = {"creator": style_profile(creator_images)}
    profiles |= {mode: style_profile(mode_images) for mode, mode_images in images.items()}
    profiles_path.write_text(json.dumps(profiles, indent=2))
    return {mode: style_distance(profiles[mode], profiles["creator"]) for mode in images}


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--adapter", type=Path, required=True, help="adapter folder from the train stage")
    parser.add_argument("--regressor", type=Path, required=True, help="folder from the regressor stage")
    parser.add_argument("--out", type=Path, required=True, help="folder for images, grid.png and sweep.csv")
    parser.add_argument("--sweep-plot", type=Path, required=True, help="CSV of the engagement sweep (DVC plot)")
    parser.add_argument("--features", type=Path, help="training table: the creator's images for the style check")
    args = parser.parse_args(argv)
    params = load_params("evaluate", args.params)
    model_params = load_params("model", args.params)
    missing = [key for key in PARAM_KEYS if key not in params]
    if missing:
        raise KeyError(f"params.yaml: section 'evaluate' lacks {missing}")
    started = time.perf_counter()

    # 1. The plan and the scorers.
    plan = sweep_plan(
        params["prompts"], params["seeds"], params["engagement_targets"], params["time"],
        params["time_targets"], params["fixed_engagement"],
    )
    regressor = load_regressor(args.regressor)
    resolution = int(model_params["resolution"])
    pipeline = load_pipeline(model_params["pretrained"], adapter_dir=args.adapter)

    # 2. Generate every mode.
    images = {
        mode: generate_sweep(
            pipeline, plan, mode,
            num_inference_steps=int(params["num_inference_steps"]),
            guidance_scale=float(params["guidance_scale"]),
            resolution=resolution,
        )
        for mode in MODES
    }
    # The scoring VAE is loaded in fp32, as the latents stage loads it for the training images
    # (the pipeline's own VAE is fp16 on GPU).
    vae = AutoencoderKL.from_pretrained(model_params["pretrained"], subfolder="vae", torch_dtype=torch.float32)
    vae.to(pipeline.device).eval().requires_grad_(False)

    # 3. Score, save images, assemble the table.
    tables, saved = [], set()
    for mode in MODES:
        table = plan.copy()
        table.insert(0, "mode", mode)
        table["predicted_engagement"] = regressor.predict(latent_means(vae, images[mode], resolution))
        table["ground_truth_score"] = (
            [engagement_appeal(image) for image in images[mode]] if params["ground_truth"] else float("nan")
        )
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
    args.sweep_plot.parent.mkdir(parents=True, exist_ok=True)
    scored.loc[scored["sweep"] == "engagement", PLOT_COLUMNS].to_csv(args.sweep_plot, index=False)

    # 4. Grid of the EC-LoRA-T engagement sweep: a row per (prompt, seed), a column per target.
    grid_rows = plan[plan["sweep"] == "engagement"]
    seed_position = grid_rows["seed"].map({seed: i for i, seed in enumerate(params["seeds"])})
    grid_rows = grid_rows.assign(seed_position=seed_position).sort_values(
        ["prompt_index", "seed_position", "target_engagement"]
    )
    num_columns = grid_rows["target_engagement"].nunique()
    image_grid(
        [images["ec_lora"][position] for position in grid_rows.index], len(grid_rows) // num_columns, num_columns
    ).save(args.out / "grid.png")

    # 5. Metrics.
    report = sweep_report(scored, permutations=int(params["permutations"]))
    if params["ground_truth"] and args.features is not None:
        report["style"] = style_shift(args.features, images, resolution, args.out / "style_profiles.json")
        report["verdict"]["style_shift"] = report["style"]["ec_lora"]["mean"] < report["style"]["base"]["mean"]
    write_metrics(
        args.metrics,
        {
            **report,
            "num_prompts": len(params["prompts"]),
            "num_seeds": len(params["seeds"]),
            "num_images": int(scored["image_path"].nunique()),
            "seconds": time.perf_counter() - started,
        },
    )


if __name__ == "__main__":
    main()

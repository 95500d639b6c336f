"""How often the base model draws what the prompt names (issue 6's quality bar: >= 80%).

Generates images for prompts that name a scene, a lighting and an outfit colour, reads those
attributes back from the pixels (`ec_lora_t.demo.attribute_check`) and reports the match rates,
next to two references: the world's own renders of the same attributes (how right the checker
is) and the same generated images scored against shuffled prompts (the chance level).

    python benchmarks/base_model_quality.py --model models/ec-lora-t-base --out /tmp/quality

Writes `quality.json`, `samples.csv` (prompt, expected and read attributes per image),
`sample_grid.png` (generated) and `world_grid.png` (rendered, same attributes and layout).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from ec_lora_t.demo import attribute_check, world

# Grid layout: a row per (scene, lighting), a column per outfit colour.
GRID_ROWS = [(scene, lighting) for scene in world.SCENES for lighting in ("day", "night")]
GRID_COLUMNS = tuple(world.OUTFIT_COLOURS)
GRID_CELL = 96  # px per image in the grid (32 px upscaled 3x, nearest)


def full_prompt_attributes(count: int, seed: int) -> list[world.SceneAttributes]:
    """Attributes drawn uniformly; their caption names scene, lighting (day by omission) and colour."""
    rng = np.random.default_rng(seed)
    return [world.sample_attributes(rng) for _ in range(count)]


def short_prompts(count: int, seed: int) -> list[str]:
    """Prompts naming one or two attributes, with 'person' and 'outfit' for the rest."""
    rng = np.random.default_rng(seed + 1)
    prompts = []
    for index in range(count):
        colour = str(rng.choice(list(world.OUTFIT_COLOURS)))
        scene = str(rng.choice(world.SCENES))
        lighting = str(rng.choice(world.LIGHTING))
        article = "an" if colour == "orange" else "a"
        prompts.append([
            f"a person in {article} {colour} outfit",
            f"a person {world.SCENE_PHRASES[scene]}{world.LIGHTING_PHRASES[lighting] or ' in daylight'}",
            f"a person in {article} {colour} outfit {world.SCENE_PHRASES[scene]}",
        ][index % 3])
    return prompts


def grid_attributes(seed: int) -> list[world.SceneAttributes]:
    rng = np.random.default_rng(seed + 2)
    return [
        replace(world.sample_attributes(rng), scene=scene, lighting=lighting, outfit_colour=colour)
        for scene, lighting in GRID_ROWS
        for colour in GRID_COLUMNS
    ]


def generate(pipeline, prompts: list[str], seed: int, steps: int, guidance: float, resolution: int,
             batch_size: int) -> list[Image.Image]:
    images = []
    device = pipeline.device
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator(device).manual_seed(seed + start + offset) for offset in range(len(batch))]
        images += pipeline(batch, num_inference_steps=steps, guidance_scale=guidance, height=resolution,
                           width=resolution, generator=generators).images
    return images


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * GRID_CELL, rows * GRID_CELL), "white")
    for index, image in enumerate(images):
        cell = image.resize((GRID_CELL, GRID_CELL), Image.Resampling.NEAREST)
        canvas.paste(cell, ((index % columns) * GRID_CELL, (index // columns) * GRID_CELL))
    return canvas


def render_reference(attributes: list[world.SceneAttributes], resolution: int, seed: int) -> list[Image.Image]:
    """The world's renders at 64 px, resized to the model's resolution as the pipeline does."""
    return [
        world.render(item, size=64, seed=seed + index).resize((resolution, resolution), Image.Resampling.BILINEAR)
        for index, item in enumerate(attributes)
    ]


def expected_of(attributes: world.SceneAttributes) -> dict[str, str]:
    return {name: getattr(attributes, name) for name in attribute_check.CHECKED_ATTRIBUTES}


def measure(model: str, out: Path, prompts: int, seed: int, device: str, steps: int, guidance: float,
            scheduler: str, batch_size: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    pipeline = StableDiffusionPipeline.from_pretrained(model).to(device)  # fp32: the folder asks for it
    pipeline.set_progress_bar_config(disable=True)
    if scheduler == "ddim":
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    resolution = pipeline.vae.config.sample_size
    started = time.perf_counter()

    full = full_prompt_attributes(prompts, seed)
    full_prompts = [item.caption() for item in full]
    full_images = generate(pipeline, full_prompts, seed, steps, guidance, resolution, batch_size)
    seconds_per_image = (time.perf_counter() - started) / len(full_prompts)
    full_expected = [expected_of(item) for item in full]
    shuffled = [full_expected[index] for index in np.random.default_rng(seed + 3).permutation(len(full_expected))]

    short = short_prompts(prompts, seed)
    short_images = generate(pipeline, short, seed + 100000, steps, guidance, resolution, batch_size)

    layout = grid_attributes(seed)
    grid_images = generate(pipeline, [item.caption() for item in layout], seed + 200000, steps, guidance,
                           resolution, batch_size)
    grid(grid_images, len(GRID_COLUMNS)).save(out / "sample_grid.png")
    grid(render_reference(layout, resolution, seed), len(GRID_COLUMNS)).save(out / "world_grid.png")

    report = {
        "model": str(model),
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "scheduler": type(pipeline.scheduler).__name__,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "resolution": resolution,
        "prompts": prompts,
        "seconds_per_image_batched": seconds_per_image,
        "full_prompts": attribute_check.score_images(full_images, full_expected),
        "short_prompts": attribute_check.score_prompts(short_images, short),
        "grid_prompts": attribute_check.score_images(grid_images, [expected_of(item) for item in layout]),
        "chance_shuffled_prompts": attribute_check.score_images(full_images, shuffled),
        "checker_on_world_renders": attribute_check.score_images(
            render_reference(full, resolution, seed), full_expected),
        "style_profile_full_prompts": attribute_check.style_profile(full_images),
    }
    with open(out / "samples.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt"] + [f"expected_{n}" for n in attribute_check.CHECKED_ATTRIBUTES]
                        + [f"read_{n}" for n in attribute_check.CHECKED_ATTRIBUTES])
        for prompt, expected, image in zip(full_prompts, full_expected, full_images):
            read = attribute_check.read_attributes(image)
            writer.writerow([prompt] + [expected[n] for n in attribute_check.CHECKED_ATTRIBUTES]
                            + [read[n] for n in attribute_check.CHECKED_ATTRIBUTES])
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/ec-lora-t-base")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=240, help="prompts per prompt set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="inference steps (params.yaml evaluate)")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance scale (params.yaml evaluate)")
    parser.add_argument("--scheduler", choices=("saved", "ddim"), default="saved",
                        help="the folder's scheduler (DDPM) or DDIM with the same configuration")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    report = measure(args.model, args.out, args.prompts, args.seed, args.device, args.steps, args.guidance,
                     args.scheduler, args.batch_size)
    summary = {key: report[key] for key in ("scheduler", "full_prompts", "short_prompts", "grid_prompts",
                                            "chance_shuffled_prompts", "checker_on_world_renders")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""Figures a person can read: the sweep as a labelled grid of upscaled thumbnails.

Rows are (prompt, seed); columns are the targets of EC-LoRA-T's sweep, with the base model's
and the plain LoRA's image (one per row: they ignore the vector) side by side on the left.
Each image is upscaled with nearest-neighbour (the model's pixels stay visible) and has its
scores written under it: the ground truth (demo only) and the regressor's prediction.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (110, 110, 110)


@dataclass(frozen=True)
class FigureLayout:
    scale: int = 3  # thumbnail upscaling factor (nearest-neighbour)
    label_width: int = 230  # px of the row label (prompt, seed)
    gap: int = 6  # px between columns
    text_height: int = 26  # px of the two score lines under a thumbnail
    header_height: int = 44  # px of the column titles
    title_height: int = 30  # px of the figure title


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _score_lines(row: pd.Series) -> list[str]:
    lines = []
    if "ground_truth_score" in row and pd.notna(row["ground_truth_score"]):
        lines.append(f"truth {row['ground_truth_score']:.2f}")
    if "time_ground_truth" in row and pd.notna(row.get("time_ground_truth")) and row.get("sweep") == "time":
        lines[-1:] = [f"drift {row['time_ground_truth']:.2f}"]
    lines.append(f"reg {row['predicted_engagement']:.2f}")
    return lines


def sweep_figure(
    table: pd.DataFrame,
    images: dict[str, Sequence[Image.Image]],
    sweep: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    title: str,
    layout: FigureLayout = FigureLayout(),
) -> Image.Image:
    """The labelled grid of one sweep ("engagement" or "time").

    `table` is the scored sweep table of the generating modes (mode, sweep, prompt_index, seed,
    target_engagement, target_time, predicted_engagement, optional ground truth columns), in
    the order of `images[mode]` (one image per row of that mode).
    """
    target_column = "target_engagement" if sweep == "engagement" else "target_time"
    rows = table.assign(position=table.groupby("mode").cumcount())
    rows = rows[rows["sweep"] == sweep]
    targets = sorted(rows[target_column].unique())
    side_modes = [mode for mode in ("base", "plain_lora") if mode in images]
    thumb = rows.pipe(lambda r: images["ec_lora"][int(r.iloc[0]["position"])]).width * layout.scale
    cell_width, cell_height = thumb + layout.gap, thumb + layout.text_height
    columns = len(side_modes) + len(targets)
    width = layout.label_width + columns * cell_width + layout.gap
    height = layout.title_height + layout.header_height + len(prompts) * len(seeds) * cell_height
    figure = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    small, large = _font(11), _font(14)
    draw.text((layout.gap, 6), title, fill=INK, font=large)

    # Column titles: the reference modes, then the targets of EC-LoRA-T's sweep.
    top = layout.title_height
    names = {"base": "base model", "plain_lora": "plain LoRA"}
    target_name = "engagement" if sweep == "engagement" else "time"
    for column in range(columns):
        x = layout.label_width + column * cell_width
        if column < len(side_modes):
            lines = [names[side_modes[column]], "(no vector)"]
        else:
            lines = ["EC-LoRA-T", f"{target_name} {targets[column - len(side_modes)]:.2f}"]
        for index, line in enumerate(lines):
            draw.text((x, top + 4 + 16 * index), line, fill=INK if index == 0 else MUTED, font=small)

    # One row per (prompt, seed).
    for prompt_index, prompt in enumerate(prompts):
        for seed_index, seed in enumerate(seeds):
            y = layout.title_height + layout.header_height + (prompt_index * len(seeds) + seed_index) * cell_height
            label = textwrap.wrap(prompt, 34)[:3] + [f"seed {seed}"]
            for index, line in enumerate(label):
                draw.text((layout.gap, y + 4 + 14 * index), line, fill=INK if index < len(label) - 1 else MUTED,
                          font=small)
            block = rows[(rows["prompt_index"] == prompt_index) & (rows["seed"] == seed)]
            cells = [(mode, block[block["mode"] == mode].iloc[0]) for mode in side_modes]
            ec_lora = block[block["mode"] == "ec_lora"].set_index(target_column)
            cells += [("ec_lora", ec_lora.loc[target]) for target in targets]
            for column, (mode, row) in enumerate(cells):
                x = layout.label_width + column * cell_width
                image = images[mode][int(row["position"])]
                figure.paste(image.resize((thumb, thumb), Image.Resampling.NEAREST), (x, y))
                for index, line in enumerate(_score_lines(row)):
                    draw.text((x, y + thumb + 1 + 12 * index), line, fill=MUTED, font=small)
    return figure

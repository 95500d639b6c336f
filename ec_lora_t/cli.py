"""The `ec-lora-t` command line. Each command only parses its options and calls one library function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="EC-LoRA-T: engagement- and time-conditioned LoRA for Stable Diffusion.", no_args_is_help=True)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option(help="Folder to write <shortcode>/img_XX.jpg + metadata.csv into.")] = Path("data/demo_posts"),
    num_posts: Annotated[int, typer.Option(help="Number of posts (carousels add images).")] = 200,
    image_size: Annotated[int, typer.Option(help="Side of the square images, px.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same feed.")] = 7,
) -> None:
    """Write the deterministic synthetic creator feed in the report's layout."""
    from ec_lora_t.demo_data import write_demo_posts

    summary = write_demo_posts(out, num_posts=num_posts, image_size=image_size, seed=seed)
    typer.echo(f"wrote {summary['posts']} posts ({summary['images']} images) to {out}")


@app.command("build-tiny-base")
def build_tiny_base(
    out: Annotated[Path, typer.Option(help="Folder to save the model in diffusers layout.")],
    seed: Annotated[int, typer.Option(help="Weight initialisation seed.")] = 0,
    resolution: Annotated[int, typer.Option(help="Image resolution the model is built for, px.")] = 32,
    fp16: Annotated[bool, typer.Option(help="Save the weights in fp16 (half the size).")] = False,
) -> None:
    """Build a tiny Stable Diffusion with random weights from configs (for tests and smoke runs)."""
    import torch

    from ec_lora_t.models import build_tiny_stable_diffusion

    save_dtype = torch.float16 if fp16 else torch.float32
    typer.echo(f"saved to {build_tiny_stable_diffusion(out, seed=seed, resolution=resolution, save_dtype=save_dtype)}")


if __name__ == "__main__":
    app()

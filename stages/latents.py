"""Stage `latents`: VAE latents of every image and text embeddings of every caption, cached for training."""

import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from ec_lora_t.data.images import load_rgb_image
from ec_lora_t.data.latents import build_latent_cache, generic_caption
from ec_lora_t.models import load_components
from stages._common import load_section, run_stage, stage_parser, write_metrics
from stages.params.latents import LatentsParams
from stages.params.model import ModelParams

INDEX_COLUMNS = ["shortcode", "image_index", "image_path", "normalized_engagement", "normalized_time"]


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--features", required=True, help="data/features/train.parquet")
    parser.add_argument("--out", required=True, help="latents.safetensors to write")
    parser.add_argument("--index", required=True, help="index.parquet: the row order of the tensors")
    args = parser.parse_args(argv)
    model_params = load_section(ModelParams, "model", args.params)
    params = load_section(LatentsParams, "latents", args.params)

    started = time.perf_counter()
    table = pd.read_parquet(args.features)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    components = load_components(model_params.pretrained, device=device)
    cache = build_latent_cache(
        components,
        # ingest already enforced the size limit; don't apply a second, different one here
        images=[load_rgb_image(path, max_image_pixels=None) for path in table["image_path"]],
        captions=table["full_caption"].tolist(),
        engagement_time=table[["normalized_engagement", "normalized_time"]].to_numpy(),
        resolution=model_params.resolution,
        batch_size=params.batch_size,
        generic_captions=[
            generic_caption(full, caption, season)
            for full, caption, season in zip(table["full_caption"], table["caption"], table["season"])
        ],
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(cache, args.out, metadata={"pretrained": str(model_params.pretrained)})
    table[INDEX_COLUMNS].to_parquet(args.index, index=False)
    write_metrics(
        args.metrics,
        {
            "images": len(table),
            "latent_shape": list(cache["latent_mean"].shape[1:]),
            "text_embedding_shape": list(cache["text_embeddings"].shape[1:]),
            "seconds": time.perf_counter() - started,
        },
    )


if __name__ == "__main__":
    run_stage(main)

"""Stage `latents`: VAE latents of every image and text embeddings of every caption, in shards.

python -m stages.latents --features data/features/train.parquet --out data/latents \
    --cache data/latent_cache --metrics metrics/latents.json --run-info data/run_info/latents.json

Writes `<out>/shard-NNNNN.safetensors` and `<out>/index.parquet` (format:
ec_lora_t.data.latent_shards). Images and captions already in --cache (by content hash and
text, per model and resolution) are not encoded again; the cache outlives the run.
"""

import resource
import time

import pandas as pd
import torch

from ec_lora_t.data.latent_shards import LatentShardWriter, write_shard_index
from ec_lora_t.data.latents import (
    EncodingStats,
    TensorCache,
    encode_feed,
    generic_caption,
    image_cache_namespace,
    text_cache_namespace,
)
from ec_lora_t.models import load_components
from stages._common import load_section, run_stage, stage_parser, write_metrics
from stages.params.latents import LatentsParams
from stages.params.model import ModelParams

INDEX_COLUMNS = [
    "shortcode", "image_index", "image_path", "image_sha256", "normalized_engagement", "normalized_time",
]


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--features", required=True, help="data/features/train.parquet")
    parser.add_argument("--out", required=True, help="folder for the shards and index.parquet")
    parser.add_argument("--cache", required=True, help="content cache folder (kept between runs)")
    parser.add_argument("--run-info", required=True, help="JSON of this run's timings and cache use (not a metric)")
    args = parser.parse_args(argv)
    model_params = load_section(ModelParams, "model", args.params)
    params = load_section(LatentsParams, "latents", args.params)
    pretrained, resolution = model_params.pretrained, model_params.resolution

    started = time.perf_counter()
    table = pd.read_parquet(args.features)
    if table.empty:
        raise SystemExit(f"latents: {args.features} has no rows")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    components = load_components(pretrained, device=device)
    stats = EncodingStats()
    writer = LatentShardWriter(
        args.out, params.shard_size, metadata={"pretrained": str(pretrained), "resolution": resolution}
    )
    batches = encode_feed(
        components,
        table["image_path"].tolist(),
        table["image_sha256"].tolist(),
        table["full_caption"].tolist(),
        [generic_caption(full, caption, season)
         for full, caption, season in zip(table["full_caption"], table["caption"], table["season"])],
        table[["normalized_engagement", "normalized_time"]].to_numpy(),
        resolution=resolution,
        image_cache=TensorCache(f"{args.cache}/{image_cache_namespace(pretrained, resolution)}"),
        text_cache=TensorCache(f"{args.cache}/{text_cache_namespace(pretrained)}"),
        batch_size=params.batch_size,
        stats=stats,
    )
    shapes = {}
    for batch in batches:
        writer.add(batch)
        shapes = {name: list(tensor.shape[1:]) for name, tensor in batch.items()}
    shards = writer.close()
    write_shard_index(args.out, table[INDEX_COLUMNS], writer.shard_size)

    write_metrics(
        args.metrics,
        {
            "images": len(table),
            "shards": len(shards),
            "latent_shape": shapes["latent_mean"],
            "text_embedding_shape": shapes["text_embeddings"],
        },
    )
    write_metrics(
        args.run_info,
        {
            "seconds": time.perf_counter() - started,
            "images_encoded": stats.images_encoded,
            "images_from_cache": stats.images_from_cache,
            "texts_encoded": stats.texts_encoded,
            "texts_from_cache": stats.texts_from_cache,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        },
    )


if __name__ == "__main__":
    run_stage(main)

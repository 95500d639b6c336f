"""Stage `train`: EC-LoRA layers + ECM trained from the cached latents (report 4.5, 4.6).

python -m stages.train --latents data/latents/latents.safetensors --out data/train/adapter \
    --checkpoints data/train/checkpoints --loss-plot data/plots/train_loss.csv --metrics metrics/train.json

Reads params sections `train` and `model` (pretrained). Resumes from the newest checkpoint
in --checkpoints when one from the same data and params exists.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from ec_lora_t.adapter import ECLoRAConfig
from ec_lora_t.models import load_components
from ec_lora_t.training.cache import load_latent_cache
from ec_lora_t.training.config import TrainingConfig
from ec_lora_t.training.loop import NonFiniteLossError, make_accelerator, train_ec_lora
from stages._common import load_params, stage_parser, write_metrics

LORA_KEYS = {
    "lora_rank": "rank",
    "lora_alpha": "alpha",
    "target_modules": "target_modules",
    "ecm_hidden_size": "ecm_hidden_size",
    "ecm_depth": "ecm_depth",
    "ecm_granularity": "ecm_granularity",
    "vector_embedding": "vector_embedding",
}
# Added after the report's setup: absent means the report's behaviour (ECLoRAConfig's default).
OPTIONAL_LORA_KEYS = {"ecm_granularity", "vector_embedding"}
TRAINING_KEYS = {
    "learning_rate", "ecm_learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "lr_warmup_ratio", "epochs", "batch_size", "gradient_accumulation_steps", "mixed_precision",
    "gradient_checkpointing", "seed", "checkpoints_total_limit", "caption_dropout", "vector_dropout", "snr_gamma",
    "engagement_balance", "shuffle_vectors",
}


def configs_from_params(params: dict[str, Any], source: str = "params.yaml") -> tuple[ECLoRAConfig, TrainingConfig]:
    """Split the `train` section into the adapter's config and the loop's config."""
    unknown = set(params) - set(LORA_KEYS) - TRAINING_KEYS
    if unknown:
        raise ValueError(f"{source}: unknown keys in section 'train': {sorted(unknown)}")
    missing = [key for key in LORA_KEYS if key not in params and key not in OPTIONAL_LORA_KEYS]
    if missing:
        raise ValueError(f"{source}: section 'train' lacks {missing}")
    lora_config = ECLoRAConfig(**{field: params[key] for key, field in LORA_KEYS.items() if key in params})
    training = TrainingConfig(**{key: params[key] for key in TRAINING_KEYS if key in params})
    return lora_config, training


def write_loss_plot(path: str | Path, losses: list[float]) -> None:
    """Loss per optimizer step for `dvc plots` (columns step, loss)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss"])
        writer.writerows((step, f"{loss:.6g}") for step, loss in enumerate(losses, start=1))


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--latents", required=True, help="latents.safetensors from the latents stage")
    parser.add_argument("--out", required=True, help="folder for the final adapter")
    parser.add_argument("--checkpoints", required=True, help="folder for per-epoch checkpoints")
    parser.add_argument("--loss-plot", required=True, help="CSV of loss per step")
    args = parser.parse_args(argv)

    params = load_params("train", args.params)
    pretrained = load_params("model", args.params)["pretrained"]
    lora_config, training = configs_from_params(params, source=args.params)
    cache = load_latent_cache(args.latents)
    # Only the UNet and the noise schedule are needed: latents and text are cached.
    components = load_components(pretrained)
    unet, noise_scheduler = components.unet, components.noise_scheduler
    del components

    try:
        result = train_ec_lora(
            make_accelerator(training), unet, noise_scheduler, cache, lora_config, training, args.checkpoints, adapter_dir=args.out
        )
    except NonFiniteLossError as error:
        raise SystemExit(f"stage train stopped: {error}") from error

    write_loss_plot(args.loss_plot, result.losses)
    last_epoch = result.losses[-math.ceil(len(result.losses) / result.epochs):]
    write_metrics(
        args.metrics,
        {
            "final_loss": result.final_loss,
            "final_epoch_mean_loss": sum(last_epoch) / len(last_epoch),
            "steps": result.steps,
            "epochs": result.epochs,
            "images_per_second": result.images_per_second,
            "peak_memory_mb": result.peak_memory_mb,
            "mixed_precision": result.mixed_precision,
            "device": result.device,
            "resumed_from_epoch": result.resumed_from_epoch,
            "num_images": result.num_images,
            "num_lora_layers": result.num_lora_layers,
            "trainable_parameters": result.trainable_parameters,
        },
    )


if __name__ == "__main__":
    main()

"""Stage `train`: EC-LoRA layers + ECM trained from the cached latents (report 4.5, 4.6).

python -m stages.train --latents data/latents/latents.safetensors --out data/train/adapter \
    --checkpoints data/train/checkpoints --loss-plot data/plots/train_loss.csv --metrics metrics/train.json

Reads params sections `train` and `model` (pretrained). An interrupted run resumes from its
newest usable checkpoint in its own folder `--checkpoints/<fingerprint>/` (same base model,
data, params and code); a finished run removed its checkpoints, so rerunning the stage
(`dvc repro -f train`) trains from scratch. See ec_lora_t/training/checkpoint.py.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ec_lora_t.adapter import ECLoRAConfig
from ec_lora_t.models import load_components
from ec_lora_t.training.cache import load_latent_cache
from ec_lora_t.training.config import TrainingConfig
from ec_lora_t.training.loop import NonFiniteLossError, make_accelerator, train_ec_lora
from stages._common import load_section, run_stage, stage_parser, write_metrics
from stages.params.model import ModelParams
from stages.params.train import TrainParams

# params key -> ECLoRAConfig field; every other key of the section is a TrainingConfig field.
LORA_KEYS = {
    "lora_rank": "rank",
    "lora_alpha": "alpha",
    "target_modules": "target_modules",
    "ecm_hidden_size": "ecm_hidden_size",
    "ecm_depth": "ecm_depth",
    "ecm_granularity": "ecm_granularity",
}


def configs_from_params(params: TrainParams) -> tuple[ECLoRAConfig, TrainingConfig]:
    """Split the checked `train` section into the adapter's config and the loop's config."""
    values = params.model_dump()
    lora_config = ECLoRAConfig(**{field: values.pop(key) for key, field in LORA_KEYS.items()})
    return lora_config, TrainingConfig(**values)


def write_loss_plot(path: str | Path, losses: list[float], grad_norms: list[float]) -> None:
    """Loss and gradient norm (before clipping) per optimizer step for `dvc plots` (columns step, loss, grad_norm)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "grad_norm"])
        writer.writerows(
            (step, f"{loss:.6g}", f"{norm:.6g}") for step, (loss, norm) in enumerate(zip(losses, grad_norms), start=1)
        )


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--latents", required=True, help="latents.safetensors from the latents stage")
    parser.add_argument("--out", required=True, help="folder for the final adapter")
    parser.add_argument("--checkpoints", required=True, help="folder for per-epoch checkpoints")
    parser.add_argument("--loss-plot", required=True, help="CSV of loss per step")
    args = parser.parse_args(argv)

    lora_config, training = configs_from_params(load_section(TrainParams, "train", args.params))
    pretrained = load_section(ModelParams, "model", args.params).pretrained
    cache = load_latent_cache(args.latents)
    # Only the UNet and the noise schedule are needed: latents and text are cached.
    components = load_components(pretrained)
    unet, noise_scheduler = components.unet, components.noise_scheduler
    del components

    accelerator = make_accelerator(training)
    try:
        result = train_ec_lora(accelerator, unet, noise_scheduler, cache, lora_config, training, args.checkpoints,
                               adapter_dir=args.out)
    except NonFiniteLossError as error:
        raise SystemExit(f"stage train stopped: {error}") from error
    if not accelerator.is_main_process:
        return  # the main process writes the outputs

    write_loss_plot(args.loss_plot, result.losses, result.grad_norms)
    last_epoch = result.losses[-math.ceil(len(result.losses) / result.epochs):]
    write_metrics(
        args.metrics,
        {
            "final_loss": result.final_loss,
            "final_epoch_mean_loss": sum(last_epoch) / len(last_epoch),
            "steps": result.steps,
            "epochs": result.epochs,
            # Gradient norm of LoRA + ECM before clipping, per optimizer step (loss plot column grad_norm).
            "max_grad_norm": result.max_grad_norm,
            "grad_norm_final": result.grad_norms[-1],
            "grad_norm_max": max(result.grad_norms),
            "clipped_steps": sum(norm > result.max_grad_norm for norm in result.grad_norms)
            if result.max_grad_norm is not None else 0,
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
    run_stage(main)

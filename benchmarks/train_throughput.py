"""Training throughput and peak memory of EC-LoRA-T vs plain LoRA at Stable Diffusion 1.5 shape.

An SD1.5-shaped UNet with random weights (built from its config: no hub access needed),
512 px images = 64x64 latents, batch 16, bf16, random (16, 77, 768) text embeddings. Both
runs use the training step of `ec_lora_t.training.objective` on the same injected UNet:
    ec_lora     the ECM computes a scale per layer and sample (the method)
    plain_lora  every dynamic scale fixed at 1, the ECM not run and not trained
Reports images/s and peak CUDA memory (or the process's peak RSS on a CPU) as JSON.

    python benchmarks/train_throughput.py --device cuda --steps 20 --warmup 5 --out bench.json
    python benchmarks/train_throughput.py --device cpu --tiny --steps 2 --warmup 1   # smoke check
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

# Run as a script from anywhere: the package lives one folder up (it may not be pip-installed).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import diffusers  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402

from ec_lora_t.adapter import ECLoRAConfig, add_ec_lora  # noqa: E402
from ec_lora_t.training.objective import diffusion_training_step  # noqa: E402
from ec_lora_t.training.precision import COMPUTE_DTYPES, peak_memory_mb  # noqa: E402

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (architecture keys).
SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# Same block types, narrow: for a CPU smoke check of this script.
TINY_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "sample_size": 8,
}
# SD1.5's scheduler/scheduler_config.json (training schedule).
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
VAE_DOWNSAMPLING = 8  # SD's VAE: 512 px -> 64 latent cells


def random_batch(batch_size: int, latent_size: int, text_width: int, device: torch.device, seed: int) -> dict:
    """A batch in the layout of the latents stage's cache (values random, shapes real)."""
    generator = torch.Generator(device).manual_seed(seed)
    shape = (batch_size, 4, latent_size, latent_size)
    return {
        "latent_mean": torch.randn(shape, generator=generator, device=device),
        "latent_std": 0.1 * torch.rand(shape, generator=generator, device=device),
        "text_embeddings": torch.randn(batch_size, 77, text_width, generator=generator, device=device),
        "engagement_time": torch.rand(batch_size, 2, generator=generator, device=device),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(accelerator, unet, adapter, ecm, scheduler, batch, mode: str, steps: int, warmup: int,
            learning_rate: float) -> dict:
    """Time `steps` optimizer steps after `warmup` untimed ones; LoRA (+ ECM) trained with AdamW."""
    device = accelerator.device
    trainable = adapter.lora_parameters() + (list(ecm.parameters()) if mode == "ec_lora" else [])
    optimizer = accelerator.prepare(torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=1e-2))
    generator = torch.Generator(device).manual_seed(0)
    losses = []

    def step() -> None:
        loss = diffusion_training_step(accelerator, unet, adapter, ecm, scheduler, batch, generator, mode=mode)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)

    for _ in range(warmup):  # allocator, cuDNN autotuning, AdamW state
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - started
    final_loss = losses[-1].item()
    if not all(torch.isfinite(torch.stack(losses))):
        raise RuntimeError(f"{mode}: non-finite loss during the benchmark")
    result = {
        "images_per_second": steps * batch["latent_mean"].shape[0] / elapsed,
        "seconds_per_step": elapsed / steps,
        "peak_memory_mb": peak_memory_mb(device),
        "final_loss": final_loss,
        "trained_parameters": sum(p.numel() for p in trainable),
    }
    del optimizer, losses
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (2 with --tiny)")
    parser.add_argument("--resolution", type=int, default=None, help="image px; default 512 (64 with --tiny)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                        help="default bf16 on CUDA, no on CPU")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=64)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--modes", default="plain_lora,ec_lora", help="comma-separated, run in this order")
    parser.add_argument("--tiny", action="store_true", help="a narrow UNet for a CPU smoke check")
    parser.add_argument("--out", default=None, help="JSON file to write (also printed)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    unet_config = TINY_UNET_CONFIG if args.tiny else SD15_UNET_CONFIG
    batch_size = args.batch_size or (2 if args.tiny else 16)
    resolution = args.resolution or (64 if args.tiny else 512)
    if resolution % VAE_DOWNSAMPLING:
        raise SystemExit(f"--resolution must be a multiple of {VAE_DOWNSAMPLING}")
    latent_size = resolution // VAE_DOWNSAMPLING
    mixed_precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"ec_lora", "plain_lora"}:
        raise SystemExit(f"--modes takes ec_lora and plain_lora, got {modes}")

    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
    torch.manual_seed(0)
    # Random weights built straight on the device in the compute dtype (no 3.4 GB fp32 copy on the host).
    with torch.device(accelerator.device):
        unet = UNet2DConditionModel(**unet_config)
    if mixed_precision != "no":
        unet.to(COMPUTE_DTYPES[mixed_precision])
    unet.requires_grad_(False)
    scheduler = DDPMScheduler(**SD15_SCHEDULER_CONFIG)
    lora_config = ECLoRAConfig(rank=args.rank, alpha=args.alpha)
    adapter = add_ec_lora(unet, lora_config, accelerator.device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet, ecm = accelerator.prepare(unet, adapter.ecm)
    unet.train()
    batch = random_batch(batch_size, latent_size, unet_config["cross_attention_dim"], accelerator.device, seed=1)

    results = {
        mode: measure(accelerator, unet, adapter, ecm, scheduler, batch, mode, args.steps, args.warmup, learning_rate=1e-4)
        for mode in modes
    }
    report = {
        "unet": "tiny" if args.tiny else "sd15",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "resolution": resolution,
        "latent_size": latent_size,
        "batch_size": batch_size,
        "mixed_precision": mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": args.steps,
        "warmup": args.warmup,
        "lora_rank": args.rank,
        "lora_alpha": args.alpha,
        "num_lora_layers": len(lora_config.layer_names),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "peak_memory_kind": "cuda_max_allocated_since_reset" if device.type == "cuda" else "process_peak_rss",
        "results": results,
    }
    if {"ec_lora", "plain_lora"} <= set(results):
        report["ec_lora_vs_plain_lora"] = {
            "throughput_ratio": results["ec_lora"]["images_per_second"] / results["plain_lora"]["images_per_second"],
            "peak_memory_ratio": results["ec_lora"]["peak_memory_mb"] / results["plain_lora"]["peak_memory_mb"],
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()

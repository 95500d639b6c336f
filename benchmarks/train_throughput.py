"""Speed at Stable Diffusion 1.5 shape, steady state, beside a static PEFT LoRA: one table.

Everything runs in one process on one device, so the figures compare:

1. `loop:ec_lora` - the real training loop (`ec_lora_t.training.loop.train_ec_lora`) with
   params.yaml's `train` settings (per-rank ECM gates, caption dropout, min-SNR, ...) on a
   synthetic latent cache of SD1.5 shape (64x64 latents, 77x768 text embeddings);
   `loop:plain_lora` - the same loop with the vector off (`train.conditioning: plain_lora`).
2. `step:ec_lora`, `step:plain_lora` - the training step alone on one resident batch (the
   microbenchmark: what the loop could reach).
3. `peft_anchor` - a static PEFT LoRA (`unet.add_adapter`) on the same targets, rank and batch,
   with the same noise step, in the same process.
4. `memory:batch4_checkpointing` - the loop at batch 4 with gradient checkpointing: peak memory.
5. `sample:*` - generation at 512 px through `ec_lora_t.generation` (an SD1.5-shaped pipeline with
   random weights and an adapter): images/s per sampler, with and without vector guidance.

Steady state: timing starts after `--warmup` optimizer steps (or one sampling batch), with CUDA
synchronised at both ends; peak memory is CUDA's max allocated since the reset.

    python benchmarks/train_throughput.py --out benchmarks/results/speed_h200.json
    python benchmarks/train_throughput.py --tiny --steps 4 --warmup 2   # CPU smoke check
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from ec_lora_t.adapter import ECLoRAConfig, add_ec_lora, save_adapter  # noqa: E402
from ec_lora_t.demo.tiny_model import SHIPPED_CLIP_TOKENIZER  # noqa: E402
from ec_lora_t.generation import VectorSampling, generate_images, load_pipeline  # noqa: E402
from ec_lora_t.training.cache import LatentCache  # noqa: E402
from ec_lora_t.training.config import TrainingConfig  # noqa: E402
from ec_lora_t.training.loop import make_accelerator, train_ec_lora  # noqa: E402
from ec_lora_t.training.objective import noisy_latents  # noqa: E402
from ec_lora_t.training.precision import COMPUTE_DTYPES  # noqa: E402
from stages.params.train import TrainParams, configs_from_params  # noqa: E402

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (architecture keys).
SD15_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# SD1.5's vae/config.json and a 12-layer 768-wide CLIP text encoder (text_encoder/config.json).
SD15_VAE_CONFIG = {
    "block_out_channels": [128, 256, 512, 512], "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}
SD15_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "clip_sample": False, "steps_offset": 1, "prediction_type": "epsilon",
}
# Same block types, narrow: a CPU smoke check of this script.
TINY_UNET_CONFIG = {
    **SD15_UNET_CONFIG, "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1, "cross_attention_dim": 32,
    "sample_size": 8,
}
TINY_VAE_CONFIG = {**SD15_VAE_CONFIG, "block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
                   "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "sample_size": 16}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def model_shapes(tiny: bool) -> tuple[dict, dict, dict, int]:
    """(UNet config, VAE config, text encoder sizes, pixel resolution): SD1.5's, or the narrow
    smoke-check model's; the resolution is the UNet's latent size times the VAE's downsampling."""
    unet_config, vae_config, text = ((TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT) if tiny
                                     else (SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT))
    return unet_config, vae_config, text, unet_config["sample_size"] * 2 ** (len(vae_config["block_out_channels"]) - 1)


def benchmark_setup(tiny: bool, batch_size: int | None) -> tuple[torch.device, dict, dict, dict, int, int]:
    """(device, UNet config, VAE config, text sizes, resolution, batch) of a benchmark run: CUDA
    when there is one (TF32 matmuls allowed), the shapes of `model_shapes`, batch 32 (tiny: 2)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return (device, *model_shapes(tiny), batch_size or (2 if tiny else 32))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def synthetic_cache(num_images: int, latent_size: int, text_width: int, seed: int = 0) -> LatentCache:
    """A latent cache of real shapes and random values (the latents stage's layout)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (num_images, 4, latent_size, latent_size)
    text = torch.randn(num_images, 77, text_width, generator=generator)
    return LatentCache(
        latent_mean=torch.randn(shape, generator=generator), latent_std=0.1 * torch.rand(shape, generator=generator),
        text_embeddings=text, engagement_time=torch.rand(num_images, 2, generator=generator),
        generic_text_embeddings=text[torch.randint(4, (num_images,), generator=generator)],  # a few seasons
    )


# The synthetic cache holds this many batches: the loop checkpoints at every epoch's end.
STEPS_PER_EPOCH = 8


def synthetic_loop_data(batch_size: int, steps: int, warmup: int, unet_config: dict) -> tuple[LatentCache, int]:
    """A synthetic cache of `STEPS_PER_EPOCH` batches, and the epochs that give `warmup` + `steps` steps."""
    cache = synthetic_cache(batch_size * STEPS_PER_EPOCH, unet_config["sample_size"], unet_config["cross_attention_dim"])
    return cache, -(-(steps + warmup) // STEPS_PER_EPOCH)


class StepClock:
    """`on_step` callback: images/s between the end of step `warmup` and the last step, synchronised."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.started = self.first_images = self.last = self.last_images = None
        self.created = time.perf_counter()

    def __call__(self, step: int, loss: float, **info) -> None:
        # One line per step on stderr: a call cut off at its limit still shows how far warm-up got.
        print(f"loop step {step} at {time.perf_counter() - self.created:.1f} s", file=sys.stderr, flush=True)
        if step == self.warmup:
            synchronize(self.device)
            self.started, self.first_images = time.perf_counter(), info["images_seen"]
        elif step > self.warmup:
            synchronize(self.device)
            self.last, self.last_images = time.perf_counter(), info["images_seen"]

    @property
    def images_per_second(self) -> float:
        return (self.last_images - self.first_images) / (self.last - self.started)


def fresh_accelerator_state() -> None:
    """accelerate's state is process-wide: without a reset a later Accelerator keeps the first
    one's precision and dynamo backend (a compiled run would follow an eager one uncompiled)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def measure_loop(unet_config, scheduler, cache, lora_config, training, device, warmup) -> dict:
    reset_memory(device)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config)
    clock = StepClock(device, warmup)
    fresh_accelerator_state()
    with tempfile.TemporaryDirectory() as checkpoints:
        result = train_ec_lora(make_accelerator(training), unet, scheduler, cache, lora_config, training,
                               checkpoints, on_step=clock, log=lambda message: None)
    # The loop's own steady rate (after its warm-up, checkpoint saving left out) beside this clock's,
    # and what compiling cost: seconds to the steady state, graphs compiled after it (0: no recompiles).
    figures = {"images_per_second": clock.images_per_second, "whole_run_images_per_second": result.images_per_second,
               "loop_steady_images_per_second": result.steady_images_per_second,
               "peak_memory_gb": peak_gb(device), "steps": result.steps, "final_loss": result.final_loss,
               "compile": training.compile, **result.extra}
    return figures


def measure_step(unet, step, batch_size: int, steps: int, warmup: int, device) -> dict:
    """Images/s of `step()` (one optimizer step on a resident batch), steady state."""
    for _ in range(warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return {"images_per_second": steps * batch_size / (time.perf_counter() - started), "peak_memory_gb": peak_gb(device)}


def step_accelerator(device, compile: bool):
    """As the train loop's: bf16 autocast on a GPU around the prepared UNet's forward and, with
    `compile`, the UNet compiled (by accelerate's dynamo backend here: only the UNet is prepared,
    so it compiles what the loop's own `torch.compile` does)."""
    from accelerate import Accelerator

    fresh_accelerator_state()
    return Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type == "cpu",
                       dynamo_backend="inductor" if compile else "no")


def measure_steps(unet_config, scheduler, lora_config, training, batch, device, steps, warmup,
                  modes=("ec_lora", "plain_lora", "peft_anchor"), compile: bool = False,
                  channels_last: bool = False) -> dict:
    """The isolated training step of EC-LoRA-T and plain LoRA, and the PEFT anchor, each on a UNet
    prepared by accelerate as the loop's is (`channels_last`: its weights channels-last, as the
    loop's with `train.channels_last`)."""
    from peft import LoraConfig

    from ec_lora_t.training.objective import diffusion_training_step

    layout = torch.channels_last if channels_last else torch.contiguous_format

    dtype = COMPUTE_DTYPES["bf16" if device.type == "cuda" else "no"]
    results = {}
    for mode in [mode for mode in ("ec_lora", "plain_lora") if mode in modes]:
        reset_memory(device)
        torch.manual_seed(0)
        with torch.device(device):
            unet = UNet2DConditionModel(**unet_config).to(dtype, memory_format=layout).requires_grad_(False)
        fresh_config = ECLoRAConfig(rank=lora_config.rank, alpha=lora_config.alpha,
                                    target_modules=lora_config.target_modules,
                                    ecm_granularity=lora_config.ecm_granularity)
        adapter = add_ec_lora(unet, fresh_config, device)
        accelerator = step_accelerator(device, compile)
        runner = accelerator.prepare_model(unet)
        trainable = adapter.lora_parameters() + (list(adapter.ecm.parameters()) if mode == "ec_lora" else [])
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
        generator = torch.Generator(device).manual_seed(0)

        def step() -> None:
            diffusion_training_step(accelerator, runner, adapter, adapter.ecm, scheduler, batch, generator, mode=mode,
                                    caption_dropout=training.caption_dropout, snr_gamma=training.snr_gamma)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        results[f"step:{mode}"] = measure_step(unet, step, batch["latent_mean"].shape[0], steps, warmup, device)
    if "peft_anchor" not in modes:
        return results
    # The anchor: diffusers' own PEFT integration, the same targets, rank and alpha.
    reset_memory(device)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config).to(dtype, memory_format=layout).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=lora_config.rank, lora_alpha=lora_config.alpha,
                                target_modules=list(lora_config.target_modules), init_lora_weights="gaussian"))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.float()  # fp32 master weights, as ours
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator(device).manual_seed(0)
    runner = step_accelerator(device, compile).prepare_model(unet)

    def peft_step() -> None:
        noisy = noisy_latents(batch["latent_mean"], batch["latent_std"], scheduler, generator)
        prediction = runner(noisy.noisy_latents.to(dtype), noisy.timesteps,
                            encoder_hidden_states=batch["text_embeddings"].to(dtype), return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(prediction.float(), noisy.target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    results["peft_anchor"] = measure_step(unet, peft_step, batch["latent_mean"].shape[0], steps, warmup, device)
    return results


def build_pipeline_folder(out_dir: Path, unet_config: dict, vae_config: dict, text: dict, device) -> Path:
    """A random-weight SD1.5-shaped pipeline in diffusers layout (loaded through from_pretrained),
    built on `device` and saved in fp16 on a GPU (half the size; generation loads it in its sampling
    dtype, `ec_lora_t.generation.default_sampling_dtype`)."""
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED_CLIP_TOKENIZER)
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **text))
        pipeline = StableDiffusionPipeline(
            vae=AutoencoderKL(**vae_config), text_encoder=text_encoder, tokenizer=tokenizer,
            unet=UNet2DConditionModel(**unet_config), scheduler=DDPMScheduler(**SD15_SCHEDULER_CONFIG),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    if device.type == "cuda":
        pipeline.to(torch.float16)
    pipeline.save_pretrained(out_dir)
    unet = pipeline.unet
    adapter = add_ec_lora(unet, ECLoRAConfig(rank=16, alpha=64, ecm_granularity="rank"))
    with torch.no_grad():
        for layer in adapter.layers:
            layer.lora_B.weight.normal_(std=1e-3)
        # An ECM as after training, each vector with its own scales: at its init (output weights 0,
        # bias 1) every vector gives scale 1, and the sampling pipeline would fold a batch of
        # "mixed" vectors as one run of rows (SAMPLING_ROWS in speed_options.py).
        adapter.ecm.mlp[-1].weight.normal_(std=0.1)
    save_adapter(out_dir / "adapter", adapter)
    return out_dir


def measure_sampling(folder: Path, device, resolution: int, batch_size: int, steps: int) -> dict:
    results = {}
    prompts = [f"a photo of a person in a city, take {index}" for index in range(batch_size)]
    vectors = torch.tensor([[index % 5 / 4, 0.5] for index in range(batch_size)])  # 5 vectors per prompt set
    seeds = list(range(batch_size))
    for sampler, vector_guidance in (("dpmsolver++", 1.0), ("dpmsolver++", 3.0)):
        pipeline = load_pipeline(str(folder), folder / "adapter", device=device, sampler=sampler)
        call = dict(num_inference_steps=steps, guidance_scale=5.0, batch_size=batch_size, height=resolution,
                    width=resolution, sampling=VectorSampling(vector_guidance=vector_guidance))
        generate_images(pipeline, prompts, vectors, seeds, **call)  # warm-up batch
        synchronize(device)
        started = time.perf_counter()
        for _ in range(2):
            generate_images(pipeline, prompts, vectors, seeds, **call)
        synchronize(device)
        name = f"sample:{sampler}_{steps}steps" + ("_vector_guidance" if vector_guidance != 1.0 else "")
        results[name] = {"images_per_second": 2 * batch_size / (time.perf_counter() - started),
                         "peak_memory_gb": peak_gb(device)}
        reset_memory(device)
    return results


def markdown_table(report: dict) -> str:
    lines = ["| run | batch | images/s | peak memory (GB) |", "|---|---|---|---|"]
    for name, figures in report["results"].items():
        memory = figures.get("peak_memory_gb")
        lines.append(f"| {name} | {figures.get('batch_size', report['batch_size'])} | "
                     f"{figures['images_per_second']:.1f} | {'-' if memory is None else f'{memory:.1f}'} |")
    return "\n".join(lines)


# Inductor settings (torch._inductor.config) a run may compile under. `tuned`: diffusers' guide to
# fast Stable Diffusion inference; SD1.5's proj_in / proj_out are 1x1 convolutions, which run faster
# as matmuls, and coordinate descent tunes each generated kernel's launch parameters (longer
# compilation, cached on disk). `mm1x1`: the 1x1 convolutions as matmuls alone (no longer to compile).
# `cudagraphs`: what torch.compile's mode "reduce-overhead" sets (`torch._inductor.list_mode_options`):
# each compiled graph replayed as one CUDA graph, no kernel-by-kernel launches (CUDA only).
# `autotune`: the template half of torch.compile's mode "max-autotune-no-cudagraphs": each matmul and
# convolution timed against Triton templates at compile time, the fastest kept; without that mode's
# coordinate descent, whose compile did not end within a call (tuned, above).
INDUCTOR_TUNING = {
    "tuned": {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False,
              "coordinate_descent_check_all_directions": True},
    "mm1x1": {"conv_1x1_as_mm": True},
    "cudagraphs": {"triton.cudagraphs": True},
    "autotune": {"max_autotune": True},
}


def inductor_context(name: str | None):
    """Compilation happens at a compiled module's first call, so the settings must hold around
    every call (later calls reuse the graph compiled under them)."""
    if name is None:
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(INDUCTOR_TUNING[name])


def sdpa_context(name: str | None):
    """Attention under `name`'s backend first ("cudnn" or "flash"), for every call inside; None: PyTorch's
    own choice. torch.compile bakes the backend chosen at tracing into its graph, so like the Inductor
    settings the context must hold around a compiled module's first call."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The named backend first, the others after it, so a layer it has no kernel for falls back
    # to the next. With cuDNN alone, compiled sampling stopped inside scaled_dot_product_attention
    # on an H200 (2026-12-05); the guess then: SD1.5's 1280-wide blocks have 8 heads of 160, which that
    # cuDNN did not take. cuDNN 9.19 (torch 2.11) runs them, and is PyTorch's own first choice on an H100
    # (docs/benchmarks.md).
    preferred = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]
    others = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel([preferred] + [backend for backend in others if backend != preferred], set_priority=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 (2 with --tiny)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--parts", default="loop,step,memory,sample",
                        help="comma-separated subset; anchor: the PEFT anchor alone (step includes it); "
                             "loop:ec_lora or loop:plain_lora: one of the loop's two runs")
    parser.add_argument("--tiny", action="store_true", help="a narrow model for a CPU smoke check")
    parser.add_argument("--compile", choices=("params", "auto", "true", "false"), default="params",
                        help="train.compile for every part: params.yaml's (default), or this value")
    parser.add_argument("--channels-last", choices=("params", "auto", "true", "false"), default="params",
                        help="train.channels_last for every part: params.yaml's (default), or this value")
    parser.add_argument("--cudnn-benchmark", choices=("true", "false"), default="false",
                        help="torch.backends.cudnn.benchmark for the whole process (every part): cuDNN times its "
                             "convolution algorithms for each new shape and keeps the fastest")
    parser.add_argument("--inductor", choices=("none", *INDUCTOR_TUNING), default="none",
                        help="compile every compiled part under these Inductor settings (INDUCTOR_TUNING)")
    parser.add_argument("--sdpa", choices=("default", "cudnn", "flash"), default="default",
                        help="every part's attention: PyTorch's own choice, or this backend first (sdpa_context)")
    parser.add_argument("--out", type=Path, default=None, help="JSON to write (a .md table beside it)")
    args = parser.parse_args(argv)
    with inductor_context(None if args.inductor == "none" else args.inductor), \
            sdpa_context(None if args.sdpa == "default" else args.sdpa):
        report = run_parts(args)
    text_report = json.dumps(report, indent=2, default=str)
    print(text_report)
    print(markdown_table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text_report + "\n")
        args.out.with_suffix(".md").write_text(markdown_table(report) + "\n")
    return report


def machine_record(device: torch.device) -> dict:
    """The card (or CPU), the versions and the date every benchmark report names: GPU speeds vary
    between machines, so a figure without them cannot be compared."""
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "date": time.strftime("%Y-%m-%d")}


def write_partial(out: Path | None, record: dict) -> None:
    """What a call has measured so far, beside `out` as `.partial.json` (the whole report goes to
    `out` at the end): a call cut off at its limit still leaves its figures and their header."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record | {"partial": True}, indent=2, default=str)
        out.with_suffix(".partial.json").write_text(text + "\n")


def report_header(args: argparse.Namespace, device: torch.device, resolution: int, batch_size: int,
                  train_params: dict, training: TrainingConfig, *, steps_compiled: bool,
                  steps_channels_last: bool) -> dict:
    """What a figure needs to be read (card, versions, settings). Every partial result is written
    with it too, so a call cut off at its limit still leaves a complete record of what it measured."""
    return {
        "model": "tiny" if args.tiny else "sd15", "resolution": resolution, "batch_size": batch_size,
        **machine_record(device), "warmup_steps": args.warmup, "timed_steps": args.steps,
        "train_params": train_params, "compile": training.compile, "steps_compiled": steps_compiled,
        "channels_last": training.channels_last, "steps_channels_last": steps_channels_last,
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "inductor": args.inductor,
        "sdpa": args.sdpa,
    }


def run_parts(args: argparse.Namespace) -> dict:
    """The parts `--parts` names, in an order that keeps the reference if a call is cut off."""
    device, unet_config, vae_config, text, resolution, batch_size = benchmark_setup(args.tiny, args.batch_size)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "true"
    latent_size = unet_config["sample_size"]
    parts = set(args.parts.split(","))

    # params.yaml's train section, as the train stage reads it; batch and length set here.
    train_params = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    lora_config, training = configs_from_params(TrainParams.model_validate(train_params))
    for name, value in (("compile", args.compile), ("channels_last", args.channels_last)):
        if value != "params":
            training = TrainingConfig(**{**training.__dict__, name: {"true": True, "false": False}.get(value, value)})
    # The isolated steps and the anchor compile, and are channels-last, when the loop is.
    compile_steps = training.switched_on("compile", device.type)
    channels_last_steps = training.switched_on("channels_last", device.type)
    cache, epochs = synthetic_loop_data(batch_size, args.steps, args.warmup, unet_config)
    scheduler = DDPMScheduler(**SD15_SCHEDULER_CONFIG)
    results: dict[str, dict] = {}

    def run(**overrides) -> TrainingConfig:
        return TrainingConfig(**{**training.__dict__, "epochs": epochs, "batch_size": batch_size,
                                 "gradient_accumulation_steps": 1, **overrides})

    header = report_header(args, device, resolution, batch_size, train_params, training,
                           steps_compiled=compile_steps, steps_channels_last=channels_last_steps)

    def save(partial: dict) -> None:
        write_partial(args.out, header | {"results": partial})

    # The steps and the anchor before the loop: a call cut off at its limit keeps the reference.
    if "step" in parts or "anchor" in parts:
        generator = torch.Generator().manual_seed(1)
        index = torch.randperm(len(cache), generator=generator)[:batch_size]
        batch = {name: getattr(cache, name)[index].to(device) for name in cache.tensor_names()}
        modes = ("ec_lora", "plain_lora", "peft_anchor") if "step" in parts else ("peft_anchor",)
        results |= measure_steps(unet_config, scheduler, lora_config, run(), batch, device, args.steps, args.warmup,
                                 modes=modes, compile=compile_steps, channels_last=channels_last_steps)
        save(results)
    for conditioning in ("ec_lora", "plain_lora"):
        if "loop" in parts or f"loop:{conditioning}" in parts:
            results[f"loop:{conditioning}"] = measure_loop(unet_config, scheduler, cache, lora_config,
                                                           run(conditioning=conditioning), device, args.warmup)
            save(results)
    if "memory" in parts:
        small = synthetic_cache(4 * STEPS_PER_EPOCH, latent_size, unet_config["cross_attention_dim"])
        results["memory:batch4_checkpointing"] = measure_loop(
            unet_config, scheduler, small, lora_config,
            TrainingConfig(**{**run().__dict__, "batch_size": 4, "gradient_checkpointing": True}), device, args.warmup,
        ) | {"batch_size": 4}
        save(results)
    if "sample" in parts:
        with tempfile.TemporaryDirectory() as folder:
            results |= measure_sampling(build_pipeline_folder(Path(folder) / "sd", unet_config, vae_config, text, device),
                                        device, resolution, min(batch_size, 16), args.sample_steps)
            for name in results:
                if name.startswith("sample:"):
                    results[name]["batch_size"] = min(batch_size, 16)

    report = header | {"results": results}
    loop, plain = results.get("loop:ec_lora"), results.get("loop:plain_lora")
    if loop and plain:
        report["ec_lora_over_plain_lora"] = loop["images_per_second"] / plain["images_per_second"]
    if loop and "step:ec_lora" in results:
        report["loop_over_step"] = loop["images_per_second"] / results["step:ec_lora"]["images_per_second"]
    return report


if __name__ == "__main__":
    main()

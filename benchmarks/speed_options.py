"""Which speed options pay at Stable Diffusion 1.5 shape: one table, one process, one device.

Each row is the isolated training step (`diffusion_training_step` plus the optimizer step, on
one resident batch) or a sampling batch, under one option set, beside the static PEFT LoRA
anchor measured the same way:

    eager              bf16, default SDPA, what the train stage runs today
    channels_last      the UNet's weights and inputs in NHWC (convolutions in cuDNN's fast layout)
    compile            torch.compile of the UNet (default mode, static shapes)
    compile+cl         both
    cudnn_sdpa         eager with PyTorch's cuDNN attention backend first (others where it has no kernel)
    compile+cl+cudnn   compile+cl with the cuDNN attention backend first
    compile+cl+tuned   compile+cl with train_throughput.INDUCTOR_TUNING["tuned"]: 1x1 convolutions as
                       matmuls, coordinate-descent tuning of the generated kernels, no epilogue fusion
                       (diffusers' speed guide)
    compile+cl+mm1x1   compile+cl with the 1x1 convolutions as matmuls alone (tuned's cheap part)
    compile+cl+graphs  compile+cl with CUDA graphs (torch.compile's "reduce-overhead" mode)
    compile+cl+autotune  compile+cl with each matmul and convolution autotuned against Triton templates
                       (INDUCTOR_TUNING["autotune"])
    compile+cl+bench   compile+cl with cudnn.benchmark: cuDNN times its convolution algorithms for each
                       new shape and keeps the fastest (its heuristic choice otherwise)
    compile+bench      compile with cudnn.benchmark (the training step's layout, contiguous)

For compiled rows the warm-up (first steps, compilation included) is reported beside the
steady rate, and the number of graphs Dynamo compiled during the timed steps (0 = no
recompiles in steady state). Steady state: after `--warmup` steps, synchronised at both ends.
Sampling rows (SAMPLING_ROWS): a batch at five vectors and a batch at one (whose scales the
pipeline folds into the weights), with text guidance and with vector guidance, the one-vector
batch unfolded too, and the pipeline without an adapter.

    python benchmarks/speed_options.py --out benchmarks/results/speed_options_h200.json
    python benchmarks/speed_options.py --tiny --steps 2 --warmup 1 --sample-steps 2   # CPU smoke check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402

from benchmarks.train_throughput import (  # noqa: E402
    SD15_SCHEDULER_CONFIG, benchmark_setup, build_pipeline_folder, inductor_context, machine_record, peak_gb,
    reset_memory, sdpa_context, synchronize, synthetic_cache,
)
from ec_lora_t.adapter import ECLoRAConfig, add_ec_lora  # noqa: E402
from ec_lora_t.generation import (  # noqa: E402
    VectorSampling, default_sampling_dtype, generate_images, load_pipeline,
)
from ec_lora_t.training.objective import diffusion_training_step, noisy_latents  # noqa: E402

OPTION_SETS = {
    "eager": {},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "compile+cl": {"compile": True, "channels_last": True},
    "cudnn_sdpa": {"sdpa": "cudnn"},
    "compile+cl+cudnn": {"compile": True, "channels_last": True, "sdpa": "cudnn"},
    "compile+cl+tuned": {"compile": True, "channels_last": True, "inductor": "tuned"},
    "compile+cl+mm1x1": {"compile": True, "channels_last": True, "inductor": "mm1x1"},
    "compile+cl+graphs": {"compile": True, "channels_last": True, "inductor": "cudagraphs"},
    "compile+cl+autotune": {"compile": True, "channels_last": True, "inductor": "autotune"},
    "compile+cl+bench": {"compile": True, "channels_last": True, "cudnn_benchmark": True},
    "compile+bench": {"compile": True, "cudnn_benchmark": True},
}


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


@contextlib.contextmanager
def cudnn_benchmark_context(on: bool):
    """cudnn.benchmark is process-wide: set it for the row's calls only (the first call of each
    shape pays for the timing, inside the warm-up)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on or before
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def timed(step: Callable[[], None], steps: int, warmup: int, device, images_per_step: int) -> dict:
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_seconds = time.perf_counter() - started
    graphs_before = compiled_graphs()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"images_per_second": steps * images_per_step / seconds, "warmup_seconds": warmup_seconds,
            "graphs_compiled_in_timed_steps": compiled_graphs() - graphs_before, "peak_memory_gb": peak_gb(device)}


def training_step(unet_config, scheduler, batch, device, *, peft: bool = False, channels_last: bool = False,
                  compile: bool = False, sdpa: str | None = None, inductor: str | None = None,
                  cudnn_benchmark: bool = False) -> Callable[[], None]:
    """One optimizer step of EC-LoRA-T (params.yaml's recipe: per-rank ECM, min-SNR 5, caption
    dropout 0.9) or of a static PEFT LoRA, with the options applied."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from peft import LoraConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config).to(dtype).requires_grad_(False)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    generator = torch.Generator(device).manual_seed(0)
    if peft:
        unet.add_adapter(LoraConfig(r=16, lora_alpha=64, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]))
        trainable = [p for p in unet.parameters() if p.requires_grad]
        for parameter in trainable:
            parameter.data = parameter.data.float()
    else:
        adapter = add_ec_lora(unet, ECLoRAConfig(rank=16, alpha=64, ecm_granularity="rank"), device)
        trainable = adapter.lora_parameters() + list(adapter.ecm.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    # As the train stage's loop does: accelerate wraps the UNet's forward in bf16 autocast and,
    # with a dynamo backend, compiles it (only the UNet is prepared here, as the loop compiles it).
    AcceleratorState._reset_state(reset_partial_state=True)  # process-wide: else the first run's backend stays
    accelerator = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type == "cpu",
                              dynamo_backend="inductor" if compile else "no")
    runner = accelerator.prepare_model(unet)

    def step() -> None:
        with sdpa_context(sdpa), inductor_context(inductor), cudnn_benchmark_context(cudnn_benchmark):
            if peft:
                noisy = noisy_latents(batch["latent_mean"], batch["latent_std"], scheduler, generator)
                latents = noisy.noisy_latents.to(dtype)
                if channels_last:
                    latents = latents.contiguous(memory_format=torch.channels_last)
                prediction = runner(latents, noisy.timesteps, encoder_hidden_states=batch["text_embeddings"].to(dtype),
                                    return_dict=False)[0]
                torch.nn.functional.mse_loss(prediction.float(), noisy.target).backward()
            else:
                diffusion_training_step(accelerator, runner, adapter, adapter.ecm, scheduler, batch, generator,
                                        caption_dropout=0.9, snr_gamma=5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# Sampling rows: (vector guidance, adapter loaded, vectors, max_folded_runs, name suffix).
# "mixed": five engagement values across the batch (a sweep's batch; more runs of rows than the
# pipeline folds, so the per-row low-rank path); "one": every image at one vector (a `generate`
# call; folded into the weights once per call, `ECLoRAStableDiffusionPipeline.max_folded_runs`).
SAMPLING_ROWS = (
    (1.0, True, "mixed", None, ""),
    (3.0, True, "mixed", None, ":vector_guidance"),
    (1.0, True, "one", None, ":one_vector"),
    (3.0, True, "one", None, ":one_vector:vector_guidance"),
    (1.0, True, "one", 0, ":one_vector:unfolded"),
    (1.0, False, "mixed", None, ":no_adapter"),
)


def sampling_call(folder: Path, device, resolution: int, batch_size: int, steps: int, vector_guidance: float,
                  channels_last: bool = False, compile: bool = False, sdpa: str | None = None,
                  inductor: str | None = None, adapter: bool = True, vectors: str = "mixed",
                  max_folded_runs: int | None = None, cudnn_benchmark: bool = False) -> Callable[[], None]:
    """One sampling batch through the project's pipeline; without `adapter`, the same pipeline
    with no adapter loaded (plain Stable Diffusion sampling: the anchor for the sampling rows).
    `vectors`: "mixed" or "one" (SAMPLING_ROWS); `max_folded_runs`: None keeps the pipeline's."""
    pipeline = load_pipeline(str(folder), folder / "adapter" if adapter else None, device=device,
                             sampler="dpmsolver++")
    if max_folded_runs is not None:
        pipeline.max_folded_runs = max_folded_runs
    if channels_last:
        pipeline.unet.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
    if compile:
        pipeline.unet.compile()
        pipeline.vae.decoder.compile()
    prompts = [f"a photo of a person in a city, take {index}" for index in range(batch_size)]
    vectors = torch.tensor([[index % 5 / 4 if vectors == "mixed" else 0.75, 0.5] for index in range(batch_size)])
    seeds = list(range(batch_size))
    call = dict(num_inference_steps=steps, guidance_scale=5.0, batch_size=batch_size, height=resolution,
                width=resolution, sampling=VectorSampling(vector_guidance=vector_guidance),
                mode="ec_lora" if adapter else "base")

    def sample() -> None:
        with sdpa_context(sdpa), inductor_context(inductor), cudnn_benchmark_context(cudnn_benchmark):
            generate_images(pipeline, prompts, vectors if adapter else None, seeds, **call)

    return sample


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=None, help="training batch; default 32 (2 with --tiny)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--sample-batches", type=int, default=2, help="timed sampling batches per row (after one)")
    parser.add_argument("--sample-rows", default=None,
                        help="comma-separated subset of SAMPLING_ROWS by suffix (mixed: the one without)")
    parser.add_argument("--options", default=",".join(OPTION_SETS), help="comma-separated option sets")
    parser.add_argument("--parts", default="step,peft,sample", help="comma-separated subset")
    parser.add_argument("--tiny", action="store_true", help="a narrow model for a CPU smoke check")
    parser.add_argument("--out", type=Path, default=None, help="JSON, rewritten after every row")
    args = parser.parse_args(argv)

    device, unet_config, vae_config, text, resolution, batch_size = benchmark_setup(args.tiny, args.batch_size)
    latent_size = unet_config["sample_size"]
    scheduler = DDPMScheduler(**SD15_SCHEDULER_CONFIG)
    cache = synthetic_cache(batch_size, latent_size, unet_config["cross_attention_dim"])
    batch = {name: getattr(cache, name).to(device) for name in cache.tensor_names()}
    parts, options = set(args.parts.split(",")), args.options.split(",")
    report = {"model": "tiny" if args.tiny else "sd15", "resolution": resolution, "batch_size": batch_size,
              **machine_record(device),
              "warmup_steps": args.warmup, "timed_steps": args.steps,
              "sampling_dtype": str(default_sampling_dtype(device)).removeprefix("torch."), "results": {}}

    def record(name: str, figures: dict) -> None:
        report["results"][name] = figures
        print(name, json.dumps(figures), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")

    for option in options:
        for kind in ("step", "peft"):
            if kind in parts:
                reset_memory(device)
                torch._dynamo.reset()
                step = training_step(unet_config, scheduler, batch, device, peft=kind == "peft", **OPTION_SETS[option])
                record(f"{kind}:{option}", timed(step, args.steps, args.warmup, device, batch_size))
                del step
    if "sample" in parts:
        sample_batch = min(batch_size, 16)
        with tempfile.TemporaryDirectory() as folder:
            sd = build_pipeline_folder(Path(folder) / "sd", unet_config, vae_config, text, device)
            # Per option: EC-LoRA-T with text guidance (2 UNet rows per image), with vector
            # guidance too (3 rows), at mixed vectors and at one, and the anchor: the same
            # pipeline without an adapter.
            for option in options:
                for vector_guidance, adapter, vectors, max_folded_runs, suffix in SAMPLING_ROWS:
                    if args.sample_rows is not None and (suffix.lstrip(":") or "mixed") not in args.sample_rows.split(","):
                        continue
                    reset_memory(device)
                    torch._dynamo.reset()
                    sample = sampling_call(sd, device, resolution, sample_batch, args.sample_steps, vector_guidance,
                                           adapter=adapter, vectors=vectors, max_folded_runs=max_folded_runs,
                                           **OPTION_SETS[option])
                    name = f"sample:{option}{suffix}"
                    record(name, timed(sample, args.sample_batches, 1, device, sample_batch))
    return report


if __name__ == "__main__":
    main()

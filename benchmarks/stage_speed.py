"""Does the train stage run as fast as the benchmark says? The real stage beside the benchmark's loop.

`benchmarks/train_throughput.py` times the train stage's loop on a synthetic latent cache. This
script runs the stage itself the way `dvc repro` does, at SD1.5 shape, and puts the two steady
figures side by side, in one process on one device:

1. a random-weight SD1.5-shaped pipeline in diffusers layout (`build_pipeline_folder`), the
   `model.pretrained` of the run;
2. the data stages of the demo world at the model's resolution (`control_research.build_world`:
   demo_data -> ingest -> caption -> features -> latents -> regressor, the commands of dvc.yaml);
3. the train stage (`stages.train`, dvc.yaml's command) with params.yaml's recipe, the batch and
   epochs given here; its `data/run_info/train.json` reports `steady_images_per_second`;
4. the benchmark's loop (`train_throughput.measure_loop`) on a synthetic cache of the same
   shapes, batch and recipe;
5. with `--processes N`, the train stage again on N processes, one per GPU, under
   `train.launcher` = accelerate's launcher (`multi_process_launcher`; torchrun on the CPU), and
   its rate over the one-process stage's (`processes_over_one`; `train.batch_size` is per process).

    python benchmarks/stage_speed.py --work /tmp/ss --out benchmarks/results/stage_speed_h100.json
    python benchmarks/stage_speed.py --work /tmp/ss --compile true --out benchmarks/results/stage_speed_compile_h100.json
    NCCL_NVLS_ENABLE=0 python benchmarks/stage_speed.py --work /tmp/ss --processes 2 --out benchmarks/results/stage_speed_2gpu.json
    python benchmarks/stage_speed.py --tiny --posts 12 --epochs 4 --steps 26 --warmup 2   # CPU smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffusers import DDPMScheduler  # noqa: E402

from benchmarks.control_research import (  # noqa: E402
    build_world, link_world, merged_params, run_stage, stage_command, write_params,
)
from benchmarks.train_throughput import (  # noqa: E402
    SD15_SCHEDULER_CONFIG, benchmark_setup, build_pipeline_folder, machine_record, measure_loop, synthetic_loop_data,
    write_partial,
)
from ec_lora_t.training.config import TrainingConfig  # noqa: E402
from stages.params.train import TrainParams, configs_from_params  # noqa: E402


def run_train_stage(world: Path, folder: Path, params: dict, device_index: str | None) -> dict:
    """The train stage in `folder` on `world`'s data, as control_research runs it; its run info.

    `folder` starts empty: a second call on the same --work (the compiled run after the eager
    one) reuses the world and the pipeline folder but never an earlier run's outputs."""
    shutil.rmtree(folder, ignore_errors=True)
    link_world(folder, world)
    write_params(folder, params)
    started = time.perf_counter()
    run_stage(stage_command("train", params), folder, device_index)
    info = json.loads((folder / "data/run_info/train.json").read_text())
    return info | {"stage_seconds": time.perf_counter() - started,
                   "steps": json.loads((folder / "metrics/train.json").read_text()).get("steps")}


def multi_process_launcher(processes: int, device: torch.device) -> str:
    """`train.launcher` for `processes` processes on this machine: accelerate's launcher on
    GPUs (README, "More GPUs"), torchrun over gloo on the CPU (the smoke check's)."""
    if device.type == "cuda":
        return (f"{sys.executable} -m accelerate.commands.launch --multi_gpu --num_processes {processes} "
                "--mixed_precision bf16")
    return f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node {processes}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 (2 with --tiny)")
    parser.add_argument("--posts", type=int, default=200, help="demo_data.num_posts (200: 261 images)")
    parser.add_argument("--epochs", type=int, default=12, help="the stage's epochs over the demo feed's images")
    parser.add_argument("--steps", type=int, default=30, help="the benchmark loop's timed steps")
    parser.add_argument("--warmup", type=int, default=8, help="the benchmark loop's untimed steps")
    parser.add_argument("--compile", choices=("true", "false"), default="false", help="train.compile for both")
    parser.add_argument("--processes", type=int, default=1,
                        help="also run the stage on this many processes (GPUs 0..N-1) and report the scaling")
    parser.add_argument("--tiny", action="store_true", help="a narrow model for a CPU smoke check")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="JSON to write")
    args = parser.parse_args(argv)

    device, unet_config, vae_config, text, resolution, batch_size = benchmark_setup(args.tiny, args.batch_size)
    train = {"batch_size": batch_size, "epochs": args.epochs, "compile": args.compile == "true"}
    report = {"model": "tiny" if args.tiny else "sd15", "resolution": resolution, "batch_size": batch_size,
              **machine_record(device),
              "train_overrides": train}

    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        pretrained = build_pipeline_folder(work / "sd", unet_config, vae_config, text, device)
        base = {"model": {"pretrained": str(pretrained), "resolution": resolution},
                "demo_data": {"image_size": resolution, "num_posts": args.posts}}
        started = time.perf_counter()
        device_index = "0" if device.type == "cuda" else None
        world = build_world(work, "vivid_bright", base, device_index)
        report["data_stages_seconds"] = time.perf_counter() - started
        params = merged_params([base, {"demo_data": {"audience": "vivid_bright"},
                                       "ingest": {"posts_dir": str(world / "data" / "demo_posts")}, "train": train}])
        report["stage"] = run_train_stage(world, work / f"run-compile-{args.compile}", params, device_index)
        write_partial(args.out, report)  # a call cut off during the benchmark loop keeps the stage's figure
        if args.processes > 1:
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast fails on some shared machines
            launched = merged_params([params, {"train": {"launcher": multi_process_launcher(args.processes, device)}}])
            devices = ",".join(str(index) for index in range(args.processes)) if device.type == "cuda" else None
            report[f"stage_processes_{args.processes}"] = run_train_stage(
                world, work / f"run-compile-{args.compile}-processes-{args.processes}", launched, devices)

    # The benchmark's loop in this process, on a synthetic cache of the stage's shapes and recipe.
    lora_config, training = configs_from_params(TrainParams.model_validate(params["train"]))
    cache, epochs = synthetic_loop_data(batch_size, args.steps, args.warmup, unet_config)
    training = TrainingConfig(**{**training.__dict__, "epochs": epochs, "gradient_accumulation_steps": 1})
    report["benchmark_loop"] = measure_loop(unet_config, DDPMScheduler(**SD15_SCHEDULER_CONFIG), cache, lora_config,
                                            training, device, args.warmup)
    # Both steady figures come from the loop's own clock (ec_lora_t.training.throughput: after its
    # first 10 steps, checkpoint saving left out); None when a run is too short to have one.
    stage_rate = report["stage"].get("steady_images_per_second")
    loop_rate = report["benchmark_loop"].get("loop_steady_images_per_second")
    report["stage_over_benchmark"] = {
        "loop_clock": stage_rate / loop_rate if stage_rate and loop_rate else None,
        "benchmark_clock": stage_rate / report["benchmark_loop"]["images_per_second"] if stage_rate else None,
    }
    if args.processes > 1:
        several = report[f"stage_processes_{args.processes}"].get("steady_images_per_second")
        report["processes_over_one"] = several / stage_rate if several and stage_rate else None
    text_report = json.dumps(report, indent=2, default=str)
    print(text_report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text_report + "\n")
    return report


if __name__ == "__main__":
    main()

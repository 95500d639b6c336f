"""Does the vector control generation, and how well? Train and evaluate a grid of variants in parallel.

For a machine without DVC (the GPU box), the same stage commands `dvc exp run -S ...` would run:
for each audience of the demo world the data stages run once (demo_data -> ingest -> caption
-> features -> latents -> regressor) in `<work>/world-<audience>/`; then every training
variant runs `stages.train` in its own folder (its params.yaml = the repo's merged with the
variant's overrides), and every sampling variant of it runs `stages.evaluate` on that adapter.
Runs are spread over the visible GPUs (or CPU workers) and the summary JSON is rewritten after
every run, so a run cut short keeps what it finished.

    python benchmarks/control_research.py --grid grid.json --out results.json --work /tmp/research --workers 16

grid.json:
    {"base": {...params overrides applied to every run...},
     "audiences": ["vivid_bright", "caps"],
     "seeds": [42, 7],
     "train": {"cd0.9": {"train": {"caption_dropout": 0.9}}, ...},
     "sample": {"w1": {}, "w3": {"evaluate": {"vector_guidance": 3.0}}}}

Every (audience, seed, train variant) trains once; every sample variant evaluates it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stages._common import merge_params  # noqa: E402

# The stage commands exactly as dvc.yaml runs them (so this harness follows every change there).
PIPELINE = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
DATA_STAGES = ["demo_data", "ingest", "caption", "features", "latents", "regressor"]


def stage_command(stage: str, replacements: dict[str, str] | None = None) -> list[str]:
    """dvc.yaml's command of `stage` as `-m stages.<name> ...` arguments, options replaced."""
    args = shlex.split(PIPELINE[stage]["cmd"])
    if args[:2] != ["python", "-m"]:
        raise ValueError(f"unexpected command of stage {stage}: {PIPELINE[stage]['cmd']}")
    args = args[2:]
    for option, value in (replacements or {}).items():
        args[args.index(option) + 1] = value
    return args


def evaluate_stage(name: str) -> list[str]:
    return stage_command("evaluate", {"--out": f"data/evaluate-{name}", "--sweep-plots": f"data/plots/sweep-{name}",
                                      "--metrics": f"metrics/evaluate-{name}.json"})


def run_stage(args: list[str], cwd: Path, device: str | None) -> None:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    result = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{args[0]} failed in {cwd}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")


def write_params(folder: Path, overrides: list[dict]) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for override in overrides:
        params = merge_params(params, override)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def build_world(work: Path, audience: str, base: dict, device: str | None) -> Path:
    world = work / f"world-{audience}"
    world.mkdir(parents=True, exist_ok=True)
    (world / "models").exists() or (world / "models").symlink_to(REPO / "models")
    posts_dir = str(world / "data" / "demo_posts")
    write_params(world, [base, {"demo_data": {"audience": audience}, "ingest": {"posts_dir": posts_dir}}])
    for stage in DATA_STAGES:
        run_stage(stage_command(stage), world, device)
    return world


def research_summary(details: dict) -> dict:
    """What the research tables compare, from the evaluate stage's details: EC-LoRA-T's ground
    truth and regressor scores against the ceiling, adherence against the base model, time."""
    engagement, time = details["engagement_sweep"], details.get("time_sweep", {})

    def scores(metrics: dict, ceiling: dict | None) -> dict:
        keys = ("spearman", "p_value", "range_ratio", "share_of_ceiling", "monotone")
        return {key: metrics.get(key) for key in keys} | ({"ceiling": ceiling["spearman"]} if ceiling else {})

    summary = {"verdict": details["verdict"],
               "regressor": scores(engagement["ec_lora"], engagement.get("retrieval"))}
    if "ground_truth" in engagement["ec_lora"]:
        summary["ground_truth"] = scores(engagement["ec_lora"]["ground_truth"],
                                         engagement.get("retrieval", {}).get("ground_truth"))
    adherence = details.get("adherence")
    if adherence and adherence.get("ec_lora"):
        summary["adherence"] = {"base": sum(adherence["base"].values()) / len(adherence["base"]),
                                "worst_drop": max(adherence["base"][k] - v for k, v in adherence["ec_lora"].items())}
    if "ground_truth" in time.get("ec_lora", {}):
        summary["time"] = scores(time["ec_lora"]["ground_truth"], time.get("retrieval", {}).get("ground_truth"))
    return summary


def summarise(folder: Path, name: str) -> dict:
    details = json.loads((folder / f"data/evaluate-{name}/details.json").read_text())
    headline = research_summary(details)
    engagement = details["engagement_sweep"]
    by_target = {
        mode: {key: round(value["mean"], 4) for key, value in metrics["ground_truth"]["by_target"].items()}
        for mode, metrics in engagement.items() if "ground_truth" in metrics
    }
    return {"headline": headline, "ground_truth_by_target": by_target, "adherence": details.get("adherence"),
            "style": details.get("style", {}).get("ec_lora", {}).get("mean")}


def run_training(job: dict, device: str | None) -> dict:
    folder: Path = job["folder"]
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "data").mkdir(parents=True)
    for shared in ("demo_posts", "ingest", "caption", "features", "latents", "regressor"):
        (folder / "data" / shared).symlink_to(job["world"] / "data" / shared)
    (folder / "models").symlink_to(REPO / "models")
    write_params(folder, [job["base"], {"demo_data": {"audience": job["audience"]},
                                        "ingest": {"posts_dir": str(job["world"] / "data" / "demo_posts")},
                                        "train": {"seed": job["seed"]}}, job["train"]])
    started = time.perf_counter()
    run_stage(stage_command("train"), folder, device)
    result = {"train_seconds": time.perf_counter() - started,
              "train": json.loads((folder / "metrics/train.json").read_text()), "samples": {}}
    base_params = yaml.safe_load((folder / "params.yaml").read_text())
    for name, sample in job["sample"].items():
        (folder / "params.yaml").write_text(yaml.safe_dump(merge_params(base_params, sample), sort_keys=False))
        started = time.perf_counter()
        try:
            run_stage(evaluate_stage(name), folder, device)
            result["samples"][name] = summarise(folder, name) | {"seconds": time.perf_counter() - started}
        except RuntimeError as error:
            result["samples"][name] = {"error": str(error)[-3000:]}
    (folder / "params.yaml").write_text(yaml.safe_dump(base_params, sort_keys=False))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="grid JSON (see the module docstring), or a path to one")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--gpus", type=int, default=None, help="default: all visible CUDA devices (0: CPU)")
    parser.add_argument("--grids", type=Path, default=None, help="copy each run's grid.png into this folder")
    args = parser.parse_args()
    grid = json.loads(Path(args.grid).read_text() if Path(args.grid).is_file() else args.grid)
    if args.gpus is None:
        import torch

        args.gpus = torch.cuda.device_count()
    devices = [str(i) for i in range(args.gpus)] or [None]
    base = grid.get("base", {})
    started = time.perf_counter()

    with concurrent.futures.ThreadPoolExecutor(len(grid["audiences"])) as pool:
        worlds = dict(zip(grid["audiences"], pool.map(
            lambda item: build_world(args.work, item[1], base, devices[item[0] % len(devices)]),
            enumerate(grid["audiences"]))))
    print(f"worlds built in {time.perf_counter() - started:.0f} s", flush=True)

    jobs = [
        {"audience": audience, "seed": seed, "name": name, "train": train, "sample": grid["sample"], "base": base,
         "world": worlds[audience], "folder": args.work / f"run-{audience}-{name}-s{seed}"}
        for name, train in grid["train"].items() for audience in grid["audiences"] for seed in grid["seeds"]
    ]
    results: dict = {"grid": grid, "runs": {}}
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = {pool.submit(run_training, job, devices[i % len(devices)]): job for i, job in enumerate(jobs)}
        for future in concurrent.futures.as_completed(futures):
            job = futures[future]
            key = f"{job['audience']}/{job['name']}/s{job['seed']}"
            try:
                results["runs"][key] = future.result()
            except RuntimeError as error:
                results["runs"][key] = {"error": str(error)[-3000:]}
            results["seconds"] = time.perf_counter() - started
            args.out.write_text(json.dumps(results, indent=1, default=str))
            summary = {name: sample.get("headline", {}).get("ground_truth", sample.get("error", "")[-300:])
                       for name, sample in results["runs"][key].get("samples", {}).items()}
            print(key, json.dumps(summary, default=str)[:600], flush=True)
            if args.grids is not None:
                args.grids.mkdir(parents=True, exist_ok=True)
                for name in job["sample"]:
                    grid_png = job["folder"] / f"data/evaluate-{name}/engagement_sweep.png"
                    if grid_png.exists():
                        shutil.copy(grid_png, args.grids / f"{job['audience']}-{job['name']}-s{job['seed']}-{name}.png")
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()

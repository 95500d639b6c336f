"""Does the vector control generation, on every audience and training seed? Train and evaluate a grid.

For a machine without DVC (the GPU box), the same stage commands `dvc repro` would run, read
from dvc.yaml with its `${...}` params interpolated as DVC does: for each audience of the demo
world the data stages run once (demo_data -> ingest -> caption -> features -> latents ->
regressor) in `<work>/world-<audience>/`; then every (recipe, audience, training seed) runs
`stages.train` in its own folder (its params.yaml = the repo's merged with the grid's base, the
audience, the seed and the recipe), and every sampling variant runs `stages.evaluate` on that
adapter.

    python benchmarks/control_research.py --grid grid.json --out results.jsonl --work /tmp/research --jobs 8

grid.json:
    {"base": {...params overrides applied to every run...},
     "audiences": {"tuning": ["vivid_bright", "caps"], "held_out": ["beach", "caps_in_daylight"]},
     "seeds": [42, 7, 1234, 1, 2],
     "recipes": {"default": {}, "gpu": {"train": {"epochs": 100, "batch_size": 32}}},
     "sample": {"w4": {}, "w6": {"evaluate": {"vector_guidance": 6.0}}}}

`audiences` may also be a plain list (all of them tuning audiences); `train` is accepted for
`recipes` (the older grids). Tune recipes with `--split tuning`, then report the chosen one on
`--split held_out` (audiences no tuning decision looked at); every output row says its split.
`--seeds 7,1234` and `--audiences beach,caps` run part of a grid (one device call's worth); the
same command with the other part appends to the same `--out`.

Output: one JSON line per (audience, recipe, seed, sampling variant), appended as soon as the
run finishes, so a call cut short (a 10-minute limit) keeps every finished run; rerunning the
same command skips the runs already in the file (failed ones are retried), reuses the built
worlds, and samples an adapter already trained with the same params (`trained.json` beside it)
instead of training it again: a sampling variant added to a grid costs only its sampling.
`--jobs N` runs N trainings at once as separate processes, spread round-robin over the visible
GPUs: the demo's tiny model leaves an H200 mostly idle, so several share one GPU.
`benchmarks/summarise_research.py` tabulates the rows (mean ± std over seeds, worst seed).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stages._common import merge_params  # noqa: E402
from stages.validate_params import SCHEMAS  # noqa: E402

DATA_STAGES = ["demo_data", "ingest", "caption", "sentiment", "features", "latents", "regressor"]
# What the data stages write, shared (symlinked) by every training run of an audience.
DATA_OUTPUTS = ["demo_posts", "ingest", "caption", "sentiment", "features", "latents", "regressor"]
# Written beside a trained adapter: its row fields and the fingerprint of what it trained on.
TRAINED = "trained.json"
SPLITS = ("tuning", "held_out")
_INTERPOLATION = re.compile(r"\$\{\s*([^}]+?)\s*\}")


def pipeline_stages(dvc_yaml: Path = REPO / "dvc.yaml") -> dict[str, Any]:
    return yaml.safe_load(dvc_yaml.read_text())["stages"]


def interpolate(text: str, params: dict[str, Any], source: str = "dvc.yaml") -> str:
    """`${a.b}` replaced by params[a][b], as DVC fills a command from params.yaml (scalars only)."""

    def value_of(match: re.Match) -> str:
        value: Any = params
        for key in match.group(1).split("."):
            if not isinstance(value, dict) or key not in value:
                raise KeyError(f"{source}: ${{{match.group(1)}}} is not a key of params.yaml")
            value = value[key]
        if isinstance(value, (dict, list)) or value is None:
            raise ValueError(f"{source}: ${{{match.group(1)}}} is {value!r}, not a scalar a command can hold")
        return str(value).lower() if isinstance(value, bool) else str(value)

    return _INTERPOLATION.sub(value_of, text)


def stage_command(stage: str, params: dict[str, Any], replacements: dict[str, str] | None = None,
                  stages: dict[str, Any] | None = None) -> list[str]:
    """dvc.yaml's command of `stage` as an argument list, params interpolated and options replaced.

    A leading `python` becomes this interpreter (the harness's environment), wherever it
    appears in the launcher (`python -m accelerate.commands.launch ...` too).
    """
    stages = stages if stages is not None else pipeline_stages()
    if stage not in stages:
        raise KeyError(f"dvc.yaml has no stage {stage!r}")
    args = shlex.split(interpolate(stages[stage]["cmd"], params, f"dvc.yaml stage {stage}"))
    if args and args[0] == "python":
        args[0] = sys.executable
    for option, value in (replacements or {}).items():
        if option not in args:
            raise ValueError(f"dvc.yaml stage {stage}: no option {option} to replace in {args}")
        args[args.index(option) + 1] = value
    return args


def evaluate_outputs(name: str) -> dict[str, str]:
    """The evaluate stage's outputs for sampling variant `name`, apart from the other variants'."""
    return {"--out": f"data/evaluate-{name}", "--sweep-plots": f"data/plots/sweep-{name}",
            "--live": f"data/evaluate-{name}/live", "--metrics": f"metrics/evaluate-{name}.json",
            "--run-info": f"data/run_info/evaluate-{name}.json"}


def run_stage(args: list[str], cwd: Path, device: str | None, threads: int | None = None) -> None:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    if threads is not None:
        # Several stage processes share the machine: split its cores instead of each taking all.
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        stage = next((arg for arg in args if arg.startswith("stages.")), args[0])
        raise RuntimeError(f"{stage} failed in {cwd}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")


def merged_params(overrides: list[dict]) -> dict[str, Any]:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for override in overrides:
        params = merge_params(params, override)
    return params


def write_params(folder: Path, params: dict[str, Any]) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def digest(value: Any) -> str:
    """A stable hash of JSON-able `value`: the fingerprints that decide what a rerun reuses."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def build_world(work: Path, audience: str, base: dict, device: str | None, threads: int | None = None) -> Path:
    """Run the data stages of `audience` once; a folder built with the same params is reused."""
    world = work / f"world-{audience}"
    params = merged_params([base, {"demo_data": {"audience": audience},
                                   "ingest": {"posts_dir": str(world / "data" / "demo_posts")}}])
    # What the data stages read: neither the train nor the evaluate section (a sampling or training
    # option added to params.yaml rebuilds no world), keys at their default left out.
    fingerprint = digest([without_defaults({key: value for key, value in params.items()
                                            if key not in ("train", "evaluate")}), pipeline_stages()])
    marker = world / "built.json"
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        return world
    if world.exists():
        shutil.rmtree(world)
    world.mkdir(parents=True)
    (world / "models").symlink_to(REPO / "models")
    write_params(world, params)
    for stage in DATA_STAGES:
        run_stage(stage_command(stage, params), world, device, threads)
    marker.write_text(json.dumps({"fingerprint": fingerprint, "audience": audience}))
    return world


def link_world(folder: Path, world: Path) -> None:
    """A new run folder sharing `world`'s data-stage outputs and the repository's models (symlinks)."""
    (folder / "data").mkdir(parents=True)
    for shared in DATA_OUTPUTS:
        (folder / "data" / shared).symlink_to(world / "data" / shared)
    (folder / "models").symlink_to(REPO / "models")


def research_summary(details: dict) -> dict:
    """What the research tables compare, from the evaluate stage's details: EC-LoRA-T's ground
    truth and regressor scores against the ceiling(s), adherence against the base model, time."""
    engagement, time_sweep = details["engagement_sweep"], details.get("time_sweep", {})
    # The prompt-aware ceiling (ec_lora_t.evaluation.ceiling), where the evaluation reports it.
    prompt_aware = details.get("prompt_aware_ceiling", {})

    def scores(metrics: dict, ceiling: dict | None, aware: dict | None) -> dict:
        keys = ("spearman", "spearman_se", "p_value", "range_ratio", "share_of_ceiling", "share_of_prompt_aware_ceiling",
                "monotone")
        return ({key: metrics[key] for key in keys if key in metrics}
                | ({"ceiling": ceiling["spearman"]} if ceiling else {})
                | ({"prompt_aware_ceiling": aware["spearman"]} if aware else {}))

    summary = {"verdict": details["verdict"],
               "regressor": scores(engagement["ec_lora"], engagement.get("retrieval"),
                                   prompt_aware.get("engagement_sweep"))}
    if "ground_truth" in engagement["ec_lora"]:
        summary["ground_truth"] = scores(engagement["ec_lora"]["ground_truth"],
                                         engagement.get("retrieval", {}).get("ground_truth"),
                                         prompt_aware.get("engagement_sweep", {}).get("ground_truth"))
    for key in ("adherence", "time_adherence"):
        adherence = details.get(key)
        if adherence and adherence.get("ec_lora"):
            summary[key] = {"base": sum(adherence["base"].values()) / len(adherence["base"]),
                            "worst_drop": max(adherence["base"][k] - v for k, v in adherence["ec_lora"].items())}
    if "ground_truth" in time_sweep.get("ec_lora", {}):
        summary["time"] = scores(time_sweep["ec_lora"]["ground_truth"], time_sweep.get("retrieval", {}).get("ground_truth"),
                                 prompt_aware.get("time_sweep", {}).get("ground_truth"))
    return summary


def summarise(folder: Path, name: str) -> dict:
    details = json.loads((folder / f"data/evaluate-{name}/details.json").read_text())
    by_target = {
        mode: {key: round(value["mean"], 4) for key, value in metrics["ground_truth"]["by_target"].items()}
        for mode, metrics in details["engagement_sweep"].items() if "ground_truth" in metrics
    }
    return {"headline": research_summary(details), "ground_truth_by_target": by_target,
            "adherence": details.get("adherence"), "time_adherence": details.get("time_adherence"), "style": details.get("style", {}).get("ec_lora", {}).get("mean")}


def run_key(row: dict) -> str:
    return f"{row['audience']}/{row['recipe']}/s{row['seed']}/{row['sample']}"


def without_defaults(params: dict[str, Any]) -> dict[str, Any]:
    """`params` less every key that holds its schema's default (`stages/params/<section>.py`):
    a new option added to params.yaml at its default changes no run, so it must not make the
    harness retrain (and replace) the adapters it already has."""
    kept = {}
    for section, values in params.items():
        schema = SCHEMAS.get(section)
        fields = schema.model_fields if schema is not None and isinstance(values, dict) else {}
        kept[section] = values if not fields else {
            key: value for key, value in values.items()
            if key not in fields or fields[key].is_required() or fields[key].get_default(call_default_factory=True) != value
        }
    return kept


def training_fingerprint(params: dict[str, Any], world: Path) -> str:
    """What an adapter depends on: every param but the evaluate stage's (those at their default
    left out: `without_defaults`), dvc.yaml's train stage and the world it trained on (its own
    fingerprint, so a rebuilt world retrains)."""
    trained_on = without_defaults({key: value for key, value in params.items() if key != "evaluate"})
    world_marker = json.loads((world / "built.json").read_text()) if (world / "built.json").is_file() else {}
    return digest([trained_on, pipeline_stages().get("train"), world_marker.get("fingerprint")])


def train_run(folder: Path, params: dict[str, Any], world: Path, device: str | None, threads: int | None) -> dict:
    """Train one run in a fresh `folder`; returns (and records in trained.json) its row fields."""
    if folder.exists():
        shutil.rmtree(folder)
    link_world(folder, world)
    write_params(folder, params)
    started = time.perf_counter()
    run_stage(stage_command("train", params), folder, device, threads)
    trained = {"train_seconds": time.perf_counter() - started,
               "train": json.loads((folder / "metrics/train.json").read_text())}
    (folder / TRAINED).write_text(json.dumps(trained | {"fingerprint": training_fingerprint(params, world)}))
    return trained


def reusable_training(folder: Path, params: dict[str, Any], world: Path) -> dict | None:
    """The row fields of an adapter already trained in `folder` with the same params, else None:
    a rerun that adds sampling variants samples the existing adapters instead of retraining."""
    marker = folder / TRAINED
    if not marker.is_file():
        return None
    trained = json.loads(marker.read_text())
    if trained.pop("fingerprint", None) != training_fingerprint(params, world):
        return None
    return trained | {"train_reused": True}


def run_training(job: dict, device: str | None, threads: int | None, emit) -> None:
    """Train one (audience, recipe, seed) and evaluate every sampling variant; `emit` each row."""
    folder: Path = job["folder"]
    row = {key: job[key] for key in ("audience", "split", "recipe", "seed")}
    try:
        params = merged_params([job["base"], {"demo_data": {"audience": job["audience"]},
                                              "ingest": {"posts_dir": str(job["world"] / "data" / "demo_posts")},
                                              "train": {"seed": job["seed"]}}, job["recipe_params"]])
        trained = reusable_training(folder, params, job["world"])
        if trained is None:
            trained = train_run(folder, params, job["world"], device, threads)
        row |= trained
    except (RuntimeError, OSError, KeyError, ValueError) as error:
        for name in job["sample"]:
            emit(row | {"sample": name, "error": str(error)[-3000:]})
        return
    for name, sample in job["sample"].items():
        if run_key(row | {"sample": name}) in job.get("done", ()):
            continue
        sample_params = merge_params(params, sample)
        write_params(folder, sample_params)
        started = time.perf_counter()
        try:
            run_stage(stage_command("evaluate", sample_params, evaluate_outputs(name)), folder, device, threads)
            emit(row | {"sample": name, "evaluate_seconds": time.perf_counter() - started} | summarise(folder, name))
        except (RuntimeError, OSError, KeyError, ValueError) as error:
            emit(row | {"sample": name, "error": str(error)[-3000:]})
    write_params(folder, params)


def grid_audiences(grid: dict) -> dict[str, str]:
    """{audience: split} of a grid; a plain list of audiences is all tuning audiences."""
    audiences = grid["audiences"]
    if isinstance(audiences, list):
        return {audience: "tuning" for audience in audiences}
    unknown = set(audiences) - set(SPLITS)
    if unknown:
        raise ValueError(f"grid audiences: unknown split(s) {sorted(unknown)}; expected {SPLITS}")
    split_of: dict[str, str] = {}
    for split in SPLITS:
        for audience in audiences.get(split, []):
            if audience in split_of:
                raise ValueError(f"grid audiences: {audience!r} is both a tuning and a held-out audience")
            split_of[audience] = split
    return split_of


def chosen(kind: str, wanted: list | None, available: list) -> list:
    """`available` narrowed to `wanted` (None: all); asking for one the grid lacks is an error."""
    if wanted is None:
        return available
    missing = [item for item in wanted if item not in available]
    if missing:
        raise ValueError(f"--{kind} {missing}: not in the grid's {kind} {available}")
    return [item for item in available if item in wanted]


def plan_jobs(grid: dict, split: str, work: Path, seeds: list[int] | None = None,
              audiences: list[str] | None = None) -> list[dict]:
    """The grid's (recipe, audience, seed) trainings, narrowed to a split and, optionally, to some of
    its seeds and audiences: one grid can then be spread over several calls of a time-limited machine."""
    recipes = grid.get("recipes", grid.get("train"))
    if not recipes or not grid.get("seeds") or not grid.get("sample"):
        raise ValueError("the grid needs recipes (or train), seeds and sample, each non-empty")
    split_of = grid_audiences(grid)
    names = chosen("audiences", audiences, list(split_of))
    runs = chosen("seeds", seeds, [int(seed) for seed in grid["seeds"]])
    parts = {audience: split_of[audience] for audience in names if split in ("all", split_of[audience])}
    return [
        {"audience": audience, "split": part, "seed": seed, "recipe": name, "recipe_params": recipe,
         "sample": grid["sample"], "base": grid.get("base", {}), "folder": work / f"run-{audience}-{name}-s{seed}"}
        for name, recipe in recipes.items() for audience, part in parts.items() for seed in runs
    ]


def finished_runs(out: Path) -> set[str]:
    """Keys of the rows already in `out` without an error (a rerun skips those runs)."""
    if not out.is_file():
        return set()
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return {run_key(row) for row in rows if "error" not in row}


def run_grid(grid: dict, out: Path, work: Path, jobs: int = 1, gpus: int | None = None, split: str = "all",
             seeds: list[int] | None = None, audiences: list[str] | None = None) -> int:
    """Run every unfinished job of the grid, appending one line per row to `out`; returns rows written."""
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    devices = [str(i) for i in range(gpus)] or [None]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    done = finished_runs(out)
    todo = [job for job in plan_jobs(grid, split, work, seeds, audiences)
            if any(run_key(job | {"sample": name}) not in done for name in job["sample"])]
    out.parent.mkdir(parents=True, exist_ok=True)
    lock, written = threading.Lock(), []
    started = time.perf_counter()

    def emit(row: dict) -> None:
        row["elapsed_seconds"] = time.perf_counter() - started
        with lock, out.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            written.append(row)
        outcome = row.get("headline", {}).get("ground_truth", row.get("error", "")[-300:])
        print(run_key(row), json.dumps(outcome, default=str)[:400], flush=True)

    audiences = sorted({job["audience"] for job in todo})
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = {audience: pool.submit(build_world, work, audience, grid.get("base", {}),
                                         devices[i % len(devices)], threads) for i, audience in enumerate(audiences)}
        worlds, failed = {}, {}
        for audience, future in futures.items():
            try:
                worlds[audience] = future.result()
            except (RuntimeError, OSError) as error:
                failed[audience] = str(error)[-3000:]
        print(f"worlds ready in {time.perf_counter() - started:.0f} s", flush=True)
        for job in todo:
            if job["audience"] in failed:
                for name in job["sample"]:
                    emit({key: job[key] for key in ("audience", "split", "recipe", "seed")}
                         | {"sample": name, "error": f"world failed: {failed[job['audience']]}"})
        runnable = [job | {"world": worlds[job["audience"]], "done": done} for job in todo if job["audience"] in worlds]
        list(pool.map(lambda item: run_training(item[1], devices[item[0] % len(devices)], threads, emit),
                      enumerate(runnable)))
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    return len(written)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="grid JSON (see the module docstring), or a path to one")
    parser.add_argument("--out", type=Path, required=True, help="results, one JSON line per run (appended)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (built worlds are reused)")
    parser.add_argument("--jobs", "--workers", type=int, default=4, help="trainings at once (processes)")
    parser.add_argument("--gpus", type=int, default=None, help="default: all visible CUDA devices (0: CPU)")
    parser.add_argument("--split", choices=("all", *SPLITS), default="all", help="which audiences to run")
    parser.add_argument("--seeds", type=lambda text: [int(seed) for seed in text.split(",")], default=None,
                        help="run only these of the grid's training seeds, e.g. 7,1234 (default: all)")
    parser.add_argument("--audiences", type=lambda text: text.split(","), default=None,
                        help="run only these of the grid's audiences, e.g. beach,caps (default: all)")
    args = parser.parse_args(argv)
    grid = json.loads(Path(args.grid).read_text() if Path(args.grid).is_file() else args.grid)
    run_grid(grid, args.out, args.work, jobs=args.jobs, gpus=args.gpus, split=args.split,
             seeds=args.seeds, audiences=args.audiences)


if __name__ == "__main__":
    main()

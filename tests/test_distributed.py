"""Two training processes on the CPU over gloo (torchrun): the multi-GPU failure paths without GPUs.

Each run starts 2 processes of tests/_distributed_train.py on the micro UNet; each writes what it
saw to rank<k>.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_training import write_cache

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def launch(mode: str, cache: Path, checkpoints: Path, out: Path, timeout: float = 300) -> tuple[list[dict], str]:
    """torchrun 2 processes; (each process's result, the combined output). A hang fails by timeout."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]), OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(TESTS / "_distributed_train.py"), mode, str(cache), str(checkpoints), str(out / "adapter"), str(out)],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )
    results = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    return results, completed.stdout + completed.stderr


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # 8 images over 2 processes in batches of 2: 2 optimizer steps per epoch.
    return write_cache(tmp_path_factory.mktemp("cache") / "latents.safetensors", num_images=8)


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    return launch("train", cache, root / "checkpoints", root)


def test_two_processes_train_as_one_and_only_the_main_one_logs(straight):
    results, output = straight
    assert [r["rank"] for r in results] == [0, 1] and all(r["world_size"] == 2 for r in results), output
    assert results[0]["losses"] == results[1]["losses"] and len(results[0]["losses"]) == 6
    assert output.count("epoch 1/3") == 1 and "[process 0] epoch 1/3" in output, output
    assert "[process 1]" not in output


def test_a_non_finite_loss_on_one_process_stops_every_process_with_the_same_message(cache, tmp_path):
    started = time.perf_counter()
    results, output = launch("nan", cache, tmp_path / "checkpoints", tmp_path, timeout=240)
    assert len(results) == 2, output  # neither process was left waiting in a collective
    messages = {r.get("error") for r in results}
    assert len(messages) == 1, messages  # the same words on every process
    (message,) = messages
    assert message.startswith("loss is non-finite on process(es) [1] of 2 (") and "at optimizer step 3 (epoch 2" in (
        message)
    assert time.perf_counter() - started < 240


def test_an_interrupted_two_process_run_resumes_after_a_barrier(cache, tmp_path, straight):
    crashed, output = launch("crash", cache, tmp_path / "checkpoints", tmp_path / "crash")
    assert all(r.get("interrupted") for r in crashed) and len(crashed) == 2, output
    resumed, output = launch("train", cache, tmp_path / "checkpoints", tmp_path / "resume")
    assert [r["resumed_from_epoch"] for r in resumed] == [1, 1], output
    assert output.count("resumed from") == 1  # logged by the main process only
    assert all(r["losses"] == straight[0][0]["losses"] for r in resumed)


def test_the_train_stage_runs_under_its_launcher_param_on_two_processes(tiny_sd_dir, tmp_path):
    """dvc.yaml starts the stage as `${train.launcher} -m stages.train ...`: the real stage under a
    2-process launcher writes one adapter and one metrics file, from half the steps per epoch."""
    import yaml
    from test_training import _train_stage_params

    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert dvc_yaml["stages"]["train"]["cmd"].startswith("${train.launcher} -m stages.train ")
    assert yaml.safe_load((REPO / "params.yaml").read_text())["train"]["launcher"] == "python"

    cache = write_cache(tmp_path / "latents.safetensors", num_images=8, text_width=32)  # the tiny SD's width
    params = _train_stage_params(tiny_sd_dir, batch_size=2, epochs=2)
    params["train"]["launcher"] = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    command = (f"{params['train']['launcher']} -m stages.train --latents {cache} --out {tmp_path / 'adapter'} "
               f"--checkpoints {tmp_path / 'ckpt'} --live {tmp_path / 'live'} --metrics {tmp_path / 'metrics.json'} "
               f"--run-info {tmp_path / 'run_info.json'} --summary {tmp_path / 'summary.json'} "
               f"--params {tmp_path / 'params.yaml'}")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    completed = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # 8 images in batches of 2 over 2 processes: 2 optimizer steps per epoch, not 4.
    assert metrics["steps"] == 4
    assert (tmp_path / "adapter" / "ecm.safetensors").is_file()
    assert len((tmp_path / "live/plots/metrics/loss.tsv").read_text().splitlines()) == 1 + 4

"""Two training processes on the CPU over gloo (torchrun): what multi-GPU training promises, without GPUs.

Each run starts 2 (or 1) processes of tests/_distributed_train.py on the micro UNet; each writes
what it saw to rank<k>.json. The first tests check that two processes at batch b train the
adapter one process trains at batch 2b (and that this comparison catches unsynchronised
gradients); the others, the failure paths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import write_cache

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def launch(mode: str, cache: Path, checkpoints: Path, out: Path, timeout: float = 300, processes: int = 2,
           batch_size: int = 2) -> tuple[list[dict], str]:
    """torchrun `processes` processes; (each process's result, the combined output). A hang fails by timeout."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]), OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
         str(TESTS / "_distributed_train.py"), mode, str(cache), str(checkpoints), str(out / "adapter"), str(out),
         str(batch_size)],
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


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """LoRA and ECM weights of the adapter a run saved, by name."""
    return {f"{name}:{key}": tensor for name in ("ec_lora.safetensors", "ecm.safetensors")
            for key, tensor in load_file(run_dir / "adapter" / name).items()}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


# Float tolerance: the two splits sum the same gradients in another order (gloo's all-reduce of
# two half-batch means versus one mean over the whole batch), which Adam's normalisation can
# lift to about 1e-7 after a few steps; an unsynchronised run differs by about 1e-2.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def one_process_double_batch(cache, tmp_path_factory):
    """The reference: one process at batch 4, noise tied to the images."""
    root = tmp_path_factory.mktemp("one")
    results, output = launch("per-sample-noise", cache, root / "checkpoints", root, processes=1, batch_size=4)
    assert len(results) == 1 and results[0]["world_size"] == 1, output
    return root, results[0]


def test_two_processes_at_batch_b_train_the_adapter_one_process_trains_at_batch_2b(one_process_double_batch, cache,
                                                                                   tmp_path):
    reference_dir, reference = one_process_double_batch
    results, output = launch("per-sample-noise", cache, tmp_path / "checkpoints", tmp_path, batch_size=2)
    assert [r["world_size"] for r in results] == [2, 2], output
    # The same images per step (process k takes batch k of each pair), so the same mean losses...
    assert results[0]["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    # ...and the same adapter, which training moved well away from where it started (B starts at 0).
    one, two = adapter_tensors(reference_dir), adapter_tensors(tmp_path)
    difference = largest_difference(one, two)
    print(f"two processes at batch 2 vs one at batch 4: largest weight difference {difference:.3g}")
    assert difference < TOLERANCE
    trained_b = max(t.abs().max().item() for k, t in two.items() if k.startswith("ec_lora") and "lora_B" in k)
    assert trained_b > 1000 * TOLERANCE


def test_the_comparison_catches_processes_that_do_not_average_their_gradients(one_process_double_batch, cache,
                                                                             tmp_path):
    """The same run with the all-reduce switched off: each process follows its own half-batch."""
    reference_dir, _ = one_process_double_batch
    results, output = launch("unsynced", cache, tmp_path / "checkpoints", tmp_path, batch_size=2)
    assert len(results) == 2 and all("losses" in r for r in results), output
    difference = largest_difference(adapter_tensors(reference_dir), adapter_tensors(tmp_path))
    print(f"unsynchronised two processes vs one: largest weight difference {difference:.3g}")
    assert difference > 100 * TOLERANCE


def test_two_processes_see_the_same_averaged_losses_and_only_the_main_one_logs(straight):
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

"""End to end: copy the repo into a temporary git repository and run the DVC pipeline."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ec_lora_t.training.cache import load_latent_cache
from stages._common import merge_params

REPO = Path(__file__).resolve().parent.parent
# Small enough for a 2-core CPU in a few minutes, big enough for grouped folds and a sweep.
SMALL_PARAMS = {
    "demo_data": {"num_posts": 30},
    "train": {"epochs": 1, "batch_size": 8},
    "regressor": {"folds": 3},
    "evaluate": {"num_inference_steps": 3, "permutations": 50, "time_targets": [0.0, 1.0]},
}


def _run(args: list[str], cwd: Path, check: bool = True, **env_vars: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env_vars)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def _copy_repo(root: Path, params_override: dict) -> Path:
    """Copy the project's files (tracked and new, not ignored) into a new git repository."""
    listed = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO).stdout.split()
    for name in listed:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    for stale in (root / "metrics").glob("*.json"):
        stale.unlink()
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(merge_params(params, params_override), sort_keys=False))
    _run(["git", "init", "-q"], cwd=root)
    _run(["git", "config", "user.email", "test@example.com"], cwd=root)
    _run(["git", "config", "user.name", "test"], cwd=root)
    _run(["git", "add", "-A"], cwd=root)
    _run(["git", "commit", "-qm", "test copy"], cwd=root)
    return root


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> Path:
    return _copy_repo(tmp_path_factory.mktemp("pipeline") / "repo", SMALL_PARAMS)


def _finite_numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _finite_numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _finite_numbers(v)]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    return [float(value)]


@pytest.mark.slow
def test_dvc_repro_end_to_end(pipeline_repo):
    root = pipeline_repo
    _run([sys.executable, "-m", "dvc", "repro"], cwd=root)

    # Every declared output and metrics file exists.
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    for name, stage in dvc_yaml["stages"].items():
        for out in stage.get("outs", []) + stage.get("metrics", []):
            path = out if isinstance(out, str) else next(iter(out))
            assert (root / path).exists(), f"stage {name} did not write {path}"

    # Metrics hold finite numbers.
    for metrics_file in (root / "metrics").glob("*.json"):
        numbers = _finite_numbers(json.loads(metrics_file.read_text()))
        assert numbers, f"{metrics_file.name} holds no numbers"
        assert all(math.isfinite(x) for x in numbers), metrics_file.name

    # Row counts agree from stage to stage.
    demo = json.loads((root / "metrics/demo_data.json").read_text())
    posts = pd.read_parquet(root / "data/ingest/posts.parquet")
    assert len(posts) == demo["images"] and posts["shortcode"].nunique() == demo["posts"] == 30
    assert len(pd.read_parquet(root / "data/ingest/rejects.parquet")) == 0
    features = pd.read_parquet(root / "data/features/train.parquet")
    assert len(features) == len(posts)
    assert features["normalized_engagement"].between(0, 1).all() and features["normalized_time"].between(0, 1).all()
    cache = load_latent_cache(root / "data/latents")
    assert cache.latent_mean.shape[0] == cache.text_embeddings.shape[0] == len(posts)
    loss = pd.read_csv(root / "data/train/live/plots/metrics/loss.tsv", sep="\t")
    assert len(loss) == json.loads((root / "metrics/train.json").read_text())["steps"] > 0
    assert json.loads((root / "data/run_info/train.json").read_text())["images_per_second"] > 0
    # evaluate.precision fp32 (the default): the sampling ran in fp32, and the run says so.
    evaluate_info = json.loads((root / "data/run_info/evaluate.json").read_text())
    assert (evaluate_info["device"], evaluate_info["sampling_dtype"]) == ("cpu", "float32")
    for mode in ("ec_lora", "plain_lora", "base", "retrieval"):
        sweep = pd.read_csv(root / f"data/plots/sweep/{mode}.csv")
        assert {"target_engagement", "predicted_engagement", "ground_truth_score"} <= set(sweep.columns)
        assert sweep["predicted_engagement"].notna().all() and (sweep["mode"] == mode).all()
    for protocol in ("grouped_kfold", "report"):
        assert len(pd.read_csv(root / f"data/plots/regressor/{protocol}.csv")) > 0
    assert (root / "data/evaluate/engagement_sweep.png").stat().st_size > 0
    assert (root / "data/evaluate/report.md").stat().st_size > 0

    # Nothing changed: nothing reruns.
    status = _run([sys.executable, "-m", "dvc", "status"], cwd=root).stdout
    assert "up to date" in status, status
    again = _run([sys.executable, "-m", "dvc", "repro"], cwd=root).stdout
    assert "Running stage" not in again, again

    # An edit to code only ingest uses marks only ingest as changed (not the GPU stages).
    instaloader = root / "ec_lora_t" / "data" / "ingest" / "instaloader.py"
    original = instaloader.read_text()
    instaloader.write_text(original + "\n# an edit that only the ingest stage sees\n")
    changed = json.loads(_run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root).stdout)
    assert set(changed) == {"ingest"}, changed
    instaloader.write_text(original)
    assert "up to date" in _run([sys.executable, "-m", "dvc", "status"], cwd=root).stdout

    _run(["git", "add", "-A"], cwd=root)
    _run(["git", "commit", "-qm", "baseline run"], cwd=root)

    # Rerunning a stage with nothing changed leaves git clean: timings and cache use are not
    # in the committed metrics, and the outputs (so dvc.lock) come out byte for byte the same.
    shutil.rmtree(root / "data/train/checkpoints")  # else train would resume at its last epoch
    for stage in ("caption", "latents", "train"):
        assert f"Running stage '{stage}'" in _run([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], cwd=root).stdout
        assert _run(["git", "status", "--porcelain"], cwd=root).stdout == "", f"rerunning {stage} changed tracked files"
    assert json.loads((root / "data/run_info/latents.json").read_text())["images_encoded"] == 0  # from the cache

    # A remote shares the results: push, clone, pull, and nothing needs to run again.
    remote = root.parent / "remote"
    _run([sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", str(remote)], cwd=root)
    _run(["git", "commit", "-qam", "a DVC remote"], cwd=root)
    _run([sys.executable, "-m", "dvc", "push"], cwd=root)
    clone = root.parent / "clone"
    _run(["git", "clone", "-q", str(root), str(clone)], cwd=root.parent)
    _run([sys.executable, "-m", "dvc", "pull"], cwd=clone)
    assert "up to date" in _run([sys.executable, "-m", "dvc", "status"], cwd=clone).stdout
    pulled = _run([sys.executable, "-m", "dvc", "repro"], cwd=clone).stdout
    assert "Running stage" not in pulled, pulled
    figure = "data/evaluate/engagement_sweep.png"
    assert (clone / figure).read_bytes() == (root / figure).read_bytes()

    # A variant reruns only train and evaluate (and the params check, which takes a second),
    # and the metrics diff shows it.
    baseline_adapter = _tree_digest(root / "data/train/adapter")
    experiment = _dvc(root, "exp", "run", "--name", "rank4", "-S", "train.lora_rank=4").stdout
    assert _stages_run(experiment) == {"validate_params", "train", "evaluate"}, experiment
    diff = _dvc(root, "metrics", "diff", "--json").stdout
    changed = json.loads(diff)
    assert any(path.startswith("metrics/train") for path in changed), diff
    assert any(path.startswith("metrics/evaluate") for path in changed), diff
    # The headline metrics of a one-param experiment fit a 160-column terminal: no column cut.
    shown = _run([sys.executable, "-m", "dvc", "exp", "show", "--only-changed", "--no-pager"], cwd=root,
                 COLUMNS="160").stdout
    assert "rank4" in shown and "spearman" in shown and "…" not in shown, shown
    assert max(len(line.rstrip()) for line in shown.splitlines()) <= 160, shown

    # A bad value costs one line and nothing else: no stage ran, every output is still there.
    rank4_adapter = _tree_digest(root / "data/train/adapter")
    kept = {path: _tree_digest(root / path) for path in ("data/train/adapter", "data/features/normalization.json",
                                                         "metrics/train.json", "data/train/live/plots/metrics/loss.tsv")}
    good_params = (root / "params.yaml").read_text()
    for bad, expected in [("train.epochs=2.5", "train.epochs = 2.5: must be a valid integer"),
                          ("features.normalization=foo", "features.normalization = 'foo': must be 'minmax', "),
                          ("train.learning_rate=abc", "train.learning_rate = 'abc': must be a valid number")]:
        failed = _dvc(root, "exp", "run", "-S", bad, check=False)
        assert failed.returncode != 0
        assert expected in failed.stdout + failed.stderr, failed.stdout + failed.stderr
        assert _stages_run(failed.stdout) == {"validate_params"}, failed.stdout
        assert {path: _tree_digest(root / path) for path in kept} == kept, bad
        (root / "params.yaml").write_text(good_params)  # the failed -S stays in params.yaml (README)

    # Back to the baseline's params: DVC's run cache gives its adapter back, nothing trains.
    back = _dvc(root, "exp", "run", "--name", "back", "-S", "train.lora_rank=16").stdout
    assert "Running stage 'train'" not in back and "Stage 'train' is cached" in back, back
    assert _tree_digest(root / "data/train/adapter") == baseline_adapter
    # `dvc exp apply` leaves nothing to retrain (the checkpoints are not a DVC output).
    _dvc(root, "exp", "apply", "rank4")
    assert _tree_digest(root / "data/train/adapter") == rank4_adapter
    assert "up to date" in _dvc(root, "status").stdout
    assert _stages_run(_dvc(root, "repro").stdout) == set()


def _dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], cwd=root, check=check)


def _stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def _tree_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and bytes)."""
    digest = hashlib.sha256()
    for file in sorted([path] if path.is_file() else (p for p in path.rglob("*") if p.is_file())):
        digest.update(file.relative_to(path.parent).as_posix().encode() + file.read_bytes())
    return digest.hexdigest()


def _epoch_checkpoints(root: Path) -> list[Path]:
    return sorted((root / "data/train/checkpoints").glob("*/epoch-*"))


@pytest.mark.slow
@pytest.mark.parametrize("kill_signal", [signal.SIGINT, signal.SIGKILL])
def test_killed_dvc_repro_resumes_to_the_same_weights(pipeline_repo, kill_signal):
    """Kill `dvc repro` (Ctrl-C, or kill -9) mid-epoch; the next `dvc repro` resumes from the last
    checkpoint and ends bit-identical to an uninterrupted run; `dvc repro -f` trains from scratch."""
    root = pipeline_repo
    params = yaml.safe_load((root / "params.yaml").read_text())
    epochs = 4 if kill_signal == signal.SIGINT else 5  # params never run before: DVC's run cache has no answer
    params["train"] |= {"epochs": epochs, "lora_rank": 16}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _dvc(root, "repro", "latents")

    # Ctrl-C in a terminal signals the whole foreground process group: dvc and the stage.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    # A shell without job control starts background commands with SIGINT ignored, and that
    # is inherited: restore the default, as a terminal's foreground job has it.
    killed = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while not _epoch_checkpoints(root) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(killed.pid, kill_signal)  # in epoch 2 (or saving its checkpoint)
    output = killed.communicate(timeout=120)[0]
    assert killed.returncode != 0, output
    saved = _epoch_checkpoints(root)
    assert saved and not (root / "data/train/adapter").exists(), output

    resumed = _dvc(root, "repro", "train")
    log = resumed.stdout + resumed.stderr
    run_dir = saved[0].parent.relative_to(root)
    newest = max(int(path.name.split("-")[1]) for path in saved)
    assert any(f"resumed from {run_dir}/epoch-{epoch:04d} (epoch {epoch} of {epochs} done" in log
               for epoch in range(1, newest + 1)), log
    assert json.loads((root / "data/run_info/train.json").read_text())["resumed_from_epoch"] >= 1
    assert not _epoch_checkpoints(root)  # a finished run keeps no checkpoints
    resumed_adapter = _tree_digest(root / "data/train/adapter")

    # -s: force train alone (a bare -f reruns every stage before it too). A finished run is
    # never resumed: this trains from scratch, and ends on the same bits.
    scratch = _dvc(root, "repro", "-f", "-s", "train")
    assert "starting from scratch" in scratch.stdout + scratch.stderr
    assert "resumed from" not in scratch.stdout + scratch.stderr
    assert json.loads((root / "data/run_info/train.json").read_text())["resumed_from_epoch"] == 0
    assert _tree_digest(root / "data/train/adapter") == resumed_adapter


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_ingest_fails_clearly_on_missing_or_empty_posts_dir(tmp_path, kind):
    posts_dir = tmp_path / "posts"
    if kind == "empty":
        posts_dir.mkdir()
    root = _copy_repo(tmp_path / "repo", {"ingest": {"posts_dir": str(posts_dir)}})
    result = _run([sys.executable, "-m", "dvc", "repro", "ingest"], cwd=root, check=False)
    message = result.stdout + result.stderr
    assert result.returncode != 0
    assert "ingest" in message and str(posts_dir) in message, message
    if kind == "missing":
        # DVC checks a missing dependency before it runs the stage, and says so itself;
        # the stage run on its own explains the expected layout.
        direct = _run(
            [sys.executable, "-m", "stages.ingest", "--out-table", str(tmp_path / "posts.parquet"),
             "--out-rejects", str(tmp_path / "rejects.parquet"), "--metrics", str(tmp_path / "ingest.json")],
            cwd=root,
            check=False,
        )
        assert direct.returncode != 0
        message = direct.stdout + direct.stderr
        assert str(posts_dir) in message, message
    assert "metadata.csv" in message, message  # the expected layout is spelled out

"""Training from cached latents on the tiny UNet: resume, one folder per run, verified checkpoints,
clipping, non-finite loss, cache errors, the stage."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from ec_lora_t.adapter import ECLoRAConfig
from ec_lora_t.adapter.config import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, ECM_WEIGHTS_NAME
from ec_lora_t.training.cache import load_latent_cache
from ec_lora_t.training.checkpoint import list_checkpoints, list_runs
from ec_lora_t.training.config import TrainingConfig
from ec_lora_t.training.loop import NonFiniteLossError, make_accelerator, train_ec_lora

LORA = dict(rank=4, alpha=8, ecm_hidden_size=16)
# 5 images in batches of 2 with 2-batch accumulation: 3 batches (last one short) and
# 2 optimizer steps per epoch, so resuming must get the accumulation boundary right.
TRAINING = dict(epochs=3, batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2, mixed_precision="no")
MICRO_TEXT_WIDTH = 8


def micro_unet() -> UNet2DConditionModel:
    """A seeded UNet small enough for many CPU steps (diffusers' get_dummy_components style)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=MICRO_TEXT_WIDTH, norm_num_groups=2, attention_head_dim=2,
    )


def write_cache(path, num_images=5, latent_size=8, text_width=MICRO_TEXT_WIDTH, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "latent_mean": torch.randn(num_images, 4, latent_size, latent_size, generator=generator),
        "latent_std": 0.1 * torch.rand(num_images, 4, latent_size, latent_size, generator=generator),
        "text_embeddings": torch.randn(num_images, 77, text_width, generator=generator),
        "engagement_time": torch.rand(num_images, 2, generator=generator),
    }
    save_file(tensors, path)
    return path


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two
    threads per op made these steps 10-50x slower (contention), so run them on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "latents.safetensors")


def fresh_accelerator(training: TrainingConfig):
    """accelerate's state is process-wide: reset it so each test can pick its own precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return make_accelerator(training)


def run_training(cache_path, checkpoints, adapter_dir=None, on_step=None, unet=None, log=None, lora=None, **overrides):
    training = TrainingConfig(**{**TRAINING, **overrides})
    return train_ec_lora(
        fresh_accelerator(training),
        unet if unet is not None else micro_unet(),
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        load_latent_cache(cache_path),
        ECLoRAConfig(**{**LORA, **(lora or {})}),
        training,
        checkpoints,
        adapter_dir=adapter_dir,
        on_step=on_step,
        log=log if log is not None else (lambda message: None),
    )


def crash_at(step_to_crash: int):
    """An on_step that kills the run at an optimizer step (2 steps per epoch: step 3 is in epoch 2)."""

    def on_step(step, loss, **info):
        if step == step_to_crash:
            raise KeyboardInterrupt
    return on_step


def interrupted_run(cache_path, checkpoints, step_to_crash=3, **overrides):
    """A run killed at `step_to_crash`; returns its run folder."""
    before = set(list_runs(checkpoints))
    with pytest.raises(KeyboardInterrupt):
        run_training(cache_path, checkpoints, on_step=crash_at(step_to_crash), **overrides)
    (run_dir,) = set(list_runs(checkpoints)) - before
    return run_dir


def assert_same_adapter(expected_dir, actual_dir):
    for name in (ADAPTER_WEIGHTS_NAME, ECM_WEIGHTS_NAME):
        expected, actual = load_file(expected_dir / name), load_file(actual_dir / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), key


@pytest.fixture(scope="module")
def straight_run(cache_path, tmp_path_factory):
    """The uninterrupted 3-epoch run every resumed run must reproduce bit for bit."""
    root = tmp_path_factory.mktemp("straight")
    result = run_training(cache_path, root / "checkpoints", root / "adapter")
    return result, root / "adapter", root / "checkpoints"


def test_resumed_run_ends_like_an_uninterrupted_one(cache_path, tmp_path, straight_run):
    straight, straight_adapter, straight_checkpoints = straight_run
    assert straight.steps == 6 and len(straight.losses) == 6 and len(straight.grad_norms) == 6
    assert all(torch.isfinite(torch.tensor(straight.losses + straight.grad_norms)))
    assert straight.images_seen == 3 * 5
    assert list_runs(straight_checkpoints) == []  # a finished run removes its checkpoints

    seen = []
    run_dir = interrupted_run(cache_path, tmp_path / "ckpt", step_to_crash=5, checkpoints_total_limit=1)
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch-0002"]  # only the newest (limit 1)
    resumed = run_training(cache_path, tmp_path / "ckpt", tmp_path / "resumed", log=seen.append)
    assert resumed.resumed_from_epoch == 2
    assert f"resumed from {run_dir / 'epoch-0002'} (epoch 2 of 3 done, step 4)" in seen
    assert resumed.losses == straight.losses and resumed.grad_norms == straight.grad_norms
    # Epochs 1 and 2 count towards throughput: their images came back with the checkpoint.
    assert resumed.images_seen == straight.images_seen
    assert_same_adapter(straight_adapter, tmp_path / "resumed")
    assert not run_dir.exists()
    # The adapter really trained: B left zero and the ECM left its constant-1 start.
    lora = load_file(straight_adapter / ADAPTER_WEIGHTS_NAME)
    assert all(torch.count_nonzero(v) > 0 for k, v in lora.items() if k.endswith("lora_B.weight"))
    ecm = load_file(straight_adapter / ECM_WEIGHTS_NAME)
    assert torch.count_nonzero(ecm[max(k for k in ecm if k.endswith("weight"))]) > 0


def test_ema_saves_the_average_and_leaves_training_alone(cache_path, tmp_path, straight_run):
    """train.ema_decay: the same losses (the average never feeds back), an adapter that is not
    the last step's; with a decay near 0 the average is the last step's weights."""
    straight, straight_adapter, _ = straight_run
    averaged = run_training(cache_path, tmp_path / "ckpt", tmp_path / "ema", ema_decay=0.9)
    assert averaged.losses == straight.losses and averaged.grad_norms == straight.grad_norms
    last, ema = load_file(straight_adapter / ADAPTER_WEIGHTS_NAME), load_file(tmp_path / "ema" / ADAPTER_WEIGHTS_NAME)
    assert max((last[key] - ema[key]).abs().max().item() for key in last) > 1e-4
    ecm_last, ecm_ema = load_file(straight_adapter / ECM_WEIGHTS_NAME), load_file(tmp_path / "ema" / ECM_WEIGHTS_NAME)
    assert any(not torch.equal(ecm_last[key], ecm_ema[key]) for key in ecm_last)
    run_training(cache_path, tmp_path / "ckpt", tmp_path / "ema0", ema_decay=1e-9)
    near_last = load_file(tmp_path / "ema0" / ADAPTER_WEIGHTS_NAME)
    for key in last:
        torch.testing.assert_close(near_last[key], last[key], rtol=0, atol=1e-6)


def test_a_resumed_ema_run_ends_like_an_uninterrupted_one(cache_path, tmp_path):
    """The checkpoint keeps the moving average: resuming averages exactly as an unbroken run."""
    run_training(cache_path, tmp_path / "straight", tmp_path / "straight_adapter", ema_decay=0.9)
    run_dir = interrupted_run(cache_path, tmp_path / "ckpt", step_to_crash=5, ema_decay=0.9)
    assert (list_checkpoints(run_dir)[-1] / "ema.safetensors").is_file()
    run_training(cache_path, tmp_path / "ckpt", tmp_path / "resumed", ema_decay=0.9)
    assert_same_adapter(tmp_path / "straight_adapter", tmp_path / "resumed")


def test_a_standardized_ecm_input_is_fitted_to_the_cache_saved_and_resumed(cache_path, tmp_path):
    """train.ecm_input: standardized: the adapter keeps the cache's mean and std (population), and
    a run that reads them resumes like any other."""
    standardized = dict(ecm_input="standardized")
    run_training(cache_path, tmp_path / "ckpt", tmp_path / "straight", lora=standardized)
    saved = json.loads((tmp_path / "straight" / ADAPTER_CONFIG_NAME).read_text())
    vectors = load_latent_cache(cache_path).engagement_time.double()
    assert saved["ecm_input"] == "standardized"
    assert saved["ecm_input_mean"] == pytest.approx(vectors.mean(0).tolist())
    assert saved["ecm_input_std"] == pytest.approx(vectors.std(0, correction=0).tolist())
    interrupted_run(cache_path, tmp_path / "ckpt2", lora=standardized)
    resumed = run_training(cache_path, tmp_path / "ckpt2", tmp_path / "resumed", lora=standardized)
    assert resumed.resumed_from_epoch == 1
    assert_same_adapter(tmp_path / "straight", tmp_path / "resumed")


def test_another_run_keeps_and_never_resumes_this_runs_checkpoints(cache_path, tmp_path, straight_run):
    """Train A (interrupted), run experiment B to the end, go back to A: A resumes its own epoch."""
    _, straight_adapter, _ = straight_run
    run_a = interrupted_run(cache_path, tmp_path / "ckpt")
    other = run_training(cache_path, tmp_path / "ckpt", tmp_path / "b", learning_rate=1e-3)
    assert other.resumed_from_epoch == 0
    assert [p.name for p in list_checkpoints(run_a)] == ["epoch-0001"]  # B left A's checkpoint alone
    back_to_a = run_training(cache_path, tmp_path / "ckpt", tmp_path / "a")
    assert back_to_a.resumed_from_epoch == 1
    assert_same_adapter(straight_adapter, tmp_path / "a")


def test_another_base_model_never_resumes(cache_path, tmp_path):
    """Same config, same latent cache, one base weight changed: a run of its own."""
    run_a = interrupted_run(cache_path, tmp_path / "ckpt")
    other_base = micro_unet()
    with torch.no_grad():
        other_base.conv_in.bias[0] += 1e-3
    seen = []
    other = run_training(cache_path, tmp_path / "ckpt", unet=other_base, epochs=3, log=seen.append)
    assert other.resumed_from_epoch == 0
    assert any("starting from scratch" in line for line in seen), seen
    assert [p.name for p in list_checkpoints(run_a)] == ["epoch-0001"]


def test_only_the_most_recently_used_unfinished_runs_are_kept(cache_path, tmp_path):
    runs = [interrupted_run(cache_path, tmp_path / "ckpt", learning_rate=rate, checkpoint_runs_limit=2)
            for rate in (1e-2, 2e-2, 3e-2)]
    assert list_runs(tmp_path / "ckpt") == runs[1:]  # the least recently used went, beyond the limit


@pytest.mark.parametrize("damage", ["truncated", "non_finite", "half_written"])
def test_an_unusable_newest_checkpoint_is_named_and_the_previous_one_used(cache_path, tmp_path, straight_run, damage):
    _, straight_adapter, _ = straight_run
    run_dir = interrupted_run(cache_path, tmp_path / "ckpt", step_to_crash=5)
    newest = run_dir / "epoch-0002"
    if damage == "truncated":  # a disk that filled up, a copy cut short
        weights = newest / ADAPTER_WEIGHTS_NAME
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "non_finite":
        tensors = load_file(newest / ECM_WEIGHTS_NAME)
        name = sorted(tensors)[0]
        tensors[name][0] = float("nan")
        save_file(tensors, newest / ECM_WEIGHTS_NAME)
    else:  # a save killed before its rename: only the dot-named folder exists
        newest.rename(run_dir / ".epoch-0002.partial")
    seen = []
    resumed = run_training(cache_path, tmp_path / "ckpt", tmp_path / "adapter", log=seen.append)
    assert resumed.resumed_from_epoch == 1
    problems = [line for line in seen if line.startswith("cannot resume from")]
    if damage == "half_written":
        assert problems == []  # never even considered
    else:
        assert problems and str(newest) in problems[0]
        assert ("unreadable" if damage == "truncated" else "non-finite values") in problems[0]
    assert_same_adapter(straight_adapter, tmp_path / "adapter")


def test_gradient_norm_is_logged_and_clipped(cache_path, tmp_path, straight_run):
    straight, _, _ = straight_run  # max_grad_norm 1.0, the default
    unclipped = run_training(cache_path, tmp_path / "a", max_grad_norm=None)
    tiny = run_training(cache_path, tmp_path / "b", max_grad_norm=1e-6)
    # The logged norm is the one before clipping: the first step's is the same in every run.
    assert straight.grad_norms[0] == unclipped.grad_norms[0] == tiny.grad_norms[0] > 1e-6
    assert straight.losses[0] == unclipped.losses[0] == tiny.losses[0]
    # Clipping changes the updates, hence every loss after the first update with a learning
    # rate above 0 (step 1 is the warm-up's, at 0).
    assert all(a != b for a, b in zip(unclipped.losses[2:], tiny.losses[2:]))
    assert tiny.max_grad_norm == 1e-6 and unclipped.max_grad_norm is None


def test_non_finite_loss_stops_with_the_step(cache_path, tmp_path):
    unet = micro_unet()
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"at optimizer step 1 \(epoch 1, batch 1\)"):
        train_ec_lora(
            fresh_accelerator(TrainingConfig(**TRAINING)), unet, DDPMScheduler(), load_latent_cache(cache_path),
            ECLoRAConfig(**LORA), TrainingConfig(**TRAINING), tmp_path / "ckpt", log=lambda message: None,
        )
    # The run's folder was opened, and holds no checkpoint of the failed epoch.
    assert [list_checkpoints(run) for run in list_runs(tmp_path / "ckpt")] == [[]]


def test_bad_latent_cache_names_the_file_and_problem(tmp_path):
    path = write_cache(tmp_path / "latents.safetensors")
    tensors = load_file(path)
    del tensors["engagement_time"]
    save_file(tensors, tmp_path / "no-vector.safetensors")
    with pytest.raises(ValueError, match=r"no-vector.safetensors: missing tensors \['engagement_time'\]"):
        load_latent_cache(tmp_path / "no-vector.safetensors")
    tensors = load_file(path)
    tensors["engagement_time"] = torch.rand(4, 2)
    save_file(tensors, tmp_path / "short.safetensors")
    with pytest.raises(ValueError, match=r"short.safetensors: engagement_time must be \(5, 2\)"):
        load_latent_cache(tmp_path / "short.safetensors")
    with pytest.raises(FileNotFoundError, match="run the latents stage"):
        load_latent_cache(tmp_path / "absent.safetensors")


def _train_stage_params(tiny_sd_dir, **train_overrides) -> dict:
    return {
        "model": {"pretrained": str(tiny_sd_dir), "resolution": 32},
        "train": {
            "lora_rank": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
            "ecm_granularity": "layer",
            "ecm_hidden_size": 8, "ecm_depth": 2, "learning_rate": 1e-3, "weight_decay": 1e-2,
            "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "lr_warmup_ratio": 0.1, "epochs": 2,
            "batch_size": 4, "gradient_accumulation_steps": 1, "mixed_precision": "auto",
            "gradient_checkpointing": True, "seed": 42, **train_overrides,
        },
    }


def _run_train_stage(tmp_path, cache_path, params, name="run"):
    from stages.train import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    main([
        "--latents", str(cache_path), "--out", str(tmp_path / name / "adapter"),
        "--checkpoints", str(tmp_path / "ckpt"), "--live", str(tmp_path / name / "live"),
        "--metrics", str(tmp_path / name / "metrics.json"), "--run-info", str(tmp_path / name / "run_info.json"),
        "--summary", str(tmp_path / name / "summary.json"),
        "--params", str(tmp_path / "params.yaml"),
    ])
    return tmp_path / name


def _tsv(path) -> list[dict]:
    return list(csv.DictReader(open(path), delimiter="\t"))


def test_train_stage_writes_adapter_live_log_and_metrics(tiny_sd_dir, tmp_path):
    cache_path = write_cache(tmp_path / "latents.safetensors", text_width=32)  # the tiny SD's text width
    params = _train_stage_params(tiny_sd_dir)
    run = _run_train_stage(tmp_path, cache_path, params)

    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["rank"] == 4
    assert all(name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for name in config["layer_names"])
    # dvclive's step log: one row per optimizer step, numbered from 1 (5 images in batches of 4, 2 epochs).
    metrics_dir = run / "live" / "plots" / "metrics"
    loss = _tsv(metrics_dir / "loss.tsv")
    assert [int(r["step"]) for r in loss] == [1, 2, 3, 4] and list(loss[0]) == ["step", "loss"]
    learning_rates = [float(r["learning_rate"]) for r in _tsv(metrics_dir / "learning_rate.tsv")]
    assert len(learning_rates) == 4 and learning_rates[0] > learning_rates[-1]  # warmup, then cosine decay to 0
    assert [int(r["step"]) for r in _tsv(metrics_dir / "images_per_second.tsv")] == [2, 3, 4]
    assert all(float(r["images_per_second"]) > 0 for r in _tsv(metrics_dir / "images_per_second.tsv"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"loss", "steps", "clipped_steps"} and metrics["steps"] == 4
    assert metrics["loss"] == pytest.approx(np.mean([float(r["loss"]) for r in loss[2:]]), rel=1e-3)  # epoch 2, 4 digits
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mixed_precision"] == "no" and summary["final_loss"] == pytest.approx(float(loss[-1]["loss"]), rel=1e-3)
    # Timings are not metrics: a rerun with the same results must leave the metrics file alike.
    assert not {"images_per_second", "peak_memory_mb", "seconds", "resumed_from_epoch"} & metrics.keys()
    grad_norms = [float(r["grad_norm"]) for r in _tsv(metrics_dir / "grad_norm.tsv")]
    assert len(grad_norms) == 4 and summary["grad_norm_final"] == pytest.approx(grad_norms[-1], rel=1e-3)
    assert summary["max_grad_norm"] == 1.0  # the default when params leave it out
    assert metrics["clipped_steps"] == sum(norm > 1.0 for norm in grad_norms)
    run_info = json.loads((run / "run_info.json").read_text())
    assert run_info["images_per_second"] > 0 and run_info["peak_memory_mb"] > 0 and run_info["resumed_from_epoch"] == 0

    params["train"]["lora_dropout"] = 0.1  # a typo or unsupported key is an error, not ignored
    with pytest.raises(ValueError, match=r"train.lora_dropout = 0.1: unknown key; section 'train' takes \['adam_beta1'"):
        _run_train_stage(tmp_path, cache_path, params, name="typo")


def test_train_stage_after_a_resume_logs_the_whole_loss_history(tiny_sd_dir, tmp_path, monkeypatch):
    """The loss curve is a DVC output: a resumed run must write the same one as a straight run."""
    from stages.train import TrainingMonitor

    cache_path = write_cache(tmp_path / "latents.safetensors", text_width=32)
    params = _train_stage_params(tiny_sd_dir, epochs=3)  # 2 steps per epoch
    straight = _run_train_stage(tmp_path, cache_path, params, name="straight")
    shutil.rmtree(tmp_path / "ckpt", ignore_errors=True)  # a finished run leaves none anyway

    log_step = TrainingMonitor.__call__

    def killed_in_epoch_two(self, step, loss, **info):
        log_step(self, step, loss, **info)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingMonitor, "__call__", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        _run_train_stage(tmp_path, cache_path, params, name="resumed")
    monkeypatch.undo()
    resumed = _run_train_stage(tmp_path, cache_path, params, name="resumed")

    assert json.loads((resumed / "run_info.json").read_text())["resumed_from_epoch"] == 1
    straight_loss = (straight / "live/plots/metrics/loss.tsv").read_text()
    assert len(_tsv(straight / "live/plots/metrics/loss.tsv")) == 6
    assert (resumed / "live/plots/metrics/loss.tsv").read_text() == straight_loss


def test_caption_dropout_swaps_in_the_generic_caption():
    """p=1 trains every sample on its generic caption, p=0 never does (same noise either way)."""
    from ec_lora_t.adapter import add_ec_lora
    from ec_lora_t.training.objective import diffusion_training_step

    unet = micro_unet()
    adapter = add_ec_lora(unet, ECLoRAConfig(**LORA))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    generator = torch.Generator().manual_seed(1)
    batch = {
        "latent_mean": torch.randn(3, 4, 8, 8, generator=generator),
        "latent_std": torch.zeros(3, 4, 8, 8),
        "text_embeddings": torch.randn(3, 77, MICRO_TEXT_WIDTH, generator=generator),
        "generic_text_embeddings": torch.randn(3, 77, MICRO_TEXT_WIDTH, generator=generator),
        "engagement_time": torch.rand(3, 2, generator=generator),
    }
    generic_batch = {**batch, "text_embeddings": batch["generic_text_embeddings"]}
    accelerator = fresh_accelerator(TrainingConfig(mixed_precision="no"))

    def loss(step_batch, dropout):
        # the dropout draw comes after the noise and timesteps: p=0 and p=1 see the same noise
        return diffusion_training_step(accelerator, unet, adapter, adapter.ecm, scheduler, step_batch,
                                       torch.Generator().manual_seed(7),
                                       caption_dropout=dropout).item()

    assert loss(batch, 0.0) != loss(generic_batch, 0.0)
    assert loss(batch, 1.0) == pytest.approx(loss(generic_batch, 0.0))
    assert loss(batch, 1e-9) == pytest.approx(loss(batch, 0.0))


def test_caption_dropout_needs_generic_embeddings(tmp_path):
    cache = load_latent_cache(write_cache(tmp_path / "latents.safetensors"))
    with pytest.raises(ValueError, match="generic_text_embeddings"):
        training = TrainingConfig(**TRAINING, caption_dropout=0.5)
        train_ec_lora(fresh_accelerator(training), micro_unet(), DDPMScheduler(num_train_timesteps=1000), cache,
                      ECLoRAConfig(**LORA), training, tmp_path / "checkpoints")


def test_bf16_autocast_path_on_the_cpu(cache_path, tmp_path):
    """mixed_precision bf16 (the GPU default) runs on the CPU too: frozen weights in bf16,
    LoRA matmuls under autocast in bf16, master weights and ECM in fp32, a finite loss."""
    seen_dtypes = set()

    def record(module, inputs, output):
        seen_dtypes.add(output.dtype)

    import ec_lora_t.training.loop as loop

    original_setup = loop.setup_training

    def setup_and_watch(*args, **kwargs):
        run = original_setup(*args, **kwargs)
        assert next(run.unet.conv_in.parameters()).dtype == torch.bfloat16
        run.adapter.layers[0].lora_A.register_forward_hook(record)
        return run

    loop.setup_training = setup_and_watch
    try:
        result = run_training(cache_path, tmp_path / "ckpt", tmp_path / "adapter", mixed_precision="bf16", epochs=1)
    finally:
        loop.setup_training = original_setup
    assert result.mixed_precision == "bf16"
    assert seen_dtypes == {torch.bfloat16}  # the LoRA matmul ran under autocast
    assert all(torch.isfinite(torch.tensor(result.losses)))
    lora = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME)
    assert all(v.dtype == torch.float32 for v in lora.values())
    assert all(torch.count_nonzero(v) > 0 for k, v in lora.items() if k.endswith("lora_B.weight"))


def test_accelerator_must_match_the_training_config(cache_path, tmp_path):
    training = TrainingConfig(**{**TRAINING, "mixed_precision": "no"})
    accelerator = fresh_accelerator(TrainingConfig(**{**TRAINING, "mixed_precision": "bf16"}))
    with pytest.raises(ValueError, match="mixed_precision 'bf16'"):
        train_ec_lora(accelerator, micro_unet(), DDPMScheduler(num_train_timesteps=1000),
                      load_latent_cache(cache_path), ECLoRAConfig(**LORA), training, tmp_path / "ckpt")


def step_batch(generator_seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(generator_seed)
    return {
        "latent_mean": torch.randn(4, 4, 8, 8, generator=generator),
        "latent_std": torch.zeros(4, 4, 8, 8),
        "text_embeddings": torch.randn(4, 77, MICRO_TEXT_WIDTH, generator=generator),
        "engagement_time": torch.rand(4, 2, generator=generator),
    }


def test_vector_dropout_one_trains_the_null_vector_only():
    """p=1: every sample gets the null scales (1), i.e. exactly the plain LoRA's step."""
    from ec_lora_t.adapter import add_ec_lora
    from ec_lora_t.training.objective import diffusion_training_step

    unet = micro_unet()
    adapter = add_ec_lora(unet, ECLoRAConfig(**LORA))
    with torch.no_grad():  # an ECM far from 1, so null and vector rows differ
        adapter.ecm.mlp[-1].bias.fill_(3.0)
        for layer in adapter.layers:
            layer.lora_B.weight.normal_()
    accelerator = fresh_accelerator(TrainingConfig(mixed_precision="no"))
    scheduler = DDPMScheduler(num_train_timesteps=1000)

    def loss(**kwargs):
        return diffusion_training_step(accelerator, unet, adapter, adapter.ecm, scheduler, step_batch(),
                                       torch.Generator().manual_seed(7), **kwargs).item()

    dropped = loss(vector_dropout=1.0)
    # the plain LoRA draws one random number fewer per sample (no dropout draw): compare to the
    # ec_lora step whose ECM outputs 1 everywhere instead
    with torch.no_grad():
        adapter.ecm.mlp[-1].bias.fill_(1.0)
    assert dropped == pytest.approx(loss(vector_dropout=1e-12))
    assert loss(vector_dropout=1e-12) != pytest.approx(loss(vector_dropout=0.0, snr_gamma=0.5))


def test_time_dropout_one_trains_every_sample_at_the_anchors_time():
    """p=1: the step equals one on the same batch with every time set to the guidance anchor's
    (0.5), engagement kept; p=0 draws nothing, so the random stream of runs without it is kept."""
    from ec_lora_t.adapter import add_ec_lora
    from ec_lora_t.training.objective import diffusion_training_step, drop_time

    unet = micro_unet()
    adapter = add_ec_lora(unet, ECLoRAConfig(**LORA))
    with torch.no_grad():  # an ECM whose scales depend on the vector, and LoRA weights that show it
        for parameter in adapter.ecm.parameters():
            parameter.normal_()
        for layer in adapter.layers:
            layer.lora_B.weight.normal_()
    accelerator = fresh_accelerator(TrainingConfig(mixed_precision="no"))
    scheduler = DDPMScheduler(num_train_timesteps=1000)

    def loss(batch, **kwargs):
        return diffusion_training_step(accelerator, unet, adapter, adapter.ecm, scheduler, batch,
                                       torch.Generator().manual_seed(7), **kwargs).item()

    batch = step_batch()
    at_anchor = {**batch, "engagement_time": drop_time(batch["engagement_time"], torch.ones(4, dtype=torch.bool))}
    assert at_anchor["engagement_time"][:, 1].tolist() == [0.5] * 4
    assert torch.equal(at_anchor["engagement_time"][:, 0], batch["engagement_time"][:, 0])
    # both draw one number per sample for the dropout; p = 1e-12 drops none
    assert loss(batch, time_dropout=1.0) == pytest.approx(loss(at_anchor, time_dropout=1e-12))
    assert loss(batch, time_dropout=1.0) != pytest.approx(loss(batch, time_dropout=1e-12))
    assert loss(batch, time_dropout=0.0) == pytest.approx(loss(batch))


def test_min_snr_weights_downweight_the_clean_timesteps():
    from ec_lora_t.training.objective import min_snr_weights

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    weights = min_snr_weights(scheduler, torch.tensor([10, 500, 990]), gamma=5.0)
    assert weights[0] < 0.1 and weights[2] == pytest.approx(1.0)  # low noise: SNR >> 5; high noise: SNR < 5


def test_stratified_timesteps_put_one_in_each_stratum_with_uniform_marginals():
    from ec_lora_t.training.objective import draw_timesteps

    draws = [draw_timesteps(16, 1000, "stratified", torch.Generator().manual_seed(seed), "cpu") for seed in range(400)]
    for seed in range(20):  # exactly one per stratum of 1600 / 16 = 100 steps, in a shuffled order
        timesteps = draw_timesteps(16, 1600, "stratified", torch.Generator().manual_seed(seed), "cpu")
        assert timesteps.dtype == torch.int64
        assert torch.equal(timesteps.sort().values // 100, torch.arange(16))
    assert any(not torch.equal(t, t.sort().values) for t in draws[:20])
    # The marginal is uniform: every tenth of the schedule gets a tenth of the draws (6,400 draws;
    # a deliberately skewed draw, t ** 2, fails the same check).
    counts = torch.bincount(torch.cat(draws) // 100, minlength=10).double() / (400 * 16)
    assert torch.all((counts - 0.1).abs() < 0.01), counts
    skewed = torch.bincount((torch.cat(draws).double() ** 2 / 1000).long() // 100, minlength=10).double() / 6400
    assert not torch.all((skewed - 0.1).abs() < 0.01)
    # uniform is the diffusers scripts' independent draw, stream for stream
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(draw_timesteps(8, 1000, "uniform", generator, "cpu"),
                       torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="timestep sampling must be one of"):
        draw_timesteps(8, 1000, "sobol", generator, "cpu")


def test_the_training_step_uses_the_timestep_sampling_it_is_given():
    from ec_lora_t.adapter import add_ec_lora
    from ec_lora_t.training.objective import diffusion_training_step

    unet = micro_unet()
    adapter = add_ec_lora(unet, ECLoRAConfig(**LORA))
    accelerator = fresh_accelerator(TrainingConfig(mixed_precision="no"))
    scheduler = DDPMScheduler(num_train_timesteps=1000)

    def loss(sampling):
        return diffusion_training_step(accelerator, unet, adapter, adapter.ecm, scheduler, step_batch(),
                                       torch.Generator().manual_seed(7), timestep_sampling=sampling).item()

    assert loss("stratified") == loss("stratified") != pytest.approx(loss("uniform"))
    assert loss("uniform") == loss("uniform")


def test_engagement_balance_and_shuffled_vectors(cache_path):
    from ec_lora_t.training.cache import (
        EpochShuffleSampler,
        engagement_balance_weights,
        shuffled_vectors,
    )

    engagement = torch.tensor([0.05] * 8 + [0.95] * 2)
    weights = engagement_balance_weights(engagement, power=1.0)
    assert weights[-1] / weights[0] == pytest.approx(4.0)  # the rare bin is drawn 4x as often per image
    assert engagement_balance_weights(engagement, power=0.0) is None
    sampler = EpochShuffleSampler(10, seed=3, weights=weights)
    draws = [index for epoch in range(200) for index in (sampler.set_epoch(epoch), list(sampler))[1]]
    assert 0.4 < np.mean([index >= 8 for index in draws]) < 0.6  # half the draws from 2 of 10 images
    sampler.set_epoch(5)
    assert list(sampler) == list(sampler)  # an epoch replays exactly (resume)

    cache = load_latent_cache(cache_path)
    shuffled = shuffled_vectors(cache, seed=1)
    assert torch.equal(shuffled.latent_mean, cache.latent_mean)
    assert not torch.equal(shuffled.engagement_time, cache.engagement_time)
    assert sorted(shuffled.engagement_time[:, 0].tolist()) == sorted(cache.engagement_time[:, 0].tolist())


@pytest.mark.parametrize(("num_images", "batch_size", "num_processes"), [(2, 2, 4), (3, 4, 3), (10, 2, 4), (8, 2, 2)])
def test_resident_batches_give_every_process_the_same_number_of_steps(num_images, batch_size, num_processes):
    """With fewer batches than processes (one or two batches on four GPUs) every process still
    steps as often as the others, wrapping round the epoch; else it would hang in a collective."""
    from ec_lora_t.training.cache import EpochShuffleSampler, LatentCache, ResidentBatches

    cache = LatentCache(
        latent_mean=torch.arange(num_images, dtype=torch.float32).view(-1, 1, 1, 1),
        latent_std=torch.ones(num_images, 1, 1, 1),
        text_embeddings=torch.zeros(num_images, 2, 3),
        engagement_time=torch.zeros(num_images, 2),
    )
    served = []
    for process in range(num_processes):
        batches = ResidentBatches(cache, EpochShuffleSampler(num_images, seed=0), batch_size, torch.device("cpu"),
                                  process_index=process, num_processes=num_processes)
        steps = list(batches)
        assert len(steps) == len(batches) == -(-(-(-num_images // batch_size)) // num_processes)
        served += [int(v) for step in steps for v in step["latent_mean"].flatten()]
    assert set(served) == set(range(num_images))  # every image, each epoch


def test_compiled_loop_compiles_the_unet_once_under_mixed_precision(tmp_path, monkeypatch):
    """`train.compile` under bf16 autocast: one graph for the UNet, no recompile in steady state.
    With accelerate's dynamo backend the ECM was compiled too; both ran through accelerate's one
    autocast wrapper, so Dynamo recompiled it with dynamic shapes (issue 18). Dynamo's guards
    decide recompiles, so its "eager" backend (no code generation) is enough to see them."""
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, **{**kwargs, "backend": "eager"}))
    torch._dynamo.reset()
    counters.clear()
    cache = write_cache(tmp_path / "latents.safetensors", num_images=4)  # two full batches per epoch
    result = run_training(cache, tmp_path / "checkpoints", compile=True, mixed_precision="bf16", epochs=6,
                          gradient_accumulation_steps=1)
    torch._dynamo.reset()
    assert result.steps == 12
    assert result.extra["graphs_compiled"] == 1
    assert result.extra["graphs_compiled_after_warmup"] == 0


def test_channels_last_changes_the_unets_layout_not_its_training(tmp_path):
    """`train.channels_last`: the UNet's convolution weights are channels-last for the run (the
    layout cuDNN's fast kernels use) and the losses are those of the contiguous run, to rounding."""
    cache = write_cache(tmp_path / "latents.safetensors", num_images=4)
    contiguous = run_training(cache, tmp_path / "contiguous", epochs=2)
    unet = micro_unet()
    nhwc = run_training(cache, tmp_path / "nhwc", unet=unet, channels_last=True, epochs=2)
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not unet.conv_in.weight.is_contiguous()
    torch.testing.assert_close(torch.tensor(nhwc.losses), torch.tensor(contiguous.losses), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        TrainingConfig(**{**TRAINING, "channels_last": "sometimes"})

"""The train loop's speed bookkeeping and its torch.compile switch."""

from __future__ import annotations

import time

import pytest
import torch

from ec_lora_t.training.config import TrainingConfig
from ec_lora_t.training.loop import make_accelerator
from ec_lora_t.training.throughput import STEADY_AFTER_STEPS, Throughput


def test_steady_state_starts_after_warmup_and_leaves_out_checkpoint_saving(monkeypatch):
    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    throughput = Throughput()  # created at t = 0
    rates = [throughput.read(step, step * 4) for step in range(1, STEADY_AFTER_STEPS + 1)]  # t = 1 .. 10
    assert rates[0] is None and rates[1] == pytest.approx(4.0)  # 4 images per step, 1 s per read
    assert throughput.steady_start == (10.0, 40) and throughput.warmup_seconds == 10.0
    throughput.read(11, 44)  # t = 11
    throughput.pause()  # t = 12: saving starts
    throughput.resume()  # t = 13: 1 s of saving
    assert throughput.read(12, 48) is None  # t = 14: the first read after a pause has no window
    # 8 images from t = 10 to 14, less 1 s of saving: 8 / 3
    assert throughput.steady_images_per_second == pytest.approx(8 / 3)


def test_too_few_steps_have_no_steady_state():
    throughput = Throughput()
    for step in range(1, STEADY_AFTER_STEPS):
        throughput.read(step, step)
    assert throughput.steady_images_per_second is None
    assert throughput.warmup()["graphs_compiled_after_warmup"] is None


@pytest.mark.parametrize(("setting", "device_type", "compiles"), [
    (True, "cpu", True), (False, "cuda", False), ("auto", "cpu", False), ("auto", "cuda", True),
])
def test_train_compile_and_channels_last_switch_on_as_asked(setting, device_type, compiles):
    assert TrainingConfig(compile=setting).switched_on("compile", device_type) is compiles
    assert TrainingConfig(channels_last=setting).switched_on("channels_last", device_type) is compiles


def test_the_accelerator_compiles_nothing_itself():
    """The loop compiles the UNet alone: accelerate's dynamo backend would compile the ECM too."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # process-wide: the first Accelerator's plugin stays
    accelerator = make_accelerator(TrainingConfig(compile=True))
    assert accelerator.state.dynamo_plugin.backend.name == "NO"


def test_train_compile_refuses_other_values():
    with pytest.raises(ValueError, match="compile"):
        TrainingConfig(compile="sometimes")

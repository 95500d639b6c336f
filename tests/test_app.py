"""The slider page: `ec-lora-t app` started as a process, driven through gradio_client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from gradio_client import Client
from PIL import Image

from ec_lora_t.data.features import EngagementTimeNormalizer

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def running_app(tiny_sd_dir, adapter_dir, tmp_path_factory):
    """`ec-lora-t app` on the tiny model and adapter, with statistics of likes 100..5100 over 2025."""
    stats = tmp_path_factory.mktemp("stats") / "normalization.json"
    EngagementTimeNormalizer.fit(
        likes=np.array([100, 5100]), comments=np.array([0, 0]),
        timestamps=pd.to_datetime(["2025-01-01", "2025-12-31"], utc=True), comment_weight=3, normalization="minmax",
    ).to_json(stats)
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    command = [sys.executable, "-m", "ec_lora_t.cli", "app", "--pretrained", str(tiny_sd_dir), "--adapter",
               str(adapter_dir), "--stats", str(stats), "--port", str(port), "--steps", "3"]
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180  # imports and model loading on a busy 2-core CI machine
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the app exited with {process.returncode}:\n{log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the app did not listen within 180 s:\n{log.read_text()}") from None
                time.sleep(0.5)
        client = Client(url, verbose=False)
        assert f"EC-LoRA-T slider page: {url}" in log.read_text()
        yield client, log
    finally:
        process.terminate()
        process.wait(timeout=30)


def generate(client: Client, engagement: float, seed: int = 42, mode: str = "EC-LoRA-T") -> np.ndarray:
    image_path, description = client.predict(
        "a man on a city street", engagement, 0.5, seed, mode, 3, 5.0, 4.0, api_name="/generate"
    )
    assert f"seed {seed}" in description
    return np.asarray(Image.open(image_path).convert("RGB"), dtype=np.int16)


def test_the_sliders_steer_the_image(running_app):
    client, log = running_app
    low, high, low_again = generate(client, 0.0), generate(client, 1.0), generate(client, 0.0)
    assert low.shape == (384, 384, 3)  # the tiny model's 32 px, enlarged x12 with nearest-neighbour
    assert np.abs(low - high).max() > 0  # the vector changes the image
    assert np.array_equal(low, low_again)  # and the same vector and seed give the same one
    assert not np.array_equal(low, generate(client, 0.0, seed=7))
    # Without the ECM the vector does nothing.
    assert np.array_equal(generate(client, 0.0, mode="plain LoRA (ECM off)"),
                          generate(client, 1.0, mode="plain LoRA (ECM off)"))
    text = log.read_text()
    assert "Traceback" not in text and "Warning" not in text, text


def test_raw_likes_and_dates_set_the_sliders(running_app):
    client, _ = running_app
    engagement, time_value, description = client.predict(2600, 0, "2025-07-02", api_name="/vector")
    assert engagement == 0.5 and time_value == 0.5  # rounded to the sliders' step
    assert "-> engagement 0.50" in description and "clipped" not in description
    engagement, _, description = client.predict(9000, 0, "", api_name="/vector")
    assert engagement == 1.0 and "engagement clipped" in description

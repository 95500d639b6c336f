"""The slider page: `ec-lora-t app` started as a process, driven through gradio_client and, as a
person uses it, through a headless Chromium."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
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
    engagement, time_value, description = client.predict(2600, 0, "2025-07-02", "", api_name="/vector")
    assert engagement == 0.5 and time_value == 0.5  # rounded to the sliders' step
    assert "-> engagement 0.50" in description and "clipped" not in description
    assert description.startswith("likes + 3 x comments (likes 2600, comments 0) = 2600")
    engagement, _, description = client.predict(9000, 0, "", "", api_name="/vector")
    assert engagement == 1.0 and "engagement clipped" in description
    # Signals typed by name take the place of the likes and comments boxes.
    engagement, _, description = client.predict(9000, 0, "2025-07-02", "likes=1100, comments=500", api_name="/vector")
    assert engagement == 0.5 and "(likes 1100, comments 500) = 2600" in description


# --- the page in a real browser ---------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's package) driven by Selenium through Debian's chromedriver.

    Skipped only on a machine without Chromium outside CI; under CI (`CI` set, as `.ci/run` is)
    a missing browser fails: `.ci/run` installs it.
    """
    if CHROMIUM is None or CHROMEDRIVER is None:
        if os.environ.get("CI", "") not in ("", "0", "false"):
            pytest.fail("CI is set and chromium / chromedriver are missing: .ci/run installs them (apt-get)")
        pytest.skip("no chromium and chromedriver here (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no driver download
    try:
        yield driver
    finally:
        driver.quit()


def _shown(driver) -> tuple[str, str]:
    """The generated image's source (a file URL the server made for this image) and its description."""
    from selenium.webdriver.common.by import By

    sources = [img.get_attribute("src") for img in driver.find_elements(By.CSS_SELECTOR, "img")
               if "/file=" in (img.get_attribute("src") or "") or "gradio_api/file" in (img.get_attribute("src") or "")]
    texts = [element.text for element in driver.find_elements(By.CSS_SELECTOR, ".prose, .md")
             if "seed" in element.text and "EC-LoRA-T ·" in element.text]
    return (sources[-1] if sources else ""), (texts[-1] if texts else "")


def test_moving_the_engagement_slider_in_a_browser_changes_the_image_and_its_description(running_app, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    client, log = running_app
    browser.get(client.src)
    wait = WebDriverWait(browser, 120)
    sliders = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=range]"))
    block = "./ancestor::div[contains(@class, 'block')]"  # the slider's labelled box
    engagement = next(s for s in sliders if "Engagement" in s.find_element(By.XPATH, block).text)
    browser.find_element(By.XPATH, "//button[normalize-space()='Generate']").click()
    first = wait.until(lambda d: _shown(d) if all(_shown(d)) else None)
    assert "engagement 0.50" in first[1], first
    # Drag the engagement slider's thumb to the right end and let go (the page generates on release).
    width = engagement.size["width"]
    drag = ActionChains(browser).move_to_element(engagement).click_and_hold()
    drag.move_by_offset(width // 2 + 20, 0).release().perform()
    second = wait.until(lambda d: _shown(d) if _shown(d)[0] not in ("", first[0]) and _shown(d)[1] != first[1] else None)
    print(f"before: {first}\nafter: {second}")
    assert "engagement 1.00" in second[1], second
    before, after = (np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(src).read())).convert("RGB"),
                                dtype=np.int16) for src in (first[0], second[0]))
    assert before.shape == after.shape and np.abs(before - after).max() > 0  # other pixels, not only another URL
    assert "Traceback" not in log.read_text()

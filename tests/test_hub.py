"""Model references: local paths must exist, hub ids fail in seconds when the hub cannot be reached."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ec_lora_t.hub import (
    HubUnreachableError,
    check_reference,
    is_local_reference,
    resolve_pretrained,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("reference", "local"),
    [("/abs/path", True), ("./model", True), ("../model", True), ("~/model", True),
     ("models/ec-lora-t-bse", True),  # "models" exists in the repository: a path, mistyped
     ("stable-diffusion-v1-5/stable-diffusion-v1-5", False), ("gpt2", False)],
)
def test_which_references_are_local(reference, local):
    assert is_local_reference(reference, root=REPO) is local


def test_a_local_reference_must_exist():
    assert check_reference("models/ec-lora-t-base", root=REPO) == REPO / "models/ec-lora-t-base"
    with pytest.raises(FileNotFoundError, match=r"'models/ec-lora-t-bse' is a local path \('models' exists here"):
        check_reference("models/ec-lora-t-bse", root=REPO)
    with pytest.raises(FileNotFoundError, match="'/nonexistent' is a local path, and /nonexistent is not a folder"):
        check_reference("/nonexistent")
    with pytest.raises(ValueError, match="neither an existing local folder nor a hub id"):
        check_reference("not a/valid id!")


def test_a_hub_id_offline_fails_at_once_and_says_why(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="'someone/not-cached' is a hub id, HF_HUB_OFFLINE is set"):
        resolve_pretrained("someone/not-cached")
    assert time.perf_counter() - started < 5


def test_a_hub_id_with_the_hub_unreachable_fails_in_seconds(monkeypatch):
    """One request to an endpoint that refuses connections, no retries, no download started."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused
    started = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="'someone/not-cached' is a hub id and the Hugging Face hub cannot "
                                                  "be reached within 3 s.*nothing was downloaded"):
        resolve_pretrained("someone/not-cached", timeout=3)
    assert time.perf_counter() - started < 10


def test_loading_a_mistyped_local_model_fails_at_once(monkeypatch):
    from ec_lora_t.models import load_components

    monkeypatch.chdir(REPO)
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="model.pretrained 'models/ec-lora-t-bse' is a local path"):
        load_components("models/ec-lora-t-bse")
    assert time.perf_counter() - started < 5

"""What the stages write beside their results: headline metrics rounded to what they can tell
apart, and the params check's metrics file kept when the check fails."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from stages._common import round_significant, write_metrics


def test_metrics_keep_four_significant_digits(tmp_path):
    written = write_metrics(tmp_path / "m.json", {
        "loss": 0.0296486274284475, "span_days": 597.300162037037, "p_value": 1.23456789e-12,
        "spearman": np.float64(0.681756066355167), "steps": 850, "controls": True, "missing": float("nan"),
        "nested": {"r2": [-0.5768357169107794, 0.18520153513703752]}, "score": "ground_truth",
    })
    assert written == {"loss": 0.02965, "span_days": 597.3, "p_value": 1.235e-12, "spearman": 0.6818, "steps": 850,
                       "controls": True, "missing": None, "nested": {"r2": [-0.5768, 0.1852]}, "score": "ground_truth"}
    assert json.loads((tmp_path / "m.json").read_text()) == written
    assert write_metrics(tmp_path / "full.json", {"loss": 0.0296486274284475}, significant_digits=None) == {
        "loss": 0.0296486274284475}


def test_results_that_differ_in_the_last_bits_write_the_same_file(tmp_path):
    """What another machine of the same kind computes (latents summed in another order) changes nothing."""
    value = 0.681756066355167
    nudged = np.nextafter(np.nextafter(value, 1.0), 1.0) * (1 + 1e-12)
    assert nudged != value and round_significant(nudged) == round_significant(value)
    write_metrics(tmp_path / "a.json", {"spearman": value, "loss": 0.0296486274284475})
    write_metrics(tmp_path / "b.json", {"spearman": float(nudged), "loss": 0.0296486274284475 * (1 + 1e-9)})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


@pytest.mark.slow
def test_a_failed_params_check_keeps_its_metrics_file(tmp_path):
    """DVC deletes a stage's outputs before it runs; the params check's metrics are declared
    `persist: true`, so a bad value leaves the git-tracked metrics/validate_params.json as it was."""
    from test_pipeline import SMALL_PARAMS, _copy_repo, _dvc

    root = _copy_repo(tmp_path / "repo", SMALL_PARAMS)
    _dvc(root, "repro", "validate_params")
    metrics = root / "metrics/validate_params.json"
    good = metrics.read_text()
    assert json.loads(good)["sections"] > 0
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["epochs"] = 2.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    failed = _dvc(root, "repro", "validate_params", check=False)
    assert failed.returncode != 0 and "train.epochs = 2.5: must be a valid integer" in failed.stdout + failed.stderr
    assert metrics.is_file() and metrics.read_text() == good

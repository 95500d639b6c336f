"""Params schemas (stages/params/): every section checked before any stage runs, in one line per problem."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Annotated, Literal

import pytest
import yaml
from annotated_types import Ge, Gt

from stages._common import ParamsError
from stages.validate_params import SCHEMAS, VALID_MARKER, main, validate_params

REPO = Path(__file__).resolve().parent.parent


# The demo_data stage writes the default ingest.posts_dir (dvc.yaml passes it to the stage).
PIPELINE_OUTPUTS = ("data/demo_posts",)


def check(path: Path):
    return validate_params(path, PIPELINE_OUTPUTS)


def params_with(tmp_path: Path, **changes) -> Path:
    """The repository's params.yaml with `section__key=value` changes, written next to a link to models/."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            params[section][key] = value
        elif value is None:
            del params[section]
        else:
            params[section] = value
    if not (tmp_path / "models").exists():  # relative model paths resolve as in the repository
        (tmp_path / "models").symlink_to(REPO / "models")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_the_repositorys_params_are_valid():
    sections = check(REPO / "params.yaml")
    assert set(sections) == set(SCHEMAS) == set(yaml.safe_load((REPO / "params.yaml").read_text()))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"train__lora_rank": 0}, "train.lora_rank = 0: must be greater than or equal to 1"),
        ({"train__epochs": -1}, "train.epochs = -1: must be greater than or equal to 1"),
        ({"train__epochs": 2.5}, "train.epochs = 2.5: must be a valid integer, got a number with a fractional part"),
        ({"train__learning_rate": "abc"}, "train.learning_rate = 'abc': must be a valid number"),
        ({"train__lora_rank": "abc"}, "train.lora_rank = 'abc': must be a valid integer"),
        ({"train__lora_rank": True}, "train.lora_rank = True: must be a number, not a boolean"),
        ({"train__learning_rate": float("nan")}, "train.learning_rate = nan: must be a finite number"),
        ({"train__max_grad_norm": 0}, "train.max_grad_norm = 0: must be greater than 0"),
        ({"train__target_modules": []}, "train.target_modules = []: must have at least 1 item(s)"),
        ({"train__lora_dropout": 0.1}, "train.lora_dropout = 0.1: unknown key; section 'train' takes ["),
        ({"features__normalization": "foo"}, "features.normalization = 'foo': must be 'minmax', 'log_minmax', 'rank' or 'detrended'"),
        ({"model__pretrained": "models/ec-lora-t-bse"},
         "model.pretrained = 'models/ec-lora-t-bse': it is a local path ('models' exists here, so it is a path)"),
        ({"model__pretrained": "/nonexistent"}, "model.pretrained = '/nonexistent': it is a local path"),
        ({"model__pretrained": "no such/hub id"}, "is neither an existing local folder nor a hub id"),
        ({"model__resolution": 30}, "model.resolution = 30: must be a multiple of 8"),
        ({"evaluate__engagement_targets": []}, "evaluate.engagement_targets = []: must have at least 2 item(s)"),
        ({"evaluate__engagement_targets": [0.0, 1.5]}, "evaluate.engagement_targets.1 = 1.5: must be less than or"),
        ({"evaluate__time_targets": [0.5]}, "evaluate: time_targets [0.5] must hold at least 2 targets, or none"),
        ({"regressor__folds": 1}, "regressor.folds = 1: must be greater than or equal to 2"),
        ({"ingest__posts_dir": "/no/such/posts"}, "ingest.posts_dir = '/no/such/posts': no such folder (/no/such/posts)"),
        ({"caption__source": "blip", "caption__model": None}, "caption: source 'blip' with missing_text 'generic' "
                                                              "captions with BLIP: set caption.model"),
        ({"caption__missing_text": "fallback"}, "caption.missing_text = 'fallback': must be 'generic', 'skip' or"),
        ({"train": None}, "section 'train' is missing"),
        ({"extra": {"a": 1}}, "unknown section(s) ['extra']"),
    ],
)
def test_a_bad_value_is_named_with_what_is_allowed(tmp_path, changes, expected):
    path = params_with(tmp_path, **changes)
    with pytest.raises(ParamsError) as error:
        check(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert expected in message, message


def test_every_problem_is_reported_at_once(tmp_path):
    path = params_with(tmp_path, train__lora_rank=0, features__normalization="foo")
    with pytest.raises(ParamsError, match=r"features.normalization = 'foo'.*; train.lora_rank = 0"):
        check(path)


def test_the_stage_writes_a_constant_marker_or_exits_with_one_line(tmp_path):
    marker, metrics = tmp_path / "out" / "valid", tmp_path / "metrics.json"
    outputs = ["--pipeline-output", "data/demo_posts"]
    main(["--out", str(marker), "--metrics", str(metrics), "--params", str(REPO / "params.yaml"), *outputs])
    assert marker.read_text() == VALID_MARKER
    other = params_with(tmp_path, train__lora_rank=4)
    main(["--out", str(marker), "--metrics", str(metrics), "--params", str(other), *outputs])
    assert marker.read_text() == VALID_MARKER  # another good value: the same bytes, nothing downstream reruns

    marker.unlink()
    bad = params_with(tmp_path, train__epochs=2.5)
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(marker), "--metrics", str(metrics), "--params", str(bad), *outputs])
    assert str(exit_info.value) == f"{bad}: train.epochs = 2.5: must be a valid integer, got a number with a fractional part"
    assert not marker.exists()


def _choices(schema, field: str) -> tuple:
    annotation = schema.model_fields[field].annotation
    return typing.get_args(annotation)


def test_the_schemas_allow_exactly_the_librarys_choices():
    from ec_lora_t.adapter.config import ECM_GRANULARITIES, ECM_INPUTS
    from ec_lora_t.data.captioning import CAPTION_SOURCES, MISSING_TEXT_CHOICES
    from ec_lora_t.data.features import NORMALIZATIONS
    from ec_lora_t.data.ingest import FORMATS, VIDEO_MODES
    from ec_lora_t.data.seasons import HEMISPHERES
    from ec_lora_t.evaluation.regressor import PROTOCOLS
    from ec_lora_t.generation import PRECISIONS
    from ec_lora_t.training.precision import MIXED_PRECISION_CHOICES

    expected = {
        ("train", "ecm_granularity"): ECM_GRANULARITIES,
        ("train", "ecm_input"): ECM_INPUTS,
        ("train", "mixed_precision"): MIXED_PRECISION_CHOICES,
        ("features", "normalization"): NORMALIZATIONS,
        ("caption", "source"): CAPTION_SOURCES,
        ("caption", "missing_text"): MISSING_TEXT_CHOICES,
        ("caption", "hemisphere"): HEMISPHERES,
        ("regressor", "protocol"): PROTOCOLS,
        ("evaluate", "precision"): PRECISIONS,
        ("ingest", "format"): FORMATS,
        ("ingest", "videos"): VIDEO_MODES,
    }
    for (section, field), choices in expected.items():
        assert set(_choices(SCHEMAS[section], field)) == set(choices), (section, field)


def test_the_train_schema_is_built_from_the_library_configs():
    """One definition: the keys are the configs' fields, and a key left out is the library's default."""
    from ec_lora_t.adapter.config import INJECTED_FIELDS, ECLoRAConfig
    from ec_lora_t.training.config import TrainingConfig
    from stages.params.train import LORA_PREFIXED, STAGE_KEYS, configs_from_params

    lora_keys = {LORA_PREFIXED.get(f.name, f.name) for f in dataclasses.fields(ECLoRAConfig)
                 if f.name not in INJECTED_FIELDS}
    assert {"lora_rank", "lora_alpha", "target_modules", "ecm_granularity"} <= lora_keys
    training_keys = {f.name for f in dataclasses.fields(TrainingConfig)}
    assert set(SCHEMAS["train"].model_fields) == lora_keys | training_keys | STAGE_KEYS == {"launcher"} | lora_keys | {
        "learning_rate", "ecm_learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
        "lr_warmup_ratio", "max_grad_norm", "epochs", "batch_size", "gradient_accumulation_steps", "mixed_precision",
        "gradient_checkpointing", "compile", "seed", "checkpoints_total_limit", "checkpoint_runs_limit", "caption_dropout",
        "channels_last", "vector_dropout", "time_dropout", "snr_gamma", "timestep_sampling", "engagement_balance", "shuffle_vectors", "conditioning", "ema_decay"}
    # An empty section is valid and means the library's defaults.
    lora, training = configs_from_params(SCHEMAS["train"].model_validate({}))
    assert lora == ECLoRAConfig() and training == TrainingConfig()
    # The repository's params reach the configs unchanged.
    lora, training = configs_from_params(check(REPO / "params.yaml")["train"])
    params = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    assert lora.rank == params["lora_rank"] and lora.target_modules == tuple(params["target_modules"])
    assert training.max_grad_norm == params["max_grad_norm"] and training.epochs == params["epochs"]


@dataclasses.dataclass
class ToyConfig:
    steps: Annotated[int, Ge(1)] = 3
    rate: Annotated[float, Gt(0)] | None = None
    kind: Literal["a", "b"] = "a"
    names: tuple[str, ...] = ("x",)


def test_a_schema_follows_the_dataclass_it_is_built_from():
    """The derivation on a toy config: a field's default, range and choices are the schema's."""
    from pydantic import create_model

    from stages._common import Section, validate_section
    from stages.params.train import schema_fields

    schema = create_model("ToySection", __base__=Section, **schema_fields(ToyConfig))
    assert ToyConfig(**schema.model_validate({}).model_dump()) == ToyConfig(names=["x"])
    assert schema.model_validate({"steps": "2.0", "names": ["y", "z"]}).names == ["y", "z"]
    for values, expected in [
        ({"steps": 0}, "toy.steps = 0: must be greater than or equal to 1"),
        ({"steps": True}, "toy.steps = True: must be a number, not a boolean"),
        ({"rate": 0.0}, "toy.rate = 0.0: must be greater than 0"),
        ({"kind": "c"}, "toy.kind = 'c': must be 'a' or 'b'"),
        ({"size": 1}, "toy.size = 1: unknown key"),
    ]:
        with pytest.raises(ParamsError, match=re.escape(expected)):
            validate_section(schema, "toy", values)


@pytest.mark.parametrize(
    ("key", "value"),
    [("lora_rank", 0), ("lora_alpha", 0.0), ("target_modules", []), ("target_modules", ["to_q", "to_q"]),
     ("ecm_depth", 0), ("ecm_granularity", "block"), ("learning_rate", -1e-4), ("adam_beta2", 1.0),
     ("lr_warmup_ratio", 1.0), ("max_grad_norm", 0.0), ("epochs", 0), ("mixed_precision", "fp8"), ("seed", -1),
     ("checkpoints_total_limit", 0), ("caption_dropout", 1.5), ("snr_gamma", 0.0), ("conditioning", "none")],
)
def test_the_library_and_the_params_check_refuse_the_same_values(key, value):
    from ec_lora_t.adapter.config import ECLoRAConfig
    from ec_lora_t.training.config import TrainingConfig
    from stages._common import validate_section
    from stages.params.train import LORA_PREFIXED

    lora_fields = {LORA_PREFIXED.get(f.name, f.name): f.name for f in dataclasses.fields(ECLoRAConfig)}
    field = lora_fields.get(key, key)
    with pytest.raises(ValueError, match=rf"^{field} = "):
        (ECLoRAConfig if key in lora_fields else TrainingConfig)(**{field: value})
    with pytest.raises(ParamsError, match=rf"train(\.{key} = |: {field} = )"):
        validate_section(SCHEMAS["train"], "train", {key: value})


def test_a_stage_error_is_one_line_without_a_traceback(tmp_path):
    """A truncated latent cache: the train stage names the file and stops, in one line."""
    latents = tmp_path / "latents.safetensors"
    latents.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a header cut short
    result = subprocess.run(
        [sys.executable, "-m", "stages.train", "--latents", str(latents), "--out", str(tmp_path / "adapter"),
         "--checkpoints", str(tmp_path / "ckpt"), "--live", str(tmp_path / "live"),
         "--metrics", str(tmp_path / "train.json"), "--run-info", str(tmp_path / "run_info.json"),
         "--summary", str(tmp_path / "summary.json")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("stage ")]
    assert len(lines) == 1 and lines[0].startswith(f"stage train: {latents}: not a readable safetensors file"), (
        result.stderr)
    assert lines[0].endswith("(EC_LORA_T_DEBUG=1 shows the traceback)") and "Traceback" not in result.stderr


def test_a_hub_id_that_cannot_be_loaded_stops_the_params_check(tmp_path, monkeypatch):
    """Offline and not cached: found before any stage runs, not when latents has lost its outputs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = params_with(tmp_path, model__pretrained="someone/not-cached")
    with pytest.raises(ParamsError, match="model.pretrained 'someone/not-cached' is a hub id, HF_HUB_OFFLINE is set"):
        check(path)
    # caption.model is a hub id too, but BLIP is not asked for (source post_text, missing_text generic).
    assert check(params_with(tmp_path, caption__model="someone/not-cached"))
    with pytest.raises(ParamsError, match="caption.model 'someone/not-cached' is a hub id"):
        check(params_with(tmp_path, caption__model="someone/not-cached", caption__missing_text="blip"))


def test_the_readmes_override_replaces_the_signals_mapping(tmp_path):
    """DVC's `-S` merges a mapping into the one in params.yaml (`features.signals={likes: 1}`
    leaves comments in, `{saves: 1}` is refused), so the README replaces it with `~` and `+`:
    check both, with the very function `dvc exp run -S` applies."""
    import re
    import shutil

    from dvc.utils.hydra import apply_overrides

    readme = (REPO / "README.md").read_text()
    overrides = list(dict.fromkeys(re.findall(r"-S '([^']*features\.signals[^']*)'", readme)))
    assert overrides == ["~features.signals", "+features.signals={saves: 1}"], overrides
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    apply_overrides(params, overrides)
    assert yaml.safe_load(params.read_text())["features"]["signals"] == {"saves": 1}
    shutil.copy(REPO / "params.yaml", params)
    apply_overrides(params, ["features.signals={likes: 1}"])
    assert yaml.safe_load(params.read_text())["features"]["signals"] == {"likes": 1, "comments": 3}  # merged

"""Stage `validate_params`: check every params section before any other stage runs.

python -m stages.validate_params --out data/validate_params/valid --metrics metrics/validate_params.json

Why a stage of its own: DVC deletes a stage's outputs before it runs the stage's command, so
a stage that finds a bad value has already lost its previous outputs (the adapter, the
normalisation statistics). Every other stage depends on this stage's output, so DVC runs
this one first and stops at its error; a bad `dvc exp run -S` costs one line and nothing
else. The output file's content never changes, so a valid param change reruns this stage
and then only the stages that read that param, as before.

Each section is checked by its schema in `stages/params/`; the error names the key, the
value and what is allowed, one line for every problem found. Then what the stages would
otherwise find only after DVC deleted their outputs: `ingest.posts_dir` must exist (unless a
stage writes it: `--pipeline-output`), and every hub id the pipeline will load
(`model.pretrained`; `caption.model` when BLIP is asked for; `sentiment.model` when set) must
be in the local Hugging Face cache or reachable within seconds (`ec_lora_t.hub.resolve_pretrained`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ec_lora_t.hub import HubUnreachableError, is_local_reference, resolve_pretrained
from stages._common import (
    ParamsError,
    Section,
    read_params,
    run_stage,
    stage_parser,
    validate_section,
    write_metrics,
)
from stages.params.caption import CaptionParams
from stages.params.demo_data import DemoDataParams
from stages.params.evaluate import EvaluateParams
from stages.params.features import FeaturesParams
from stages.params.ingest import IngestParams
from stages.params.latents import LatentsParams
from stages.params.model import ModelParams
from stages.params.regressor import RegressorParams
from stages.params.sentiment import SentimentParams
from stages.params.train import TrainParams

SCHEMAS: dict[str, type[Section]] = {
    "demo_data": DemoDataParams,
    "model": ModelParams,
    "ingest": IngestParams,
    "caption": CaptionParams,
    "sentiment": SentimentParams,
    "features": FeaturesParams,
    "latents": LatentsParams,
    "regressor": RegressorParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
}
# The same bytes every time: stages that depend on this file see it change only when it is gone.
VALID_MARKER = "params.yaml passed stages/validate_params.py; this content never changes\n"


def validate_params(params_path: str | Path, pipeline_outputs: tuple[str, ...] = ()) -> dict[str, Section]:
    """Every section checked by its schema; one ParamsError naming every problem, else the sections.

    `pipeline_outputs`: paths that stages write (they may be missing now: ingest.posts_dir's default).
    """
    params = read_params(params_path)
    unknown = sorted(set(params) - set(SCHEMAS))
    problems = [f"unknown section(s) {unknown}; the sections are {sorted(SCHEMAS)}"] if unknown else []
    sections = {}
    for name, schema in SCHEMAS.items():
        if name not in params:
            problems.append(f"section '{name}' is missing")
            continue
        try:
            sections[name] = validate_section(schema, name, params[name], source="", root=Path(params_path).parent)
        except ParamsError as error:
            problems.append(str(error).removeprefix(": "))
    if problems:
        raise ParamsError(f"{params_path}: {'; '.join(problems)}")
    root = Path(params_path).parent
    problems = _missing_posts_dir(sections, root, pipeline_outputs) + _unreachable_hub_ids(sections, root)
    if problems:
        raise ParamsError(f"{params_path}: {'; '.join(problems)}")
    return sections


def _missing_posts_dir(sections: dict[str, Section], root: Path, pipeline_outputs: tuple[str, ...]) -> list[str]:
    """ingest.posts_dir must exist: DVC would delete ingest's outputs before finding the dep missing."""
    posts_dir = sections["ingest"].posts_dir
    folder = root / Path(posts_dir).expanduser()
    if folder.is_dir() or Path(posts_dir).as_posix().rstrip("/") in pipeline_outputs:
        return []
    return [f"ingest.posts_dir = {posts_dir!r}: no such folder ({folder})"]


def _unreachable_hub_ids(sections: dict[str, Section], root: Path) -> list[str]:
    """One line per hub id that will be loaded but is neither cached nor reachable (local paths were checked)."""
    references = [("model.pretrained", sections["model"].pretrained)]
    caption = sections["caption"]
    if "blip" in (caption.source, caption.missing_text):
        references.append(("caption.model", caption.model))
    if sections["sentiment"].model:
        references.append(("sentiment.model", sections["sentiment"].model))
    problems = []
    for key, reference in references:
        if is_local_reference(reference, root):
            continue
        try:
            resolve_pretrained(reference, what=key)
        except (HubUnreachableError, ValueError) as error:
            problems.append(str(error))
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", required=True, help="marker file other stages depend on (constant content)")
    parser.add_argument("--pipeline-output", action="append", default=[],
                        help="a folder a stage writes, so it may not exist yet (repeat)")
    args = parser.parse_args(argv)
    try:
        sections = validate_params(args.params, tuple(path.rstrip("/") for path in args.pipeline_output))
    except ParamsError as error:
        # No "stage validate_params:" prefix: the line is about params.yaml, not this stage.
        sys.exit(str(error))
    write_metrics(args.metrics, {"sections": len(sections), "keys": sum(len(s.model_fields_set) for s in sections.values())})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(VALID_MARKER)


if __name__ == "__main__":
    run_stage(main)

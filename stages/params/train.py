"""Schema of params.yaml section `train`: the adapter and its training run (`stages/train.py`).

Keys up to `ecm_granularity` describe the adapter (`ec_lora_t.adapter.ECLoRAConfig`, with the
`lora_` prefix dropped); the others are `ec_lora_t.training.config.TrainingConfig` fields of the
same name. A key with a default here may be left out of params.yaml; its default is the
library's (tests/test_params.py checks that they agree).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from stages._common import Float, Int, Section

Positive = Annotated[Float, Field(gt=0)]
Fraction = Annotated[Float, Field(ge=0, lt=1)]


class TrainParams(Section):
    # 1. The adapter.
    lora_rank: Annotated[Int, Field(ge=1)]
    lora_alpha: Positive
    target_modules: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    ecm_hidden_size: Annotated[Int, Field(ge=1)]
    ecm_depth: Annotated[Int, Field(ge=1)]
    ecm_granularity: Literal["layer", "rank"] = "layer"  # ec_lora_t.adapter.config.ECM_GRANULARITIES
    vector_embedding: bool = False  # also offset the UNet's timestep embedding
    # 2. The optimiser and its schedule.
    learning_rate: Positive
    ecm_learning_rate: Positive | None = None  # None: learning_rate
    weight_decay: Annotated[Float, Field(ge=0)]
    adam_beta1: Fraction
    adam_beta2: Fraction
    adam_epsilon: Positive
    lr_warmup_ratio: Fraction
    max_grad_norm: Positive | None = 1.0  # None: no clipping (the norm is still logged)
    # 3. The run.
    epochs: Annotated[Int, Field(ge=1)]
    batch_size: Annotated[Int, Field(ge=1)]
    gradient_accumulation_steps: Annotated[Int, Field(ge=1)] = 1
    # ec_lora_t.training.precision.MIXED_PRECISION_CHOICES
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    caption_dropout: Annotated[Float, Field(ge=0, le=1)] = 0.0
    vector_dropout: Annotated[Float, Field(ge=0, le=1)] = 0.0
    snr_gamma: Positive | None = None  # min-SNR-gamma loss weights; None: plain MSE
    engagement_balance: Annotated[Float, Field(ge=0, le=1)] = 0.0
    shuffle_vectors: bool = False  # the negative control
    conditioning: Literal["ec_lora", "plain_lora"] = "ec_lora"
    seed: Annotated[Int, Field(ge=0)]
    # 4. How the stage is started (dvc.yaml's cmd is `${train.launcher} -m stages.train ...`): `python`
    #    for one process; a distributed launcher for several GPUs, e.g. `python -m
    #    accelerate.commands.launch --multi_gpu --num_processes 2`. The number of processes
    #    is part of the run's fingerprint; the launcher's words are not.
    launcher: Annotated[str, Field(min_length=1)] = "python"
    # 5. Resume state (neither changes the result).
    checkpoints_total_limit: Annotated[Int, Field(ge=1)] | None = 2  # per run; None: keep every epoch
    checkpoint_runs_limit: Annotated[Int, Field(ge=1)] | None = 3  # unfinished runs kept; None: all

    @field_validator("target_modules")
    @classmethod
    def _no_duplicates(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("must not repeat a module name")
        return value


# params key -> ECLoRAConfig field; every other key of the section but the stage's own
# (STAGE_KEYS) is a TrainingConfig field.
STAGE_KEYS = {"launcher"}
LORA_KEYS = {
    "lora_rank": "rank",
    "lora_alpha": "alpha",
    "target_modules": "target_modules",
    "ecm_hidden_size": "ecm_hidden_size",
    "ecm_depth": "ecm_depth",
    "ecm_granularity": "ecm_granularity",
    "vector_embedding": "vector_embedding",
}


def configs_from_params(params: TrainParams):
    """Split the checked `train` section into the adapter's config and the loop's config:
    (`ECLoRAConfig`, `TrainingConfig`)."""
    # Imported here: the params check (validate_params) reads the schema only, and must not
    # depend on (and rerun with) the adapter's and the loop's code.
    from ec_lora_t.adapter.config import ECLoRAConfig
    from ec_lora_t.training.config import TrainingConfig

    values = params.model_dump(exclude=STAGE_KEYS)
    lora_config = ECLoRAConfig(**{field: values.pop(key) for key, field in LORA_KEYS.items()})
    return lora_config, TrainingConfig(**values)

"""How a training run trains: optimizer, schedule, clipping, epochs, batch, precision, caption dropout, checkpoints kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, get_args

from annotated_types import Ge, Gt, Le, Lt

from ec_lora_t.constraints import check_constraints

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]  # auto: bf16 on a GPU, no on a CPU
MIXED_PRECISION_CHOICES = get_args(MixedPrecision)
TimestepSampling = Literal["uniform", "stratified"]  # ec_lora_t.training.objective.draw_timesteps
TIMESTEP_SAMPLING_CHOICES = get_args(TimestepSampling)
Positive = Annotated[float, Gt(0)]
Fraction = Annotated[float, Ge(0), Lt(1)]  # [0, 1)
Probability = Annotated[float, Ge(0), Le(1)]  # [0, 1]
Count = Annotated[int, Ge(1)]


@dataclass
class TrainingConfig:
    """How a training run trains. The one definition of these settings: the `train` params
    section's schema is built from these fields (stages/params/train.py), ranges included."""

    learning_rate: Positive = 1e-4
    # None: the ECM trains with `learning_rate` like the LoRA matrices (the report's setup).
    ecm_learning_rate: Positive | None = None
    weight_decay: Annotated[float, Ge(0)] = 1e-2
    adam_beta1: Fraction = 0.9
    adam_beta2: Fraction = 0.999
    adam_epsilon: Positive = 1e-8
    lr_warmup_ratio: Fraction = 0.1  # of the optimizer steps
    # Clip the gradient norm of the LoRA and ECM parameters to this before each update
    # (diffusers' training scripts clip at 1.0). None: no clipping; the norm is logged either way.
    max_grad_norm: Positive | None = 1.0
    epochs: Count = 4
    batch_size: Count = 16  # per process
    gradient_accumulation_steps: Count = 1
    mixed_precision: MixedPrecision = "auto"
    gradient_checkpointing: bool = False
    # Compile the UNet (not the ECM) with torch.compile (inductor, static shapes). On an H100 at
    # SD1.5 shape the loop runs 1.57x faster once compiled; the compilation costs two to three
    # minutes at the start of the run (docs/benchmarks.md). "auto": on a CUDA GPU only
    # (compiling the CPU-sized demo costs more than it saves).
    compile: Literal[False, True, "auto"] = False
    # The UNet's weights in channels-last (NHWC) memory, the layout of cuDNN's fastest
    # convolutions on tensor-core GPUs (diffusers' speed guide); "auto": on a CUDA GPU only.
    # Compiled on an H100 it made the loop and the PEFT anchor about 5 % slower (docs/benchmarks.md).
    channels_last: Literal[False, True, "auto"] = False
    seed: Annotated[int, Ge(0)] = 42
    # Keep only the newest checkpoints of a run (None: keep all); the run resumes from the newest.
    checkpoints_total_limit: Count | None = 2
    # Keep the checkpoints of at most this many unfinished runs (this one included), least
    # recently used removed first (None: keep all). A finished run removes its own.
    checkpoint_runs_limit: Count | None = 3
    # Probability that a sample trains on its generic caption (style tag and season only)
    # instead of its full caption. 0 is the report's setup. Why it matters: a full caption
    # already names what engagement depends on (the outfit, the light), so the vector adds
    # nothing the text does not say and the model learns to ignore it; with the generic
    # caption only the vector tells the model which kind of picture to draw.
    caption_dropout: Probability = 0.0
    # Probability that a sample trains with the null vector (every scale 1: the plain LoRA)
    # instead of its own, so that the plain LoRA learns the vector-free model and sampling can
    # guide on the vector (`ec_lora_t.generation.VectorSampling.vector_guidance`). 0: never.
    vector_dropout: Probability = 0.0
    # Probability that a sample trains with its time replaced by the guidance anchor's (0.5, the
    # average post's; `ec_lora_t.adapter.conditioning.AVERAGE_POST`): the anchor's time then also
    # stands for "any time", so time guidance (`evaluate.time_guidance`) pushes away from the
    # creator's average picture rather than from the middle of the feed. 0: never. Its effect
    # (docs/research.md, round 16aj): on the GPU recipe 0.2 with time guidance 12 raised the demo's
    # time control and kept the prompt.
    time_dropout: Probability = 0.0
    # Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR per sample, which
    # gives the noisy steps, where global attributes (light, colour) are decided, their share.
    # None: plain mean squared error (the report's loss).
    snr_gamma: Positive | None = None
    # How each batch's training timesteps are drawn (`ec_lora_t.training.objective.draw_timesteps`):
    # "uniform", independently (the diffusers scripts); "stratified", one per equal stratum of
    # the schedule: the same expected loss with less noise from batch to batch.
    timestep_sampling: TimestepSampling = "uniform"
    # Engagement-balanced sampling: draw images with weight density(engagement) ** -power
    # (`ec_lora_t.training.cache.engagement_balance_weights`); 0 is uniform shuffling.
    engagement_balance: Probability = 0.0
    # The negative control: train on engagement-time vectors permuted across images. A
    # verdict that still says "controls" after this is measuring something else.
    shuffle_vectors: bool = False
    # "ec_lora": the method; "plain_lora": the same LoRA trained without the vector (every
    # scale 1, the ECM untouched), the baseline an ablation or a speed comparison needs.
    conditioning: Literal["ec_lora", "plain_lora"] = "ec_lora"
    # Save (and sample with) an exponential moving average of the trainable weights, diffusers'
    # EMAModel with this maximal decay (about 1 / (1 - decay) last steps averaged); None: the
    # last step's weights. A candidate against seed-dependent control (ec_lora_t.training.ema).
    ema_decay: Annotated[float, Gt(0), Lt(1)] | None = None

    def __post_init__(self) -> None:
        check_constraints(self)  # the ranges in the annotations above

    def switched_on(self, switch: str, device_type: str) -> bool:
        """Whether the false | true | "auto" switch `switch` (`compile`, `channels_last`) is on for
        a run on `device_type`: "auto" is on on a CUDA GPU only."""
        value = getattr(self, switch)
        return value is True or (value == "auto" and device_type == "cuda")

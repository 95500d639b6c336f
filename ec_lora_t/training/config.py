"""How a training run trains: optimizer, schedule, clipping, epochs, batch, precision, caption dropout, checkpoints kept."""

from __future__ import annotations

from dataclasses import dataclass

from ec_lora_t.training.precision import MIXED_PRECISION_CHOICES


@dataclass
class TrainingConfig:
    learning_rate: float = 1e-4
    # None: the ECM trains with `learning_rate` like the LoRA matrices (the report's setup).
    ecm_learning_rate: float | None = None
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_warmup_ratio: float = 0.1
    # Clip the gradient norm of the LoRA and ECM parameters to this before each update
    # (diffusers' training scripts clip at 1.0). None: no clipping; the norm is logged either way.
    max_grad_norm: float | None = 1.0
    epochs: int = 4
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"  # auto (bf16 on a GPU, no on a CPU) | no | fp16 | bf16
    gradient_checkpointing: bool = False
    seed: int = 42
    # Keep only the newest checkpoints of a run (None: keep all); the run resumes from the newest.
    checkpoints_total_limit: int | None = 2
    # Keep the checkpoints of at most this many unfinished runs (this one included), least
    # recently used removed first (None: keep all). A finished run removes its own.
    checkpoint_runs_limit: int | None = 3
    # Probability that a sample trains on its generic caption (style tag and season only)
    # instead of its full caption. 0 is the report's setup. Why it matters: a full caption
    # already names what engagement depends on (the outfit, the light), so the vector adds
    # nothing the text does not say and the model learns to ignore it; with the generic
    # caption only the vector tells the model which kind of picture to draw.
    caption_dropout: float = 0.0
    # Probability that a sample trains with the null vector (every scale 1: the plain LoRA)
    # instead of its own, so that the plain LoRA learns the vector-free model and sampling can
    # guide on the vector (`ec_lora_t.generation.VectorSampling.vector_guidance`). 0: never.
    vector_dropout: float = 0.0
    # Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR per sample, which
    # gives the noisy steps, where global attributes (light, colour) are decided, their share.
    # None: plain mean squared error (the report's loss).
    snr_gamma: float | None = None
    # Engagement-balanced sampling: draw images with weight density(engagement) ** -power
    # (`ec_lora_t.training.cache.engagement_balance_weights`); 0 is uniform shuffling.
    engagement_balance: float = 0.0
    # The negative control: train on engagement-time vectors permuted across images. A
    # verdict that still says "controls" after this is measuring something else.
    shuffle_vectors: bool = False
    # "ec_lora": the method; "plain_lora": the same LoRA trained without the vector (every
    # scale 1, the ECM untouched), the baseline an ablation or a speed comparison needs.
    conditioning: str = "ec_lora"

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {self.mixed_precision!r}")
        for name in ("epochs", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoints_total_limit", "checkpoint_runs_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if not 0.0 <= self.lr_warmup_ratio < 1.0:
            raise ValueError(f"lr_warmup_ratio must be in [0, 1), got {self.lr_warmup_ratio}")
        for name in ("caption_dropout", "vector_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"snr_gamma must be > 0 or null, got {self.snr_gamma}")
        if self.conditioning not in ("ec_lora", "plain_lora"):
            raise ValueError(f"conditioning must be ec_lora or plain_lora, got {self.conditioning!r}")
        if not 0.0 <= self.engagement_balance <= 1.0:
            raise ValueError(f"engagement_balance must be in [0, 1], got {self.engagement_balance}")

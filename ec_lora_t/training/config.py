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
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")

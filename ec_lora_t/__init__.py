"""EC-LoRA-T: engagement- and time-conditioned LoRA for Stable Diffusion."""

__version__ = "0.1.0"

"""Thin DVC stage entry points: read params, call ec_lora_t, write outputs and metrics."""

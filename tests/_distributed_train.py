"""One process of a 2-process CPU training run over gloo, for tests/test_distributed.py.

Launched by `python -m torch.distributed.run --nproc_per_node 2 tests/_distributed_train.py MODE ...`
(torchrun sets RANK, WORLD_SIZE, MASTER_ADDR; accelerate's Accelerator picks gloo on a CPU).
MODE: train (to the end), crash (every process stops at optimizer step 3, in epoch 2), nan (from
optimizer step 3 on, the loss of process 1 alone is NaN). Every process writes its result to
<out>/rank<k>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from test_training import LORA, TRAINING, micro_unet

from ec_lora_t.adapter import ECLoRAConfig
from ec_lora_t.training.cache import load_latent_cache
from ec_lora_t.training.config import TrainingConfig
from ec_lora_t.training.loop import NonFiniteLossError, make_accelerator, train_ec_lora


def main() -> None:
    mode, cache_path, checkpoints, adapter_dir, out = sys.argv[1], *map(Path, sys.argv[2:6])
    torch.set_num_threads(1)
    training = TrainingConfig(**{**TRAINING, "gradient_accumulation_steps": 1})
    accelerator = make_accelerator(training)
    rank = accelerator.process_index
    unet = micro_unet()

    def on_step(step: int, loss: float, **info) -> None:
        if mode == "crash" and step == 3:
            raise KeyboardInterrupt
        if mode == "nan" and step == 2 and rank == 1:
            # After `prepare`, which copies process 0's weights to every process: only process 1 breaks.
            with torch.no_grad():
                unet.conv_out.bias.fill_(float("nan"))

    result: dict = {"rank": rank, "world_size": accelerator.num_processes}
    try:
        trained = train_ec_lora(
            accelerator, unet, DDPMScheduler(num_train_timesteps=1000), load_latent_cache(cache_path),
            ECLoRAConfig(**LORA), training, checkpoints, adapter_dir=adapter_dir, on_step=on_step,
            log=lambda message: print(f"[process {rank}] {message}", flush=True),
        )
        result |= {"losses": trained.losses, "resumed_from_epoch": trained.resumed_from_epoch}
    except NonFiniteLossError as error:
        result["error"] = str(error)
    except KeyboardInterrupt:
        result["interrupted"] = True
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()

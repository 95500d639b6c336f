"""One process of a CPU training run over gloo, for tests/test_distributed.py.

Launched by `python -m torch.distributed.run --nproc_per_node N tests/_distributed_train.py MODE ...`
(torchrun sets RANK, WORLD_SIZE, MASTER_ADDR; accelerate's Accelerator picks gloo on a CPU).
MODE: train (to the end), crash (every process stops at optimizer step 3, in epoch 2), nan (from
optimizer step 3 on, the loss of process 1 alone is NaN), per-sample-noise (to the end, with the
posterior sample, noise and timestep of every image fixed by the image, not by the process that
draws it), unsynced (per-sample-noise with the gradient all-reduce switched off: the broken
run the comparison must catch). Every process writes its result to <out>/rank<k>.json.

Why per-sample noise: the loop draws each process's noise from its own stream (seeded by run
seed, epoch and process index), so one process at batch 2b and two at batch b see the same
images per step but different noise, and no tolerance could compare their weights. With the
draws tied to the image the two splits compute the same loss, and the adapters they train
differ only by the order of float sums, unless the processes' gradients are not averaged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from test_training import LORA, TRAINING, micro_unet

from ec_lora_t.adapter import ECLoRAConfig
from ec_lora_t.training import objective
from ec_lora_t.training.cache import LatentCache, load_latent_cache
from ec_lora_t.training.config import TrainingConfig
from ec_lora_t.training.loop import NonFiniteLossError, make_accelerator, train_ec_lora


def tie_noise_to_images(cache: LatentCache, seed: int = 0) -> None:
    """Replace `objective.noisy_latents` (what every training step calls) by draws fixed per image.

    An image is recognised by its cached latent mean (the batch rows are exact copies of the
    cache's); each gets one posterior sample, one noise and one timestep for the whole run.
    """
    generator = torch.Generator().manual_seed(seed)
    posterior = torch.randn(cache.latent_mean.shape, generator=generator)
    noise = torch.randn(cache.latent_mean.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (len(cache),), generator=generator)
    known = cache.latent_mean.flatten(1)

    def noisy_latents(latent_mean, latent_std, noise_scheduler, generator, timestep_sampling="uniform"):
        # The timestep too is fixed per image, whatever `train.timestep_sampling` says.
        matches = (latent_mean.flatten(1).cpu()[:, None] == known[None]).all(dim=-1)  # (batch, images)
        assert matches.sum(dim=1).eq(1).all(), "a batch row is not exactly one cached image"
        index = matches.float().argmax(dim=1)
        latents = latent_mean + latent_std * posterior[index]
        return objective.NoisyLatents(
            noise_scheduler.add_noise(latents, noise[index], timesteps[index]), timesteps[index], noise[index]
        )

    assert hasattr(objective, "noisy_latents"), "the training step no longer draws noise through noisy_latents"
    objective.noisy_latents = noisy_latents


def switch_off_gradient_sync() -> None:
    """Every model accelerate wraps in DistributedDataParallel skips the all-reduce of its gradients
    (what `no_sync` does for one micro-batch), for the whole run."""
    prepare = Accelerator.prepare

    def prepare_unsynced(self, *objects, **kwargs):
        prepared = prepare(self, *objects, **kwargs)
        for item in prepared if isinstance(prepared, tuple) else (prepared,):
            if isinstance(item, torch.nn.parallel.DistributedDataParallel):
                item.require_backward_grad_sync = False
        return prepared

    Accelerator.prepare = prepare_unsynced


def main() -> None:
    mode, cache_path, checkpoints, adapter_dir, out = sys.argv[1], *map(Path, sys.argv[2:6])
    batch_size = int(sys.argv[6]) if len(sys.argv) > 6 else TRAINING["batch_size"]
    torch.set_num_threads(1)
    training = TrainingConfig(**{**TRAINING, "gradient_accumulation_steps": 1, "batch_size": batch_size})
    cache = load_latent_cache(cache_path)
    if mode in ("per-sample-noise", "unsynced"):
        tie_noise_to_images(cache)
    if mode == "unsynced":
        switch_off_gradient_sync()
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
            accelerator, unet, DDPMScheduler(num_train_timesteps=1000), cache,
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

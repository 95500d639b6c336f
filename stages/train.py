"""Stage `train`: EC-LoRA layers + ECM trained from the cached latents (report 4.5, 4.6).

python -m stages.train --latents data/latents --out data/train/adapter \
    --checkpoints data/train/checkpoints --live data/train/live --metrics metrics/train.json \
    --run-info data/run_info/train.json --summary data/train/summary.json

Reads params sections `train` and `model` (pretrained). An interrupted run resumes from its
newest usable checkpoint in its own folder `--checkpoints/<fingerprint>/` (same base model,
data, params and code); a finished run removed its checkpoints, so rerunning the stage
(`dvc repro -f train`) trains from scratch. See ec_lora_t/training/checkpoint.py. Logs loss,
gradient norm, learning rate and images/s per optimizer step with dvclive into --live
(`plots/metrics/<name>.tsv`), live during `dvc exp run`; dvc.yaml declares the loss curve as
an output and a plot.
"""

from __future__ import annotations

import contextlib
import math
import time

from dvclive import Live
from dvclive.plots import Metric
from tqdm.auto import tqdm

from ec_lora_t.models import load_components
from ec_lora_t.progress import progress_bar
from ec_lora_t.training.cache import load_latent_cache
from ec_lora_t.training.loop import NonFiniteLossError, TrainingResult, make_accelerator, train_ec_lora
from stages._common import load_section, run_stage, stage_parser, write_metrics
from stages.params.model import ModelParams
from stages.params.train import TrainParams, configs_from_params


class TrainingMonitor:
    """The loop's `on_step` callback: a dvclive step log (loss, learning rate, images/s) and
    progress bars over epochs and steps.

    `live` is None on processes other than the main one (only one writes the log). images/s
    is the loop's, measured between its synchronised reads of the device, else the time
    between two calls (checkpoint saving at an epoch's end included), from the second step on.
    """

    def __init__(self, live: Live | None, epochs: int, progress: bool | None = None):
        self.live = live
        self.first_step: int | None = None
        self._last: tuple[float, int] | None = None  # (perf_counter, images_seen) at the previous step
        self._epochs = progress_bar(total=epochs, desc="epochs", unit="epoch", enabled=progress, position=0)
        self._steps = progress_bar(desc="steps", unit="step", enabled=progress, position=1, leave=False)
        self._epoch: int | None = None

    def __call__(self, step: int, loss: float, *, epoch: int, learning_rate: float, images_seen: int,
                 steps_per_epoch: int, grad_norm: float | None = None,
                 images_per_second: float | None = None) -> None:
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step = step
        if epoch != self._epoch:  # a new epoch (or the first one of a resumed run)
            self._epochs.n = epoch
            self._epochs.refresh()
            self._steps.reset(total=steps_per_epoch)
            self._epoch = epoch
        self._steps.update(1)
        self._steps.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}", refresh=False)
        if step == steps_per_epoch * (epoch + 1):
            self._epochs.update(1)
        if self.live is not None:
            self.live.step = step
            self.live.log_metric("loss", loss)
            self.live.log_metric("learning_rate", learning_rate)
            if grad_norm is not None:
                self.live.log_metric("grad_norm", grad_norm)
            # The loop's figure is measured between its synchronised reads of the GPU; without it
            # (the first read of a window), the time since the previous call.
            if images_per_second is None and self._last is not None:
                images_per_second = (images_seen - self._last[1]) / (now - self._last[0])
            if images_per_second is not None:
                self.live.log_metric("images_per_second", images_per_second)
            self.live.next_step()
        self._last = (time.perf_counter(), images_seen)

    def close(self) -> None:
        self._steps.close()
        self._epochs.close()


def complete_loss_log(live: Live, losses: list[float], first_step: int | None) -> None:
    """After a resumed run, write the whole loss history into dvclive's loss plot.

    The callback saw only the steps this run made; the checkpoint carried the earlier
    losses, so the plot (a DVC output) is the same whether or not the run was interrupted.
    """
    if first_step == 1 or not losses:
        return
    history = Metric("loss", live.plots_dir)
    history.output_path.unlink(missing_ok=True)
    for step, loss in enumerate(losses, start=1):
        history.step = step
        history.dump(loss)


def write_results(result: TrainingResult, metrics: str, summary: str, run_info: str, seconds: float) -> None:
    """The headline metrics, the run's summary (an output) and its run info (timings: not an output)."""
    last_epoch = result.losses[-math.ceil(len(result.losses) / result.epochs):]
    clipped_steps = (sum(norm > result.max_grad_norm for norm in result.grad_norms)
                     if result.max_grad_norm is not None else 0)
    # The few numbers compared across experiments (dvc exp show); the rest in --summary.
    write_metrics(
        metrics,
        {"loss": sum(last_epoch) / len(last_epoch), "steps": result.steps, "clipped_steps": clipped_steps},
    )
    write_metrics(
        summary,
        {
            "final_loss": result.final_loss,
            "final_epoch_mean_loss": sum(last_epoch) / len(last_epoch),
            "steps": result.steps,
            "epochs": result.epochs,
            # Gradient norm of LoRA + ECM before clipping, per optimizer step (dvclive's grad_norm).
            "max_grad_norm": result.max_grad_norm,
            "grad_norm_final": result.grad_norms[-1],
            "grad_norm_max": max(result.grad_norms),
            "clipped_steps": clipped_steps,
            "mixed_precision": result.mixed_precision,
            "device": result.device,
            "num_images": result.num_images,
            "num_lora_layers": result.num_lora_layers,
            "trainable_parameters": result.trainable_parameters,
        },
    )
    # How this run went, not what it produced: kept out of the committed metrics so that a
    # rerun with the same results leaves git clean.
    write_metrics(
        run_info,
        {
            "seconds": seconds,
            # After the first 10 steps, between synchronised reads of the device: the speed of
            # the hardware. The whole-run figure beside it includes the start-up steps.
            "steady_images_per_second": result.steady_images_per_second,
            "images_per_second": result.images_per_second,
            "peak_memory_mb": result.peak_memory_mb,
            "device": result.device,
            "resumed_from_epoch": result.resumed_from_epoch,
            # torch.compile (train.compile): start-up cost and recompiles after it (0 expected)
            **result.extra,
        },
    )


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--latents", required=True, help="the latents stage's shard folder (data/latents)")
    parser.add_argument("--out", required=True, help="folder for the final adapter")
    parser.add_argument("--checkpoints", required=True, help="folder for per-epoch checkpoints (kept between runs)")
    parser.add_argument("--live", required=True, help="dvclive folder: per-step loss, learning rate, images/s")
    parser.add_argument("--run-info", required=True, help="JSON of this run's timings and peak memory (not a metric)")
    parser.add_argument("--summary", required=True, help="JSON of the run's results beyond the headline metrics")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    lora_config, training = configs_from_params(load_section(TrainParams, "train", args.params))
    pretrained = load_section(ModelParams, "model", args.params).pretrained
    cache = load_latent_cache(args.latents)
    # The UNet and the noise schedule: latents and text embeddings are cached. A text-encoder
    # LoRA also needs the text encoder, which then encodes the cached token ids every step.
    components = load_components(pretrained)
    unet, noise_scheduler = components.unet, components.noise_scheduler
    text_encoder = components.text_encoder if lora_config.text_encoder_rank else None
    del components

    accelerator = make_accelerator(training)
    with contextlib.ExitStack() as stack:
        live = None
        if accelerator.is_main_process:
            # dvc.yaml names the plots; dvclive must not write a dvc.yaml or an experiment of its own.
            live = stack.enter_context(Live(args.live, dvcyaml=False, save_dvc_exp=False))
        monitor = TrainingMonitor(live, training.epochs)
        stack.callback(monitor.close)
        try:
            result = train_ec_lora(
                accelerator, unet, noise_scheduler, cache, lora_config, training, args.checkpoints,
                adapter_dir=args.out, on_step=monitor, log=tqdm.write, text_encoder=text_encoder,
            )
        except NonFiniteLossError as error:
            raise SystemExit(f"stage train stopped: {error}") from error
        if live is not None:
            complete_loss_log(live, result.losses, monitor.first_step)
    if not accelerator.is_main_process:
        return  # the main process writes the outputs

    write_results(result, args.metrics, args.summary, args.run_info, seconds=time.perf_counter() - started)


if __name__ == "__main__":
    run_stage(main)

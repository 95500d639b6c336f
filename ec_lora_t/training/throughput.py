"""How fast a run trains: images/s between host reads, the steady state after warm-up, and
what warm-up (compilation included) cost.

The loop reads the device every few steps (`GPU_SYNC_EVERY` in loop.py); each read is
synchronised, so the time between two reads is device time. The steady state starts at the
first read after `STEADY_AFTER_STEPS` optimizer steps of this run (allocator growth, cuDNN
autotuning, torch.compile's first graphs and the optimizer's first step are behind it) and
leaves out the time spent saving checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

STEADY_AFTER_STEPS = 10


def dynamo_graphs_compiled() -> int:
    """Graphs torch.compile (Dynamo) has compiled in this process so far: a recompile adds one."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


@dataclass
class Throughput:
    first_step: int = 1  # the first optimizer step this process makes in this run (after a resume: later)
    started: float = field(default_factory=lambda: time.perf_counter())
    window: tuple[float, int] | None = None  # (perf_counter, images_seen) of the previous read
    steady_start: tuple[float, int] | None = None
    steady_end: tuple[float, int] | None = None
    paused_seconds: float = 0.0  # inside the steady span (checkpoint saving)
    paused_at: float | None = None
    warmup_seconds: float | None = None
    graphs_at_steady_start: int | None = None

    def read(self, step: int, images_seen: int) -> float | None:
        """Record a synchronised read after optimizer step `step`; images/s since the previous
        read (None for the first read and the first after a pause)."""
        now = time.perf_counter()
        rate = None if self.window is None else (images_seen - self.window[1]) / max(now - self.window[0], 1e-9)
        self.window = (now, images_seen)
        if self.steady_start is None and step - self.first_step + 1 >= STEADY_AFTER_STEPS:
            self.steady_start = (now, images_seen)
            self.warmup_seconds = now - self.started
            self.graphs_at_steady_start = dynamo_graphs_compiled()
        elif self.steady_start is not None:
            self.steady_end = (now, images_seen)
        return rate

    def pause(self) -> None:
        """Work that is not training starts (a checkpoint save)."""
        self.paused_at, self.window = time.perf_counter(), None

    def resume(self) -> None:
        if self.paused_at is not None and self.steady_start is not None:
            self.paused_seconds += time.perf_counter() - self.paused_at
        self.paused_at = None

    @property
    def steady_images_per_second(self) -> float | None:
        if self.steady_start is None or self.steady_end is None:
            return None
        seconds = self.steady_end[0] - self.steady_start[0] - self.paused_seconds
        return (self.steady_end[1] - self.steady_start[1]) / max(seconds, 1e-9)

    def warmup(self) -> dict[str, float | int | None]:
        """Warm-up cost and recompiles: seconds from setup to the steady state, graphs compiled
        in all and after the steady state began (0: the scales and batches compile once)."""
        graphs = dynamo_graphs_compiled()
        after = None if self.graphs_at_steady_start is None else graphs - self.graphs_at_steady_start
        return {"warmup_seconds": self.warmup_seconds, "graphs_compiled": graphs,
                "graphs_compiled_after_warmup": after}

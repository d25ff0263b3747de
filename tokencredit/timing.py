"""Wall-clock and process-CPU seconds of the trainer's phases.

Every metrics row carries both for each phase: `time_<phase>_s` (wall clock)
and `cpu_<phase>_s` (CPU seconds of every thread of this process, which other
jobs on a shared machine disturb far less). Phases: generate, reward
(rollout/step.py), old_logprob, token_weights, update (trainer.update),
flip_probe, step (the whole rollout step). Benchmarks read them from
metrics.jsonl instead of patching the package's functions (bench/vs_trl.py).

Try it:
    sw = Stopwatch()
    ...                       # work
    wall, cpu = sw.lap()      # seconds since the start or the last lap
"""

from __future__ import annotations

import time


class Stopwatch:
    """(wall, CPU) seconds since creation or the last `lap()`."""

    def __init__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def peek(self) -> tuple[float, float]:
        """Seconds since the last lap, without starting a new one."""
        return time.perf_counter() - self._wall, time.process_time() - self._cpu

    def lap(self) -> tuple[float, float]:
        """Seconds since the last lap; starts the next."""
        out = self.peek()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return out


def add_seconds(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds of two intervals added up (a phase that runs in several pieces)."""
    return a[0] + b[0], a[1] + b[1]


def phase_metrics(phase: str, seconds: tuple[float, float]) -> dict[str, float]:
    """{"time_<phase>_s": wall, "cpu_<phase>_s": cpu}."""
    return {f"time_{phase}_s": float(seconds[0]), f"cpu_{phase}_s": float(seconds[1])}

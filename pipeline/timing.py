"""Where a run's wall time goes: seconds per stage, logged to MLflow as `seconds_<stage>`.

The stages, in order: `startup` (the process's start to the run: Python, imports, Hydra's
composition), `imports` (TensorFlow and Keras), `setup` (config check, building the stages,
finding a run to resume, opening the MLflow run and the run directory), `data`, `source` (load, fingerprint, adapt), `backbone_pass` (computing the
frozen backbone's outputs for the feature cache; 0 on a cache hit or without the cache),
`head_epochs` (the rest of training: the epochs, their checkpoints and MLflow points),
`evaluate`, `export` (writing the formats), `verify` (reloading them and comparing with the
trained model) and `mlflow` (metrics, artifacts and the MLflow model). Everything but the
backbone pass and the epochs is the run's fixed cost (`seconds_fixed`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

# Not the run's own work: what `seconds_fixed` leaves out.
WORK = ("backbone_pass", "head_epochs")


class StageClock:
    """Adds up wall seconds per stage: `with clock("evaluate"): ...`.

    Example:
        >>> clock = StageClock()
        >>> with clock("data"):
        ...     data = stages.data.load()
        >>> clock.metrics()  # {"seconds_data": 1.2, ..., "seconds_fixed": ..., "seconds_total": ...}
    """

    def __init__(self, startup: float | None = None):
        self.seconds: dict[str, float] = {}
        if startup is not None:
            self.seconds["startup"] = startup
        self._began = time.perf_counter()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def elapsed(self) -> float:
        """Seconds since the clock was made, less those already given to stages after it."""
        return time.perf_counter() - self._began - sum(s for k, s in self.seconds.items() if k != "startup")

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def move(self, part: str, whole: str, seconds: float) -> None:
        """Count `seconds` of stage `whole` as stage `part` instead (the backbone pass in training)."""
        self.add(part, seconds)
        self.add(whole, -seconds)

    def metrics(self) -> dict[str, float]:
        """`seconds_<stage>` for each stage, with `seconds_fixed` and `seconds_total`."""
        total = self.seconds.get("startup", 0.0) + time.perf_counter() - self._began
        found = {f"seconds_{stage}": round(seconds, 3) for stage, seconds in self.seconds.items()}
        found["seconds_fixed"] = round(total - sum(self.seconds.get(stage, 0.0) for stage in WORK), 3)
        found["seconds_total"] = round(total, 3)
        return found

    def line(self) -> str:
        """The stages in one line, for the run's summary."""
        shown = {stage: seconds for stage, seconds in self.seconds.items() if seconds >= 0.05}
        return ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in shown.items())


def since_process_start() -> float | None:
    """Seconds since this process started (Linux `/proc`), or None where that is unknown."""
    try:
        with open("/proc/self/stat") as handle:
            ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as handle:
            boot = next(float(line.split()[1]) for line in handle if line.startswith("btime"))
        return max(time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK")), 0.0)
    except (OSError, ValueError, IndexError, StopIteration):
        return None

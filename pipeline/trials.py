"""An Optuna trial as a sweep job sees it: reached through the study's shared storage.

The sweeper (`hydra_plugins/pipeline_optuna_sweeper`) asks the study for a trial and gives
the job its address through `hydra.job.env_set`, which every Hydra launcher (basic, joblib,
submitit, Ray) sets in the process that runs the job, on this machine or another. The
address stays out of the config on purpose: config keys become MLflow params and enter the
run's config fingerprint, which `resume=auto` and reruns match on.

The job reports its per-epoch `optimized_metric` to the study and asks the study's pruner
(`hydra.sweeper.pruner`) whether to go on; a pruned trial stops training with `TrialPruned`.
Optuna is imported only by jobs that are trials.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import TrialPruned

log = logging.getLogger("pipeline")

TRIAL_STATE = "trial_state"  # MLflow tag of a trial's run: COMPLETE, PRUNED or FAIL
STUDY_ENV = "PIPELINE_OPTUNA_STUDY"
STORAGE_ENV = "PIPELINE_OPTUNA_STORAGE"
TRIAL_ENV = "PIPELINE_OPTUNA_TRIAL"

EpochHook = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrialAddress:
    """Where a job finds its trial: the study's name and storage URL, and the trial's number."""

    study_name: str
    storage: str
    number: int

    def env(self) -> dict[str, str]:
        return {STUDY_ENV: self.study_name, STORAGE_ENV: self.storage, TRIAL_ENV: str(self.number)}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TrialAddress | None:
        """The address the sweeper set for this job; None when the job is not a trial."""
        if TRIAL_ENV not in environ:
            return None
        return cls(environ[STUDY_ENV], environ[STORAGE_ENV], int(environ[TRIAL_ENV]))


def storage(url: str) -> Any:
    """Optuna's RDB storage at `url`; a relative SQLite file is made absolute, and its
    connections wait for other processes' locks like the MLflow store's do."""
    import optuna

    from pipeline.tracking.store import store_uri

    return optuna.storages.RDBStorage(store_uri(url))


class TrialReporter:
    """Reports a trial's per-epoch metric to its study, and stops the trial when the pruner says so.

    Args:
        trial: the `optuna.trial.Trial` this job runs.
        monitor: the per-epoch metric to report (the sweep's `optimized_metric`, such as
            `val_accuracy`); an epoch whose logs lack it reports nothing.

    Example:
        >>> reporter = TrialReporter.open(TrialAddress.from_env(), "val_accuracy", MedianPruner())
        >>> trainer.fit(adapted, data, on_epoch_end=reporter.after(tracked.log_epoch))
    """

    def __init__(self, trial: Any, monitor: str | None):
        self._trial = trial
        self.monitor = monitor
        self._warned = False

    @classmethod
    def open(cls, address: TrialAddress, monitor: str | None, pruner: Any | None) -> TrialReporter:
        """The trial at `address`, judged by `pruner` (None: never pruned, still reported)."""
        import optuna

        store = storage(address.storage)
        study = optuna.load_study(
            study_name=address.study_name,
            storage=store,
            sampler=optuna.samplers.RandomSampler(),  # the sweeper samples; a job only reports
            pruner=pruner if pruner is not None else optuna.pruners.NopPruner(),
        )
        study_id = store.get_study_id_from_name(address.study_name)
        trial_id = store.get_trial_id_from_study_id_trial_number(study_id, address.number)
        return cls(optuna.trial.Trial(study, trial_id), monitor)

    @property
    def tags(self) -> dict[str, str]:
        """MLflow tags naming the trial (tags are not part of the config fingerprint)."""
        return {"trial_number": str(self._trial.number), "study_name": self._trial.study.study_name}

    def after(self, hook: EpochHook) -> EpochHook:
        """`hook`, then this epoch's report (so a pruned epoch's metrics are logged too)."""

        def hook_then_report(epoch: int, metrics: dict[str, float]) -> None:
            hook(epoch, metrics)
            self.report(epoch, metrics)

        return hook_then_report

    def report(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Report `metrics[monitor]` at step `epoch`; raise `TrialPruned` if the pruner stops it."""
        value = metrics.get(self.monitor) if self.monitor else None
        if value is None or not math.isfinite(value):
            if not self._warned:
                self._warned = True
                log.warning("trial %d: optimized_metric=%r is not among the per-epoch metrics (%s); "
                            "the pruner cannot judge this trial. Optimize a validation metric, such as "
                            "val_accuracy, to prune.", self._trial.number, self.monitor, ", ".join(sorted(metrics)))
            return
        self._trial.report(float(value), epoch)
        if self._trial.should_prune():
            message = (f"trial {self._trial.number} pruned after epoch {epoch} "
                       f"({self.monitor}={value:.4f}): the pruner judged it hopeless")
            log.info("%s", message)
            raise TrialPruned(message, epochs_completed=epoch + 1)

"""The Optuna sweeper: ask the study for trials, launch them as Hydra jobs, tell it how each ended.

Only Optuna's public API: `create_study(load_if_exists=True)` on an RDB storage, `ask`/`tell`,
`enqueue_trial`. A job reaches its own trial through that storage (`pipeline.trials`), to
report each epoch and to be pruned, whichever launcher runs it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.pipeline_optuna_sweeper.search_space import SearchSpace, quote
from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger("pipeline")

OWNER = "sweeper"  # user attr of a trial: the host and process of the sweep that asked for it
REQUEUED_FROM = "requeued_from"  # user attr of a trial that repeats one whose sweep died
GRID_SAMPLER = "optuna.samplers.GridSampler"


class OptunaSweeper(Sweeper):
    """Runs a persistent Optuna study through Hydra's launchers, one job per trial, with pruning.

    Args:
        direction: `minimize` or `maximize` the value the job returns (`optimized_metric`).
        study_name: the study in `storage`; the same name continues the same study.
        storage: an RDB URL (`sqlite:///outputs/optuna.db`, `postgresql://...`) that every
            job can reach; null keeps the study in the sweep directory.
        n_trials: trials in the study in all: a rerun runs only the missing ones. A trial
            left running by a sweep that died is run again with the same values (its MLflow
            run resumes from its checkpoint), in place of the lost one.
        n_jobs: trials launched together; a parallel launcher (`hydra/launcher=joblib`)
            runs them at once, and the sampler sees their results only after the batch.
        max_failure_rate: the sweep stops once more than this fraction of its trials failed.
        sampler: a `_target_` node (`optuna.samplers.TPESampler`, `RandomSampler`,
            `GridSampler` over the `choice`/`range` params, `CmaEsSampler` with `cmaes` installed).
        pruner: a `_target_` node (`optuna.pruners.MedianPruner`, `HyperbandPruner`, ...)
            that each job asks after every epoch; null runs every trial to the end.
        params: `{key: search space}` in Hydra's override grammar (`search_space.py`).

    Example:
        >>> # conf/hparams_search/digits_optuna.yaml
        >>> # defaults: [{override /hydra/sweeper: optuna}]
        >>> # hydra: {sweeper: {direction: maximize, n_trials: 12,
        >>> #                   params: {head.dropout: interval(0.0, 0.5)}}}
    """

    def __init__(self, direction: str, study_name: str | None, storage: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float, sampler: Any, pruner: Any, params: Any):
        if direction not in ("minimize", "maximize"):
            raise ConfigError(f"hydra.sweeper.direction={direction!r}: expected minimize or maximize "
                              "(the value the job returns, optimized_metric)")
        for key, value, low in (("n_trials", n_trials, 0), ("n_jobs", n_jobs, 1)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"hydra.sweeper.{key}={value!r}: expected a whole number >= {low}")
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ConfigError(f"hydra.sweeper.max_failure_rate={max_failure_rate!r}: expected a "
                              "fraction from 0.0 (stop at the first failed trial) to 1.0 (never stop)")
        self.direction = direction
        self.study_name = study_name
        self.storage = storage
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.sampler = _plain(sampler)
        self.pruner = _plain(pruner)
        self.params = _plain(params) or {}
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # Before the sweep's MLflow parent run opens (the callbacks' on_multirun_start).
        if config.get("optimized_metric") is None:
            raise ConfigError("hydra/sweeper=optuna needs the value each job returns: set optimized_metric, "
                              "for example optimized_metric=val_accuracy")
        if self.pruner:
            _build("hydra.sweeper.pruner", self.pruner)
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Any]:
        import optuna

        from pipeline.trials import storage

        search = SearchSpace.parse(self.params, arguments)
        url = self._storage_url()
        study = optuna.create_study(
            study_name=self.study_name, storage=storage(url), sampler=self._sampler(search),
            pruner=_build("hydra.sweeper.pruner", self.pruner) if self.pruner else None,
            direction=self.direction, load_if_exists=True,
        )
        if study.trials and (self.sampler or {}).get("seed") is not None:
            # A seeded sampler would start over and ask the first trials' values again.
            study.sampler = self._sampler(search, offset=len(study.trials))
        _requeue_stale(study)
        n_trials = self.n_trials if search.grid is None else min(self.n_trials, math.prod(map(len, search.grid.values())))
        done = _counted(study)
        log.info("Optuna study '%s' in %s: %d of n_trials=%d trials done", study.study_name, url, done, n_trials)
        returns: list[Any] = []
        failed = 0
        while done < n_trials:
            batch = [study.ask(search.distributions) for _ in range(min(self.n_jobs, n_trials - done))]
            for trial in batch:
                trial.set_user_attr(OWNER, {"host": socket.gethostname(), "pid": str(os.getpid())})
            jobs = self.launcher.launch(
                [search.overrides(t.params) + _address(study.study_name, url, t.number) for t in batch],
                initial_job_idx=self.job_idx,
            )
            self.job_idx += len(jobs)
            for trial, job in zip(batch, jobs):
                state, value = _outcome(trial.number, job)
                study.tell(trial, value, state=state)
                failed += state == optuna.trial.TrialState.FAIL
            returns.extend(jobs)
            done += len(batch)
            if failed > self.max_failure_rate * len(returns):
                raise PipelineError(
                    f"{failed} of this sweep's {len(returns)} trials failed, more than "
                    f"hydra.sweeper.max_failure_rate={self.max_failure_rate}: the search stops. The failed "
                    "jobs' MLflow runs hold their errors; fix the cause and run the same command again "
                    "(the study continues), or raise max_failure_rate to let a search go on past failures."
                )
        self._write_results(study)
        return returns

    def _storage_url(self) -> str:
        """The storage as every job can reach it: a SQLite file's path absolute, its folder made."""
        from pipeline.tracking.store import absolute_uri

        url = self.storage or f"sqlite:///{Path(str(self.config.hydra.sweep.dir)) / 'optuna.db'}"
        url = absolute_uri(url)
        if url.startswith("sqlite:////"):
            Path(url.removeprefix("sqlite:///").split("?")[0]).parent.mkdir(parents=True, exist_ok=True)
        return url

    def _sampler(self, search: SearchSpace, offset: int = 0) -> Any:
        """The configured sampler; a seeded one seeded `offset` further on (the study's earlier trials)."""
        sampler = dict(self.sampler or {"_target_": "optuna.samplers.TPESampler"})
        if offset and sampler.get("seed") is not None:
            sampler["seed"] = int(sampler["seed"]) + offset
        if sampler.get("_target_") == GRID_SAMPLER and "search_space" not in sampler:
            if search.grid is None:
                raise ConfigError(
                    "hydra.sweeper.sampler: GridSampler needs values it can list, but some of "
                    f"hydra.sweeper.params ({', '.join(search.distributions)}) are interval(..): use "
                    "choice(..) or range(..) for a grid, or another sampler"
                )
            sampler["search_space"] = search.grid
        return _build("hydra.sweeper.sampler", sampler)

    def _write_results(self, study: Any) -> None:
        """Log the best trial and write it to `optimization_results.yaml` in the sweep directory."""
        import optuna

        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            log.warning("Optuna study '%s' has no completed trial yet", study.study_name)
            return
        best = study.best_trial
        log.info("Best trial #%d: %s = %s", best.number, best.params, best.value)
        results = {"name": "optuna", "study_name": study.study_name, "best_trial": best.number,
                   "best_params": best.params, "best_value": best.value}
        path = Path(str(self.config.hydra.sweep.dir)) / "optimization_results.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), path)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _build(key: str, node: dict[str, Any]) -> Any:
    """`instantiate(node)`, or a ConfigError naming `key` and the target."""
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except Exception as error:
        cause = error.__cause__ or error
        hint = " (pip install cmaes)" if "cmaes" in str(cause) else ""
        raise ConfigError(
            f"{key}: could not build {node.get('_target_')!r} ({type(cause).__name__}: {cause}){hint}. "
            "Set its _target_ to an optuna.samplers / optuna.pruners class and its keys to that "
            "class's arguments."
        ) from error


def _address(study_name: str, url: str, number: int) -> list[str]:
    """Overrides that give a job its trial's address in its environment (not in its config)."""
    from pipeline.trials import TrialAddress

    env = TrialAddress(study_name, url, number).env()
    return [f"++hydra.job.env_set.{key}={quote(value)}" for key, value in env.items()]


def _outcome(number: int, job: Any) -> tuple[Any, float | None]:
    """How trial `number` ended, from its job: COMPLETE with the returned value, PRUNED or FAIL."""
    from optuna.trial import TrialState

    from pipeline.compat import job_error
    from pipeline.errors import TrialPruned

    error = job_error(job)
    if isinstance(error, TrialPruned):
        return TrialState.PRUNED, None
    if error is not None:
        log.warning("trial %d failed: %s: %s", number, type(error).__name__, error)
        return TrialState.FAIL, None
    value = job.return_value
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        log.warning("trial %d failed: its job returned %r, not a finite number (optimized_metric)", number, value)
        return TrialState.FAIL, None
    return TrialState.COMPLETE, float(value)


def _counted(study: Any) -> int:
    """Trials that count towards n_trials: finished ones, less those a requeued trial repeats."""
    trials = study.get_trials(deepcopy=False)
    replaced = {t.user_attrs[REQUEUED_FROM] for t in trials if REQUEUED_FROM in t.user_attrs}
    return sum(t.state.is_finished() and t.number not in replaced for t in trials)


def _requeue_stale(study: Any) -> None:
    """Fail the trials that a dead sweep on this host left running, and queue their values again.

    The repeated trial's job has the same config, so `resume=auto` continues the killed
    MLflow run from its checkpoint. Trials of a sweep on another host are left alone (this
    host cannot tell whether that sweep still runs).
    """
    import optuna

    from pipeline.provenance import is_alive

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = trial.user_attrs.get(OWNER)
        if not owner or owner.get("host") != socket.gethostname() or is_alive(owner):
            continue
        log.info("trial %d was left running by a sweep that stopped (pid %s): running its values again",
                 trial.number, owner.get("pid"))
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={REQUEUED_FROM: trial.number})


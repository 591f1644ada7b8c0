"""`python -m pipeline [overrides]`: compose the config, check it, run the five stages.

The runner is the only code that reads the config. `run()` is the story: check the config,
build one object per group (`Stages`), find the run to resume, then inside the MLflow run
load -> adapt -> train (`_train`, under the strategy's scope), evaluate, export and record.
Runtime facts (the classes the data holds) are passed at the call site, and the stages hand
each other small typed results (`pipeline.types`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import config, provenance
from pipeline.distribute import is_chief
from pipeline.errors import (
    ConfigError,
    PipelineError,
    RunStopped,
    TrialPruned,
    describe_write_fault,
    is_disk_full,
    write_fault,
)
from pipeline.files import run_dir_lock
from pipeline.hydra_app import start_error, tidy_run_dir
from pipeline.resume import RUN_FILE, resume_target
from pipeline.sweep import PARENT_RUN_ENV
from pipeline.timing import StageClock, since_process_start
from pipeline.tracking.process import in_own_process
from pipeline.trials import TRIAL_STATE, TrialAddress, TrialReporter

log = logging.getLogger("pipeline")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(PROJECT_ROOT / "conf")


def run(
    cfg: DictConfig,
    rerun_of: tuple[str, Mapping[str, str]] | None = None,
    on_run_dir: Callable[[Path, bool], None] | None = None,
    startup: float | None = None,
) -> dict[str, float]:
    """Run one experiment from a composed config; returns the final metrics.

    A full disk or a refused permission anywhere in the run raises `RunStopped`, and its
    MLflow run ends KILLED, like an interrupted one, so that the same command resumes it.

    Args:
        rerun_of: `(run_id, tags)` of the run this one repeats (`python -m pipeline.rerun`);
            every recorded fact that differs now is logged as a warning.
        on_run_dir: called with the directory the run writes to, and whether it resumes an
            earlier run there, once the directory is locked and the MLflow run open.
        startup: seconds from the process's start to this call, for `seconds_startup`.
    """
    clock = StageClock(startup)
    resolved = config.validate(cfg)  # before TensorFlow is imported
    # MLflow's import and its store's opening in a process of their own, on the other core,
    # while this one imports TensorFlow (`pipeline.tracking.process`).
    # A non-chief multi-worker task logs nothing: it needs no such process.
    tracker = config.build(cfg, "tracking")
    chief = is_chief(cfg.train.get("strategy", "default"), cfg.train.get("cluster", "tf_config"))
    with in_own_process(tracker) if chief else nullcontext(tracker) as tracking:
        return _run(cfg, resolved, tracking, chief, clock, rerun_of, on_run_dir)


def _run(cfg: DictConfig, resolved: dict[str, Any], tracking: Any, chief: bool, clock: StageClock,
         rerun_of: tuple[str, Mapping[str, str]] | None, on_run_dir: Callable[[Path, bool], None] | None,
         ) -> dict[str, float]:
    with clock("imports"):  # TensorFlow and Keras, which building the stages needs: seconds of their own
        import keras  # noqa: F401
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    # TensorFlow's own INFO lines (absl's logger) are not the run's story: writing a SavedModel
    # logs every captured variable's number, kilobytes a line, into the run's log.
    logging.getLogger("absl").setLevel(logging.WARNING)
    stages = Stages.build(cfg, tracking)
    check = RerunCheck(rerun_of)
    trial = _trial(cfg)  # None unless an Optuna sweep runs this job as a trial
    identity = provenance.config_fingerprint(resolved)
    tags = {**provenance.environment_tags(), "config_sha256": identity, **_job_overrides(), **check.tags,
            **(trial.tags if trial else {})}
    check.compare(tags)
    finished = _finished_in_sweep(cfg, stages.tracking, identity)
    if finished is not None:
        return finished
    resumed = resume_target(cfg.get("resume"), stages.tracking, identity,
                            multi_worker=stages.train.strategy == "multi_worker")
    output_dir = resumed.run_dir if resumed else Path(cfg.output_dir)

    with (
        _machine_faults(_places(resolved, output_dir), again=_again(cfg, output_dir)),
        _sigterm_as_interrupt() as stop_if_signalled,
        run_dir_lock(output_dir) if chief else nullcontext(),
        stages.tracking.run(
            config.flatten(_params(resolved)),
            tags,
            record=chief,
            resume_run_id=resumed.run_id if resumed else None,
            parent_run_id=os.environ.get(PARENT_RUN_ENV),
        ) as tracked,
        _trial_state(tracked, trial),
    ):
        _open_run_dir(output_dir, resolved, tracked, fresh=resumed is None)
        if on_run_dir is not None:
            on_run_dir(output_dir, resumed is not None)
        clock.add("setup", clock.elapsed())
        trained = _train(stages, tracked, check, output_dir, resumed is not None, trial, clock)
        stop_if_signalled()
        if trained is None:
            return {}  # non-chief workers train; the chief evaluates, exports and logs
        adapted, data, result = trained
        with clock("evaluate"):
            evaluation = stages.evaluate.evaluate(adapted, data, output_dir / "evaluation", result.history,
                                                  features=result.features)
        stop_if_signalled()
        # A resumed run may have exported before it was killed (during the MLflow logging).
        with clock("export"):
            exported = stages.export.export(adapted, data, output_dir / "export", replace=resumed is not None,
                                           features=result.features, backbone_function=result.backbone_function)
        clock.move("verify", "export", exported.verify_seconds)
        stop_if_signalled()
        metrics = {**evaluation.metrics, "epochs_completed": float(result.epochs_completed), **exported.metrics}
        with clock("mlflow"):
            model_uri = _record(tracked, output_dir, metrics, evaluation, exported, step=result.epochs_completed)
        tracked.log_metrics(clock.metrics(), step=result.epochs_completed)
    _print_summary(metrics, exported, tracked, model_uri, clock)
    return metrics


@dataclass(frozen=True)
class Stages:
    """One object per config group, built from the config before any weight is loaded."""

    source: Any
    data: Any
    freeze: Any
    head: Any
    train: Any
    evaluate: Any
    export: Any
    tracking: Any

    @classmethod
    def build(cls, cfg: DictConfig, tracking: Any) -> Stages:
        """The stages of `cfg`, with `tracking` (built before the others: see `run`)."""
        groups = [group for group in cls.__dataclass_fields__ if group != "tracking"]
        return cls(**{group: config.build(cfg, group) for group in groups}, tracking=tracking)


class RerunCheck:
    """Warns about every recorded fact of the original run that differs now (reruns only)."""

    def __init__(self, rerun_of: tuple[str, Mapping[str, str]] | None):
        self.original = rerun_of[1] if rerun_of else None
        self.tags = {"rerun_of": rerun_of[0]} if rerun_of else {}  # marks the new run

    def compare(self, facts: dict[str, str]) -> dict[str, str]:
        """Logs each fact that differs from the original run's; returns `facts`."""
        for difference in provenance.differences(self.original or {}, facts):
            log.warning("rerun: %s", difference)
        return facts


def _open_run_dir(output_dir: Path, resolved: dict[str, Any], tracked, fresh: bool) -> None:
    """Creates the run directory; a fresh run writes its resolved config and run id there."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tracked.set_tags({"run_dir": str(output_dir.resolve())})
    if fresh:
        _write_run_files(output_dir, resolved, tracked)
    elif (output_dir / "config.yaml").exists():  # again: the first attempt may have stopped logging it
        tracked.log_artifact(output_dir / "config.yaml")


def _train(stages: Stages, tracked, check: RerunCheck, output_dir: Path, resuming: bool,
           trial: TrialReporter | None = None, clock: StageClock | None = None):
    """Load, adapt and train inside the strategy's scope; `(adapted, data, TrainResult)` on the chief.

    Under multi-worker training the model is rebuilt outside the scope with the trained
    weights (`local_copy`), since evaluation and export are not multi-worker safe. Returns
    None on the other workers. A `trial` hears each epoch's metrics after MLflow does, and
    stops training with `TrialPruned` when its study's pruner says so.
    """
    trainer = stages.train
    clock = clock or StageClock()
    with trainer.distribute():
        with clock("data"):
            data = stages.data.load()
        log.info("data: %s examples, classes %s", data.num_examples, list(data.class_names))
        stages.export.check_input(data.input_kind)  # a format that cannot hold it: before training
        tracked.set_tags(check.compare({"data.fingerprint": data.fingerprint}))
        if data.skipped_files:
            tracked.log_skipped_files(data.skipped_files)
        with clock("source"):
            adapted = _adapt(stages, data, tracked, check)
        checkpoints = output_dir / "checkpoints"
        on_epoch_end = trial.after(tracked.log_epoch) if trial else tracked.log_epoch
        with clock("head_epochs"):
            result = trainer.fit(adapted, data, on_epoch_end=on_epoch_end, checkpoint_dir=checkpoints,
                                 resume=checkpoints if resuming else None)
        clock.move("backbone_pass", "head_epochs", result.backbone_seconds)
        log.info("trained weights sha256: %s", result.weights_sha256)
        tracked.set_tags({"weights_sha256": result.weights_sha256, "feature_cache": result.feature_cache})
        weights = [v.numpy() for v in adapted.model.weights] if trainer.copies_to_evaluate else None
    if not trainer.is_chief:
        return None
    if weights is not None:
        with clock("source"):
            adapted = local_copy(lambda: _adapt(stages, data, tracked, check), weights)
        # The copy is evaluated on the images themselves, and exported through its own trace.
        result = replace(result, features=None, backbone_function=None)
    return adapted, data, result


def local_copy(build: Callable[[], Any], weights: list[Any]) -> Any:
    """A model built outside any strategy's scope, holding `weights` (in `model.weights` order)."""
    adapted = build()
    adapted.model.set_weights(weights)
    return adapted


def _adapt(stages: Stages, data, tracked, check: RerunCheck):
    """The source, loaded and fingerprinted, under the new head with its freeze applied."""
    from pipeline.adapt import adapt
    from pipeline.features import backbone_fingerprint

    source = stages.source.load()
    log.info("source: %s, features %s", source.description, source.feature_shape)
    tracked.set_tags(check.compare({"source.fingerprint": backbone_fingerprint(source.backbone)}))
    return adapt(source, head=stages.head, freeze=stages.freeze, class_names=data.class_names,
                 input_shape=data.input_shape, task=data.task, resizable=data.resizable, input_kind=data.input_kind)


def _record(tracked, output_dir: Path, metrics: dict[str, float], evaluation, exported, step: int) -> str | None:
    """Final metrics (after the per-epoch points), metrics.json, artifacts and the MLflow model."""
    tracked.log_metrics(metrics, step=step)
    metrics_file = output_dir / "metrics.json"
    metrics_file.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    tracked.log_artifact(metrics_file)
    for path in evaluation.artifacts:
        tracked.log_artifact(path, "evaluation")
    if exported.paths:  # export=none writes nothing
        tracked.log_artifact(exported.root, "export")
    return tracked.log_model(exported.root) if "saved_model" in exported.paths else None


def _write_run_files(output_dir: Path, resolved: dict[str, Any], tracked) -> None:
    """The resolved config (also an artifact) and the run's id, for `resume=<run dir>`."""
    config_file = output_dir / "config.yaml"
    config_file.write_text(OmegaConf.to_yaml(_without_hydra(resolved)))
    if tracked.run_id:  # first: a run stopped by a refused artifact write stays resumable
        (output_dir / RUN_FILE).write_text(
            json.dumps({"run_id": tracked.run_id, "tracking_uri": tracked.tracking_uri}) + "\n"
        )
    tracked.log_artifact(config_file)


@contextmanager
def _machine_faults(places: Mapping[str, Path], again: str) -> Iterator[None]:
    """A full disk or a refused permission, anywhere in the run, as one `RunStopped` line that
    names the path, the config key that put it there, and the fix.

    The MLflow run (inside) has seen the OSError itself and ended KILLED, not FAILED.
    """
    try:
        yield
    except PipelineError:
        raise  # already says what to do, in the words of the stage that knows
    except Exception as error:
        fault = write_fault(error)
        if fault is None:
            raise
        what = describe_write_fault(fault)
        if is_disk_full(fault):
            raise RunStopped(f"{what}; free space and {again}") from error
        path = Path(fault.filename).absolute() if fault.filename else None
        key = next((k for k, place in places.items() if path and path.is_relative_to(place)), None)
        chosen_by = f" (under {key}={str(places[key])!r})" if key else ""
        folder = f" (chmod u+rwX {path if path.is_dir() else path.parent})" if path else ""
        raise RunStopped(f"{what}{chosen_by}: let this user read and write there{folder}, then {again}") \
            from error


def _places(resolved: dict[str, Any], output_dir: Path) -> dict[str, Path]:
    """The config keys that choose where a run writes files, and the folders they name.

    (The tracking database reports its own refusals, as TrackingError naming tracking.uri.)
    """
    tracking, train = resolved.get("tracking") or {}, resolved.get("train") or {}
    places = {"output_dir": output_dir, "tracking.artifact_location": tracking.get("artifact_location"),
              "train.feature_cache_dir": train.get("feature_cache_dir")}
    return {key: Path(str(place)).absolute() for key, place in places.items() if place}


def _again(cfg: DictConfig, output_dir: Path) -> str:
    """How a run stopped from outside continues: the same command, unless resuming is off."""
    if cfg.get("resume") in (None, "never"):
        return f"continue it with resume={output_dir}"
    return "run the same command again: it resumes this run"


def _job_overrides() -> dict[str, str]:
    """This job's own overrides (in a sweep, what sets it apart from the other jobs)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return {"overrides": " ".join(HydraConfig.get().overrides.task)}
    except ValueError:  # not started by Hydra (pipeline.rerun)
        return {}


@contextmanager
def _sigterm_as_interrupt() -> Iterator[Callable[[], None]]:
    """SIGTERM (preemption, `kill`) ends the run as KILLED, like Ctrl-C, not as a crash.

    Yields `stop_if_signalled`, for the stage boundaries: Python drops an exception raised
    while a `__del__` runs (TensorFlow objects are collected all through an export), so a
    signal that arrives then would be lost; the boundary after it stops the run instead.
    """
    import signal
    import threading

    received: list[int] = []

    def stop_if_signalled() -> None:
        if received:
            raise KeyboardInterrupt("SIGTERM")

    if threading.current_thread() is not threading.main_thread():
        yield stop_if_signalled
        return

    def interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield stop_if_signalled
    finally:
        signal.signal(signal.SIGTERM, previous)


def _finished_in_sweep(cfg: DictConfig, tracking: Any, identity: str) -> dict[str, float] | None:
    """A sweep run again (the same `-m` command after a kill): this job's metrics when its run
    FINISHED in that sweep already, so it is not run again; None otherwise (`resume=never`,
    outside a sweep, or not finished: then `resume=auto` continues a killed run as usual)."""
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent is None or cfg.get("resume") != "auto":
        return None
    found = tracking.finished_child(parent, identity)
    if found is None:
        return None
    run_id, metrics = found
    log.info("this job's run %s FINISHED in this sweep already: its results are reused, not run "
             "again (resume=never runs it anew)", run_id)
    return metrics


def _trial(cfg: DictConfig) -> TrialReporter | None:
    """This job's Optuna trial, reached through the study's storage, with the sweep's pruner
    (`hydra.sweeper.pruner`); None when the job is not a trial."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    address = TrialAddress.from_env()
    if address is None:
        return None
    pruner = HydraConfig.get().sweeper.get("pruner") if HydraConfig.initialized() else None
    return TrialReporter.open(address, cfg.get("optimized_metric"), instantiate(pruner) if pruner else None)


@contextmanager
def _trial_state(tracked, trial: TrialReporter | None) -> Iterator[None]:
    """Tags a trial's MLflow run with how the trial ended: `trial_state` COMPLETE, PRUNED or FAIL.

    A pruned trial skips evaluation and export; its run records the epochs it completed and
    ends FINISHED (the tracker lets `TrialPruned` through as a normal end), so `resume=auto`
    never takes it for a killed run.
    """
    if trial is None:
        yield
        return
    try:
        yield
    except TrialPruned as pruned:
        tracked.log_metrics({"epochs_completed": float(pruned.epochs_completed)}, step=pruned.epochs_completed)
        tracked.set_tags({TRIAL_STATE: "PRUNED"})
        raise
    except BaseException:
        try:
            tracked.set_tags({TRIAL_STATE: "FAIL"})
        except Exception as error:  # the error that ended the run is the one to report
            log.warning("could not tag the failed trial's run %s: %s", tracked.run_id, error)
        raise
    tracked.set_tags({TRIAL_STATE: "COMPLETE"})


def _params(resolved: dict[str, Any]) -> dict[str, Any]:
    """What a training run logs as MLflow params: its config less Hydra's and `extract`'s keys."""
    return {k: v for k, v in _without_hydra(resolved).items() if k != "extract"}


def _without_hydra(resolved: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resolved.items() if k != "hydra"}


def _print_summary(metrics: dict[str, float], exported, tracked, model_uri: str | None,
                   clock: StageClock | None = None) -> None:
    headline = re.compile(r"test_(accuracy|loss|top_\d+_accuracy|macro_f1|roc_auc)")
    shown = {k: v for k, v in sorted(metrics.items()) if headline.fullmatch(k)}
    lines = [
        "",
        "Test metrics: " + "  ".join(f"{k.removeprefix('test_')} {v:.4f}" for k, v in shown.items()),
        f"Export:       {exported.root if exported.paths else 'none (export=none)'}",
        f"MLflow run:   {tracked.run_id} (experiment '{tracked.experiment}')",
    ]
    if model_uri:
        lines.append(f"MLflow model: {model_uri}")
    lines.append(f"Look at it:   {tracked.ui_command}")
    if clock is not None:
        lines.append(f"Seconds:      {clock.line()} (MLflow metrics seconds_*)")
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns `cfg.optimized_metric`'s value for sweepers.

    In a multirun a failing job raises into Hydra, which keeps the error in the job's
    result and runs the other jobs; its MLflow run is FAILED with the traceback (KILLED when
    stopped from outside: a signal, the disk, the store), and the sweep's report lists it.
    A trial that an Optuna sweep's pruner stopped raises `TrialPruned` the same way, for the
    sweeper to tell the study; its run is FINISHED. A single run ends a user's error (and Ctrl-C) with one
    `error:` line and exit status 2, and removes Hydra's run directory if it stayed empty.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    wrote_to: list[tuple[Path, bool]] = []
    try:
        metrics = run(cfg, on_run_dir=lambda path, resumed: wrote_to.append((path, resumed)),
                      startup=None if multirun else since_process_start())
    except PipelineError as error:
        log.error("%s", error)
        if multirun:
            raise
        _exit_with(str(error))
    except KeyboardInterrupt as error:
        if multirun:
            raise
        output_dir = wrote_to[0][0] if wrote_to else Path(cfg.output_dir)
        message = f"interrupted ({str(error) or 'Ctrl-C'}); {_again(cfg, output_dir)}"
        log.error("%s", message)
        _exit_with(message)
    except Exception as error:  # a refused write before the run's own checks (run() names the rest)
        fault = write_fault(error)
        if multirun or fault is None:
            raise
        message = (f"{describe_write_fault(fault)}: let this user read and write there, then run the "
                   "same command again")
        log.error("%s", message)
        _exit_with(message)
    finally:
        if not multirun:
            own = [name for name in (hydra_cfg.output_subdir, f"{hydra_cfg.job.name}.log") if name]
            run_dir, resumed = wrote_to[0] if wrote_to else (None, False)
            tidy_run_dir(Path(hydra_cfg.runtime.output_dir), own, run_dir, resumed)
    key = cfg.get("optimized_metric")
    if key is None or not metrics:  # no objective, or a non-chief worker
        return None
    if key not in metrics:
        raise ConfigError(
            f"optimized_metric={key!r} is not a metric of this run; available: "
            f"{', '.join(sorted(metrics))}"
        )
    return metrics[key]


def _exit_with(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def main() -> NoReturn:
    """Console entry point (`python -m pipeline`, `pipeline`): runs, then ends the process
    without the interpreter's teardown of TensorFlow (`pipeline.quick_exit`, 2-3.5 s)."""
    from pipeline.quick_exit import exit_after

    exit_after(_main)


def _main() -> None:
    # TensorFlow's C++ start-up chatter hides the run's own log; TF_CPP_MIN_LOG_LEVEL=0 shows it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Hydra prints its own errors (a misspelled key, a bad override) over several lines and
    # exits 1; with HYDRA_FULL_ERROR they reach us instead, and a user's mistake becomes one
    # line. Set by the user, it keeps every traceback, as Hydra documents.
    tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except KeyboardInterrupt:  # before the run started, or a multirun's job
        if tracebacks:
            raise
        _exit_with("interrupted; run the same command again: killed runs resume where they stopped")
    except Exception as error:
        message = None if tracebacks or _raised_in_a_job(error) else start_error(error)
        if message is None:
            raise  # a multirun's failed job (its report is printed on exit), or a bug of ours
        _exit_with(message)


def _raised_in_a_job(error: BaseException) -> bool:
    """Whether `error` came out of `_hydra_main` itself (a job), not Hydra's set-up around it."""
    import traceback

    return any(frame.name == "_hydra_main" and frame.filename == __file__
               for frame in traceback.extract_tb(error.__traceback__))

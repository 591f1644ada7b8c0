"""`python -m pipeline [overrides]`: compose the config, check it, run the five stages.

The runner is the only code that reads the config. It builds each stage from its group
with `hydra.utils.instantiate`, passes runtime facts (the classes the data holds) at the
call site, and hands the stages' small typed results from one to the next.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipeline import config, provenance
from pipeline.errors import ConfigError, PipelineError
from pipeline.sweep import PARENT_RUN_ENV

log = logging.getLogger("pipeline")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(PROJECT_ROOT / "conf")
RUN_FILE = "mlflow_run.json"


def run(cfg: DictConfig, rerun_of: tuple[str, Mapping[str, str]] | None = None) -> dict[str, float]:
    """Run one experiment from a composed config; returns the final metrics.

    Args:
        rerun_of: `(run_id, tags)` of the run this one repeats (`python -m pipeline.rerun`);
            every recorded fact that differs now is logged as a warning.
    """
    resolved = config.validate(cfg)  # before TensorFlow is imported
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    stages = _build_stages(cfg)
    trainer, tracker = stages["train"], stages["tracking"]
    identity = provenance.config_fingerprint(resolved)
    tags = {**provenance.environment_tags(), "config_sha256": identity, **_job_overrides()}
    if rerun_of is not None:
        tags["rerun_of"] = rerun_of[0]
        _warn_differences(rerun_of[1], tags)
    resume_setting = cfg.get("resume")
    if resume_setting == "auto" and cfg.train.strategy == "multi_worker":
        # Workers must agree on resuming and only the chief may ask the store: name the
        # run explicitly (resume=<run dir on shared storage>) to resume multi-worker runs.
        resume_setting = None
    resume = _resume_target(resume_setting, tracker, identity)
    output_dir = resume.run_dir if resume else Path(cfg.output_dir)
    params = config.flatten(_without_hydra(resolved))

    with _sigterm_as_interrupt(), tracker.run(
        params,
        tags,
        record=_is_chief(cfg),
        resume_run_id=resume.run_id if resume else None,
        parent_run_id=os.environ.get(PARENT_RUN_ENV),
    ) as tracked:
        output_dir.mkdir(parents=True, exist_ok=True)
        tracked.set_tags({"run_dir": str(output_dir.resolve())})
        if not resume:
            _write_run_files(output_dir, resolved, tracked)

        from pipeline.adapt import adapt
        from pipeline.features import backbone_fingerprint

        def build(data):
            source = stages["source"].load()
            log.info("source: %s, features %s", source.description, source.feature_shape)
            fingerprint = {"source.fingerprint": backbone_fingerprint(source.backbone)}
            tracked.set_tags(fingerprint)
            if rerun_of is not None:
                _warn_differences(rerun_of[1], fingerprint)
            return adapt(
                source,
                head=stages["head"],
                freeze=stages["freeze"],
                class_names=data.class_names,
                input_shape=data.input_shape,
                task=data.task,
            )

        with trainer.distribute():
            data = stages["data"].load()
            log.info("data: %s examples, classes %s", data.num_examples, list(data.class_names))
            tracked.set_tags({"data.fingerprint": data.fingerprint})
            if rerun_of is not None:
                _warn_differences(rerun_of[1], {"data.fingerprint": data.fingerprint})
            if data.skipped_files:
                tracked.log_skipped_files(data.skipped_files)
            adapted = build(data)
            trained = trainer.fit(
                adapted,
                data,
                on_epoch_end=tracked.log_epoch,
                checkpoint_dir=output_dir / "checkpoints",
                resume=output_dir / "checkpoints" if resume else None,
            )
            log.info("trained weights sha256: %s", trained.weights_sha256)
            tracked.set_tags({"weights_sha256": trained.weights_sha256, "feature_cache": trained.feature_cache})
            weights = [v.numpy() for v in adapted.model.weights] if trainer.copies_to_evaluate else None
        if not trainer.is_chief:
            return {}  # non-chief workers train; the chief evaluates, exports and logs
        if weights is not None:
            adapted = build(data)
            adapted.model.set_weights(weights)

        evaluation = stages["evaluate"].evaluate(adapted, data, output_dir / "evaluation", trained.history,
                                                 features=None if weights is not None else trained.features)
        metrics = {**evaluation.metrics, "epochs_completed": float(trained.epochs_completed)}
        exported = stages["export"].export(adapted, data, output_dir / "export")
        metrics.update(exported.metrics)

        # After the per-epoch points, so a metric's latest value is the final model's.
        tracked.log_metrics(metrics, step=trained.epochs_completed)
        metrics_file = output_dir / "metrics.json"
        metrics_file.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        tracked.log_artifact(metrics_file)
        for path in evaluation.artifacts:
            tracked.log_artifact(path, "evaluation")
        if exported.paths:  # export=none writes nothing
            tracked.log_artifact(exported.root, "export")
        model_uri = tracked.log_model(exported.root) if "saved_model" in exported.paths else None
    _print_summary(metrics, exported, tracked, model_uri)
    return metrics


def _write_run_files(output_dir: Path, resolved: dict[str, Any], tracked) -> None:
    """The resolved config (also an artifact) and the run's id, for `resume=<run dir>`."""
    config_file = output_dir / "config.yaml"
    config_file.write_text(OmegaConf.to_yaml(_without_hydra(resolved)))
    tracked.log_artifact(config_file)
    if tracked.run_id:
        (output_dir / RUN_FILE).write_text(
            json.dumps({"run_id": tracked.run_id, "tracking_uri": tracked.tracking_uri}) + "\n"
        )


@dataclass(frozen=True)
class _ResumeTarget:
    run_id: str
    run_dir: Path


def _resume_target(value: str | None, tracker, identity: str) -> _ResumeTarget | None:
    """The run to continue: `auto` finds this config's killed run; or a run dir / run id."""
    if value in (None, "never"):
        return None
    if value == "auto":
        found = tracker.find_resumable(identity)
        if found is None:
            return None
        run_id, run_dir = found
        if not (Path(run_dir) / "checkpoints" / "state.json").exists():
            return None
        log.info("resuming run %s (killed before it finished) in %s", run_id, run_dir)
        return _ResumeTarget(run_id, Path(run_dir))
    if Path(value).is_dir():
        run_file = Path(value) / RUN_FILE
        if not run_file.exists():
            raise ConfigError(f"resume={value!r}: the directory has no {RUN_FILE}; is it a run directory?")
        run_id, run_dir = json.loads(run_file.read_text())["run_id"], Path(value)
    else:
        from pipeline.tracking import run_directory

        run_id, run_dir = value, run_directory(tracker.uri, value)
    if not (run_dir / "checkpoints" / "state.json").exists():
        raise ConfigError(
            f"resume={value!r}: {run_dir / 'checkpoints'} holds no checkpoint to continue from "
            "(was the run trained with train.checkpoint=true?)"
        )
    return _ResumeTarget(run_id, run_dir)


def _job_overrides() -> dict[str, str]:
    """This job's own overrides (in a sweep, what sets it apart from the other jobs)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return {"overrides": " ".join(HydraConfig.get().overrides.task)}
    except ValueError:  # not started by Hydra (pipeline.rerun)
        return {}


def _warn_differences(original: Mapping[str, str], current: Mapping[str, str]) -> None:
    for difference in provenance.differences(original, current):
        log.warning("rerun: %s", difference)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (preemption, `kill`) ends the run as KILLED, like Ctrl-C, not as a crash."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_chief(cfg: DictConfig) -> bool:
    from pipeline.distribute import is_chief

    return is_chief(cfg.train.strategy)


def _build_stages(cfg: DictConfig) -> dict[str, Any]:
    stages = {}
    for group in ("source", "data", "freeze", "head", "train", "evaluate", "export", "tracking"):
        try:
            stages[group] = instantiate(cfg[group])
        except PipelineError:
            raise
        except Exception as error:
            cause = error.__cause__ or error
            if isinstance(cause, PipelineError):  # a nested node's own, already clear, error
                raise cause from None
            raise ConfigError(
                f"{group}: could not build {cfg[group].get('_target_')} from the config "
                f"({type(cause).__name__}: {cause}). Check the keys of conf/{group}/ "
                "against the target's arguments."
            ) from error
    return stages


def _without_hydra(resolved: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resolved.items() if k != "hydra"}


def _print_summary(metrics: dict[str, float], exported, tracked, model_uri: str | None) -> None:
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
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns `cfg.optimized_metric`'s value for sweepers.

    In a multirun a failing job raises into Hydra, which keeps the error in the job's
    result and runs the other jobs; its MLflow run is FAILED with the traceback, and the
    sweep's report lists it.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        metrics = run(cfg)
    except PipelineError as error:
        log.error("%s", error)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    key = cfg.get("optimized_metric")
    if key is None or not metrics:  # no objective, or a non-chief worker
        return None
    if key not in metrics:
        raise ConfigError(
            f"optimized_metric={key!r} is not a metric of this run; available: "
            f"{', '.join(sorted(metrics))}"
        )
    return metrics[key]


def main() -> None:
    """Console entry point (`python -m pipeline`, `pipeline`)."""
    # TensorFlow's C++ start-up chatter hides the run's own log; TF_CPP_MIN_LOG_LEVEL=0 shows it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _hydra_main()

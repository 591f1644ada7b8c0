"""`python -m pipeline [overrides]`: compose the config, check it, run the five stages.

The runner is the only code that reads the config. It builds each stage from its group
with `hydra.utils.instantiate`, passes runtime facts (the classes the data holds) at the
call site, and hands the stages' small typed results from one to the next.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipeline import config
from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger("pipeline")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(PROJECT_ROOT / "conf")


def run(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment from a composed config; returns the final metrics."""
    resolved = config.validate(cfg)  # before TensorFlow is imported
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    output_dir = Path(cfg.output_dir)
    stages = _build_stages(cfg)
    trainer = stages["train"]
    params = config.flatten(_without_hydra(resolved))

    with stages["tracking"].run(params, _tags(), record=_is_chief(cfg)) as tracked:
        output_dir.mkdir(parents=True, exist_ok=True)
        tracked.set_tags({"run_dir": str(output_dir.resolve())})
        config_file = output_dir / "config.yaml"
        config_file.write_text(OmegaConf.to_yaml(_without_hydra(resolved)))
        tracked.log_artifact(config_file)

        from pipeline.adapt import adapt

        def build(data):
            source = stages["source"].load()
            log.info("source: %s, features %s", source.description, source.feature_shape)
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
            if data.skipped_files:
                tracked.log_skipped_files(data.skipped_files)
            adapted = build(data)
            trained = trainer.fit(
                adapted, data, on_epoch_end=tracked.log_epoch, checkpoint_dir=output_dir / "checkpoints"
            )
            log.info("trained weights sha256: %s", trained.weights_sha256)
            tracked.set_tags({"weights_sha256": trained.weights_sha256, "feature_cache": trained.feature_cache})
            weights = [v.numpy() for v in adapted.model.weights] if trainer.copies_to_evaluate else None
        if not trainer.is_chief:
            return {}  # non-chief workers train; the chief evaluates, exports and logs
        if weights is not None:
            adapted = build(data)
            adapted.model.set_weights(weights)

        metrics = stages["evaluate"].evaluate(adapted, data)
        metrics["epochs_completed"] = float(trained.epochs_completed)
        exported = stages["export"].export(adapted, data, output_dir / "export")
        metrics.update({f"export_{k}_max_abs_diff": v for k, v in exported.max_abs_diff.items()})

        # After the per-epoch points, so a metric's latest value is the final model's.
        tracked.log_metrics(metrics, step=trained.epochs_completed)
        metrics_file = output_dir / "metrics.json"
        metrics_file.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        tracked.log_artifact(metrics_file)
        tracked.log_artifact(exported.root, "export")
    _print_summary(metrics, exported, tracked)
    return metrics


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


def _tags() -> dict[str, str]:
    tags = {
        "command": shlex.join(["python", "-m", "pipeline", *sys.argv[1:]]),
        "mlflow.source.name": "pipeline",
    }
    for package in ("tensorflow", "keras", "tensorflow-hub", "tf-keras", "mlflow", "hydra-core"):
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[f"version.{package}"] = "not installed"
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    return tags


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _print_summary(metrics: dict[str, float], exported, tracked) -> None:
    shown = {k: v for k, v in sorted(metrics.items()) if k.startswith("test_")}
    lines = [
        "",
        "Test metrics: " + "  ".join(f"{k.removeprefix('test_')} {v:.4f}" for k, v in shown.items()),
        f"Export:       {exported.root}",
        f"MLflow run:   {tracked.run_id} (experiment '{tracked.experiment}')",
        f"Look at it:   {tracked.ui_command}",
    ]
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns `cfg.optimized_metric`'s value for sweepers."""
    try:
        metrics = run(cfg)
    except PipelineError as error:
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    key = cfg.get("optimized_metric")
    if key is None:
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
    _hydra_main()

"""`python -m pipeline.rerun RUN_ID`: run an earlier MLflow run again, from its own record.

The run's resolved config (its `config.yaml` artifact) is rebuilt and run into a new run
directory, as a new MLflow run tagged `rerun_of`. Every fact the original recorded (data
and source fingerprints, git commit and dirty flag, package versions) is compared with
now, and each difference is logged as a warning. With `train.deterministic=true` on the
same CPU, the rerun's metrics equal the original's exactly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

from pipeline.errors import ConfigError

log = logging.getLogger("pipeline")


def rerun(
    run_id: str, tracking_uri: str, output_dir: Path | None = None, allow_unsafe: bool = False
) -> dict[str, float]:
    """Run `run_id` again; returns the new run's metrics.

    The stored config is data from the store: `pipeline.replay.check_replay` refuses targets,
    resolvers and code-running settings before anything is built from it, and the
    SavedModels it names are checked before they are loaded (`graph_check.config_from_store`),
    unless `allow_unsafe` (the user's `--allow-unsafe`).
    """
    import yaml
    from omegaconf import OmegaConf

    from pipeline import runner, tracking
    from pipeline.replay import check_replay
    from pipeline.sources.graph_check import config_from_store

    record = tracking.run_record(tracking_uri, run_id)
    where = f"run {run_id}'s stored config.yaml"
    try:
        raw = yaml.safe_load(record.config_yaml)  # plain data first: nothing resolved or built
    except yaml.YAMLError as error:
        raise ConfigError(f"{where} is not valid YAML ({error}); the run cannot be replayed.") from None
    check_replay(raw, allow_unsafe=allow_unsafe, where=where)
    cfg = OmegaConf.create(raw)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    cfg.output_dir = str(output_dir or Path("outputs") / "runs" / f"{stamp}-rerun-{run_id[:8]}")
    cfg.resume = "never"
    cfg.tracking.uri = tracking_uri
    with nullcontext() if allow_unsafe else config_from_store():
        return runner.run(cfg, rerun_of=(run_id, record.tags))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.rerun", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_id", help="the MLflow run id to run again")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        help="the store holding the run (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    parser.add_argument("--output-dir", type=Path, help="the new run's directory")
    parser.add_argument(
        "--allow-unsafe", action="store_true",
        help="let the stored config load model files that run Python code (allow_unsafe, safe_mode=false)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from pipeline.errors import PipelineError

    try:
        rerun(args.run_id, args.tracking_uri, args.output_dir, args.allow_unsafe)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("error: interrupted; the new run is KILLED, and `python -m pipeline resume=<its run dir>` "
              "continues it", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    from pipeline.quick_exit import exit_after

    exit_after(main)

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
from datetime import datetime
from pathlib import Path

log = logging.getLogger("pipeline")


def rerun(run_id: str, tracking_uri: str, output_dir: Path | None = None) -> dict[str, float]:
    """Run `run_id` again; returns the new run's metrics."""
    from omegaconf import OmegaConf

    from pipeline import runner, tracking

    record = tracking.run_record(tracking_uri, run_id)
    cfg = OmegaConf.create(record.config_yaml)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    cfg.output_dir = str(output_dir or Path("outputs") / "runs" / f"{stamp}-rerun-{run_id[:8]}")
    cfg.resume = "never"
    cfg.tracking.uri = tracking_uri
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
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from pipeline.errors import PipelineError

    try:
        rerun(args.run_id, args.tracking_uri, args.output_dir)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

"""A sweep's parent run, closed with what its jobs did."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class SweepReport:
    """What a sweep did: its jobs, the failed ones (job number, overrides, error), the best value."""

    parent_run_id: str
    experiment: str
    jobs: int
    failed: list[tuple[str, str, str]]
    best: tuple[str, float] | None = None

    def text(self) -> str:
        lines = [f"Sweep: {self.jobs} job(s) under parent run {self.parent_run_id} "
                 f"(experiment '{self.experiment}'), {len(self.failed)} failed"]
        if self.best:
            lines.append(f"Best {self.best[0]}: {self.best[1]:.4f}")
        for job, overrides, error in self.failed:
            lines.append(f"  FAILED job #{job}: {overrides}\n    {error}")
        return "\n".join(lines)


def close_sweep(
    client: Any, run_id: str, experiment: str, objective: str | None, jobs: Sequence[Mapping[str, Any]]
) -> SweepReport:
    """Log the sweep's numbers on its parent run `run_id` and finish it.

    `jobs` are the outcomes the jobs wrote to `jobs.jsonl` (also of jobs that failed before
    opening a run); the best `objective` is taken from the parent's child runs. The parent
    ends FAILED if any job failed, FINISHED otherwise.
    """
    parent = client.get_run(run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    failed = [(str(j["job"]), j["overrides"], j["error"]) for j in jobs if j["status"] == "FAILED"]
    report = SweepReport(run_id, experiment, max(len(jobs), len(children)), failed)
    metrics = {"jobs": float(report.jobs), "failed_jobs": float(len(failed))}
    values = [c.data.metrics[objective] for c in children if objective and objective in c.data.metrics]
    if values:
        metrics[f"best_{objective}"] = max(values)
        report.best = (objective, max(values))
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
    return report

"""A sweep's parent run, closed with what its jobs did."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SweepReport:
    """What a sweep did: its jobs, the failed ones (job number, overrides, error), the trials a
    pruner stopped (job number, overrides, when), the best value."""

    parent_run_id: str
    experiment: str
    jobs: int
    failed: list[tuple[str, str, str]]
    best: tuple[str, float] | None = None
    pruned: list[tuple[str, str, str]] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"Sweep: {self.jobs} job(s) under parent run {self.parent_run_id} "
                 f"(experiment '{self.experiment}'), {len(self.failed)} failed"
                 + (f", {len(self.pruned)} pruned" if self.pruned else "")]
        if self.best:
            lines.append(f"Best {self.best[0]}: {self.best[1]:.4f}")
        for job, overrides, error in self.failed:
            lines.append(f"  FAILED job #{job}: {overrides}\n    {error}")
        for job, overrides, reason in self.pruned:
            lines.append(f"  PRUNED job #{job}: {overrides}\n    {reason}")
        return "\n".join(lines)


def close_sweep(
    client: Any, run_id: str, experiment: str, objective: str | None, jobs: Sequence[Mapping[str, Any]],
    interrupted: bool = False, minimize: bool = False,
) -> SweepReport:
    """Log the sweep's numbers on its parent run `run_id` and finish it.

    `minimize`: the best `objective` is the smallest (a loss), not the largest.

    `jobs` are the outcomes the jobs wrote to `jobs.jsonl` (also of jobs that failed before
    opening a run); the best `objective` is taken from the parent's child runs, less the
    trials a pruner stopped (their last epoch's value is not a result). The parent ends
    FAILED if any job failed, KILLED if the sweep was `interrupted` before its last job,
    FINISHED otherwise (pruned trials are not failures).
    """
    parent = client.get_run(run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    failed = [(str(j["job"]), j["overrides"], j["error"]) for j in jobs if j["status"] == "FAILED"]
    pruned = [(str(j["job"]), j["overrides"], j["error"].removeprefix("TrialPruned: "))
              for j in jobs if j["status"] == "PRUNED"]
    report = SweepReport(run_id, experiment, max(len(jobs), len(children)), failed, pruned=pruned)
    metrics = {"jobs": float(report.jobs), "failed_jobs": float(len(failed))}
    if pruned:
        metrics["pruned_jobs"] = float(len(pruned))
    results = [c for c in children if c.data.tags.get("trial_state") != "PRUNED"]
    values = [c.data.metrics[objective] for c in results if objective and objective in c.data.metrics]
    if values:
        best = min(values) if minimize else max(values)
        metrics[f"best_{objective}"] = best
        report.best = (objective, best)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id, status="FAILED" if failed else "KILLED" if interrupted else "FINISHED")
    return report

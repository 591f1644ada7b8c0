"""A sweep killed mid-way continues when its command runs again (issue 16 item 3).

The first call is SIGKILLed (the whole process group: launcher and job) once job 0 has
finished and job 1 has written its first checkpoint. The same command then continues the
sweep: the same parent run, job 0 not run again, job 1 resumed in its own MLflow run from
its checkpoint, job 2 run, and for Optuna a study of `n_trials` counted trials in all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from cli import client, pipeline_command, run_pipeline, runs
from conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow
EPOCHS = 12  # job 1 is killed after its first epoch: eleven more leave a window of seconds

SWEEPS = {
    # Three jobs from the command line's list, through the basic sweeper.
    "basic": ["seed=0,1,2"],
    # Three trials of the Optuna overlay, without its pruner (three trials prune nothing).
    "optuna": ["hparams_search=digits_optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.pruner=null"],
}


def _kill_when(process: subprocess.Popen, ready, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the sweep ended (status {process.returncode}) before the kill point:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("the kill point was not reached in time")
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and its job, as a node failure would
    process.wait()


def _children(tmp_path, parent_id):
    return {r.info.run_id: r for r in runs(tmp_path)
            if r.data.tags.get("mlflow.parentRunId") == parent_id}


@pytest.mark.parametrize("sweeper", sorted(SWEEPS))
def test_the_same_command_continues_a_killed_sweep(tmp_path, sweeper):
    overrides = [
        "-m", *SWEEPS[sweeper], "optimized_metric=val_accuracy", f"train.epochs={EPOCHS}",
        "train.feature_cache=false",  # every epoch trains the whole model, so each is checkpointed
        "data.classes=[5,6]",
        *([f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}"] if sweeper == "optuna" else []),
    ]
    first = subprocess.Popen(
        pipeline_command(tmp_path, *overrides, f"hydra.sweep.dir={tmp_path / 'first'}"), cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    _kill_when(first, lambda: (tmp_path / "first/0/metrics.json").is_file()
               and (tmp_path / "first/1/checkpoints/state.json").is_file())

    (parent,) = [r for r in runs(tmp_path) if r.data.tags.get("sweep") == "true"]
    assert parent.info.status == "RUNNING"  # killed: nobody closed it
    before = _children(tmp_path, parent.info.run_id)
    (done,) = [r for r in before.values() if r.info.status == "FINISHED"]
    (killed,) = [r for r in before.values() if r.info.status == "RUNNING"]

    # The same command again (its output goes to a new folder, as Hydra's timestamped default does).
    again = run_pipeline(tmp_path, *overrides, f"hydra.sweep.dir={tmp_path / 'second'}", timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    parents = [r for r in runs(tmp_path) if r.data.tags.get("sweep") == "true"]
    assert [p.info.run_id for p in parents] == [parent.info.run_id]  # the same parent, now finished
    assert parents[0].info.status == "FINISHED" and parents[0].data.metrics["failed_jobs"] == 0
    after = _children(tmp_path, parent.info.run_id)
    assert len(after) == 3 and all(r.info.status == "FINISHED" for r in after.values())
    # Job 0 was not run again: its run is untouched.
    assert after[done.info.run_id].info.end_time == done.info.end_time
    # Job 1 continued its own run from its checkpoint: every epoch logged once.
    history = client(tmp_path).get_metric_history(killed.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(EPOCHS))
    assert killed.info.run_id in after
    if sweeper == "optuna":
        import optuna

        study = optuna.load_study(study_name="digits-transfer", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
        states = [t.state.name for t in study.trials]
        # Trial 1 died with its sweep: failed, and its values run again (resuming its MLflow run).
        assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1, states
        (failed,) = [t for t in study.trials if t.state.name == "FAIL"]
        (repeat,) = [t for t in study.trials if t.user_attrs.get("requeued_from") == failed.number]
        assert repeat.params == failed.params and repeat.state.name == "COMPLETE"
    else:  # the basic sweeper ran job 0 again, which found its finished run and returned its value
        reused = (tmp_path / "second/0/pipeline.log").read_text()
        assert f"run {done.info.run_id} FINISHED in this sweep already" in reused

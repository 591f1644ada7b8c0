"""Sweeps beyond the basic launcher: Submitit (SLURM minus sbatch) and Ray, each job a process."""

from __future__ import annotations

import pytest

from cli import run_pipeline, runs

pytestmark = pytest.mark.slow


def _parent_and_children(tmp_path):
    everything = runs(tmp_path)
    parents = [r for r in everything if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 1, [r.data.tags for r in everything]
    parent = parents[0]
    children = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def test_submitit_local_runs_each_job_in_a_process_under_one_parent_sharing_the_feature_cache(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='pip install -e ".[slurm]"')
    done = run_pipeline(
        tmp_path, "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        # One job per batch, so that jobs 1 and 2 start after job 0 wrote the cache (a batch's
        # jobs start together, and each computes what is not yet there).
        "hydra.sweeper.max_batch_size=1",
        "freeze=all", "train.epochs=1", "data.classes=[5,6]", "export=none",
        "train.learning_rate=0.01,0.02,0.03",  # not in the cache's key
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children = _parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs"] == 3
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}
    # Each job was a process of its own, started by submitit (not the launching process).
    pids = {c.data.tags["pid"] for c in children}
    assert len(pids) == 3 and parent.data.tags["pid"] not in pids
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))) == 3
    # The first job computed the backbone's features; the others read them back.
    by_rate = sorted(children, key=lambda c: float(c.data.params["train.learning_rate"]))
    assert [c.data.tags["feature_cache"] for c in by_rate] == ["computed", "hit", "hit"]
    assert len([p for p in (tmp_path / "feature_cache").iterdir() if not p.name.startswith(".")]) == 1


@pytest.fixture
def ray_head():
    """The address of a Ray instance started here (2 CPUs), stopped with its processes after the test."""
    ray = pytest.importorskip("ray", reason='ray is not installed; it is an extra: pip install -e ".[ray]"')
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def test_ray_launcher_runs_the_jobs_on_a_running_ray_instance_under_one_parent(tmp_path, ray_head):
    done = run_pipeline(
        tmp_path, "-m", "hydra/launcher=ray", f"hydra.launcher.address={ray_head}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", "freeze=all", "train.epochs=1", "data.classes=[5,6]",
        "export=none", "seed=0,1", "optimized_metric=val_accuracy",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children = _parent_and_children(tmp_path)
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    assert parent.info.status == "FINISHED" and parent.data.metrics["failed_jobs"] == 0
    best = max(c.data.metrics["val_accuracy"] for c in children)
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best)
    # Ray's worker processes: neither the launching process nor one process for both jobs.
    pids = {c.data.tags["pid"] for c in children}
    assert len(pids) == 2 and parent.data.tags["pid"] not in pids
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]

"""train.strategy=multi_worker: two worker processes on loopback ports, CPU only."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start(tmp_path, name: str, env: dict, *overrides: str, store: str = "mlflow.db"):
    """`python -m pipeline` in the background, its output in `<name>.log`."""
    command = [
        sys.executable, "-m", "pipeline",
        f"hydra.run.dir={tmp_path / name}",
        f"tracking.uri=sqlite:///{tmp_path / store}",
        f"tracking.artifact_location={tmp_path / 'mlartifacts'}",
        f"train.feature_cache_dir={tmp_path / 'cache'}",
        "train.epochs=2", "train.verbose=0", "data.classes=[5,6,7]", *overrides,
    ]
    log = open(tmp_path / f"{name}.log", "w")
    env = {**env, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=log), log


def _trained(run_dir):
    import keras

    import pipeline.sources.backbone  # noqa: F401  (registers the custom layers)
    import pipeline.sources.saved_model_layer  # noqa: F401

    return keras.saving.load_model(run_dir / "checkpoints" / "last.keras", compile=False)



def _finished(tmp_path, processes) -> dict[str, str]:
    """Waits for every `_start`ed process; their logs, after asserting that each exited 0."""
    for process, log in processes.values():
        try:
            process.wait(timeout=400)
        finally:
            process.kill()
            log.close()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in processes}
    assert [p.returncode for p, _ in processes.values()] == [0] * len(processes), \
        "\n".join(t[-2000:] for t in logs.values())
    return logs

def test_two_workers_train_like_one_process_on_the_same_global_batch_and_only_the_chief_logs(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = {}
    for index in range(2):
        cluster = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes[f"worker{index}"] = _start(
            tmp_path, f"worker{index}", {**os.environ, "TF_CONFIG": json.dumps(cluster)},
            "train.strategy=multi_worker", "train.batch_size=32",  # per replica: a global batch of 64
        )
    # The reference: one process, the same global batch, at the same time (the workers mostly wait).
    processes["reference"] = _start(tmp_path, "reference", dict(os.environ), "train.batch_size=64", "export=none",
                                    store="reference.db")
    logs = _finished(tmp_path, processes)

    digests = [re.search(r"trained weights sha256: (\w+)", logs[f"worker{i}"]).group(1) for i in range(2)]
    assert digests[0] == digests[1]

    # All-reduce makes the workers agree by construction; what matters is that together they
    # train as one process does on the same batches: the same weights and the same scores.
    model = _trained(tmp_path / "worker0")
    trained = {v.path: v.numpy() for v in model.weights}
    reference = {v.path: v.numpy() for v in _trained(tmp_path / "reference").weights}
    assert trained.keys() == reference.keys()
    for path, value in reference.items():
        np.testing.assert_allclose(trained[path], value, rtol=0, atol=1e-5, err_msg=path)
    metrics = json.loads((tmp_path / "worker0" / "metrics.json").read_text())
    expected = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert expected.keys() == {k for k in metrics if not k.startswith("export_")}  # the reference exports nothing
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-4), name
    # ... and they did train: the backbone moved from the shipped source by far more than that.
    import tensorflow as tf

    from pipeline.config import ASSETS

    source = {v.name: v.numpy() for v in tf.saved_model.load(str(ASSETS / "digits_0to4")).variables}
    backbone = model.get_layer("backbone").get_layer("hub").loaded.variables
    moved = {v.name: np.abs(v.numpy() - source[v.name]).max() for v in backbone if "kernel" in v.name}
    assert len(moved) == 3 and min(moved.values()) > 1e-3, moved

    assert (tmp_path / "worker0" / "export" / "saved_model").is_dir()
    assert not (tmp_path / "worker1" / "export").exists()
    assert not (tmp_path / "worker1" / "metrics.json").exists()
    assert not (tmp_path / "worker1" / "checkpoints").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["weights_sha256"] == digests[0]


def _free_port_pair() -> int:
    """A port p with p and p + 1 free: SlurmClusterResolver gives a node's tasks consecutive ports."""
    for _ in range(50):
        (port,) = _free_ports(1)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def test_slurm_cluster_two_tasks_on_one_node_train_together_and_only_rank_0_logs(tmp_path):
    """What `srun --ntasks=2 python -m pipeline ... train.cluster=slurm` gives each task, on localhost."""
    port = _free_port_pair()
    base = {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith("SLURM_")}
    slurm = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "2",
             "SLURM_NTASKS": "2", "SLURM_JOB_ID": "4242"}
    processes = {
        f"task{rank}": _start(tmp_path, f"task{rank}", {**base, **slurm, "SLURM_PROCID": str(rank)},
                              "train.strategy=multi_worker", "train.cluster=slurm", f"train.cluster_port={port}",
                              "train.batch_size=32", "export.formats=[keras]")
        for rank in range(2)
    }
    logs = _finished(tmp_path, processes)
    digests = [re.search(r"trained weights sha256: (\w+)", logs[f"task{i}"]).group(1) for i in range(2)]
    assert digests[0] == digests[1]  # all-reduced: the two tasks were one cluster
    # ... of two replicas: each optimizer step took 2 x 32 examples.
    import zipfile

    import h5py

    with zipfile.ZipFile(tmp_path / "task0" / "checkpoints" / "last.keras") as archive:
        archive.extract("model.weights.h5", tmp_path)
    with h5py.File(tmp_path / "model.weights.h5") as weights:
        steps = int(weights["optimizer/vars/0"][()])  # the optimizer's iteration count
    train_examples = int(re.search(r"data: \{'train': (\d+)", logs["task0"]).group(1))
    assert steps == 2 * -(-train_examples // 64), (steps, train_examples)  # 2 epochs

    assert (tmp_path / "task0" / "export").is_dir()
    assert not (tmp_path / "task1" / "export").exists() and not (tmp_path / "task1" / "metrics.json").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("transfer").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["weights_sha256"] == digests[0]


def test_a_missing_cluster_environment_is_a_one_line_config_error(monkeypatch):
    from pipeline.distribute import make_strategy
    from pipeline.errors import ConfigError

    for name in ("TF_CONFIG", "SLURM_PROCID", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2")
    expected = r"^train.cluster='slurm' needs .*; not set: SLURM_PROCID, SLURM_STEP_NODELIST\. Start one worker per task"
    with pytest.raises(ConfigError, match=expected) as slurm:
        make_strategy("multi_worker", "slurm")
    with pytest.raises(ConfigError, match=r"train.cluster='tf_config' needs the TF_CONFIG") as tf_config:
        make_strategy("multi_worker", "tf_config")
    assert "\n" not in str(slurm.value) + str(tf_config.value)

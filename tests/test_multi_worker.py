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
    for process, log in processes.values():
        try:
            process.wait(timeout=400)
        finally:
            process.kill()
            log.close()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in processes}
    assert [p.returncode for p, _ in processes.values()] == [0, 0, 0], "\n".join(t[-2000:] for t in logs.values())

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

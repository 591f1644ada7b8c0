"""train.strategy=multi_worker: two worker processes on loopback ports, CPU only."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

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


def test_two_workers_finish_agree_and_only_the_chief_logs_and_exports(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        )
        env["CUDA_VISIBLE_DEVICES"] = ""
        command = [
            sys.executable, "-m", "pipeline",
            f"hydra.run.dir={tmp_path / f'worker{index}'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_location={tmp_path / 'mlartifacts'}",
            "train.strategy=multi_worker", "train.epochs=2", "train.verbose=0",
        ]
        log = open(tmp_path / f"worker{index}.log", "w")
        processes.append((subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=log), log))
    for process, log in processes:
        try:
            process.wait(timeout=400)
        finally:
            process.kill()
            log.close()
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p, _ in processes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]

    digests = [re.search(r"trained weights sha256: (\w+)", text).group(1) for text in logs]
    assert digests[0] == digests[1]

    assert (tmp_path / "worker0" / "export" / "saved_model").is_dir()
    assert (tmp_path / "worker0" / "metrics.json").exists()
    assert not (tmp_path / "worker1" / "export").exists()
    assert not (tmp_path / "worker1" / "metrics.json").exists()
    assert not (tmp_path / "worker1" / "checkpoints").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["weights_sha256"] == digests[0]

"""The runner's named parts, each alone: resume selection, rerun checks, the local copy."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.resume import RUN_FILE, ResumeTarget, resume_target
from pipeline.runner import RerunCheck, local_copy


class _Store:
    uri = "sqlite:///unused.db"

    def __init__(self, found=None):
        self.found = found
        self.asked = []

    def find_resumable(self, identity):
        self.asked.append(identity)
        return self.found


def _run_dir(tmp_path, run_id="abc", checkpoint=True):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id}))
    if checkpoint:
        (run_dir / "checkpoints" / "state.json").write_text("{}")
    return run_dir


def test_never_and_null_start_fresh_without_asking_the_store():
    store = _Store(found=("abc", "/somewhere"))
    assert resume_target("never", store, "id") is None
    assert resume_target(None, store, "id") is None
    assert store.asked == []


def test_auto_continues_the_killed_run_of_this_config(tmp_path):
    run_dir = _run_dir(tmp_path)
    store = _Store(found=("abc", str(run_dir)))
    assert resume_target("auto", store, "config-1") == ResumeTarget("abc", run_dir)
    assert store.asked == ["config-1"]


def test_auto_continues_a_run_killed_before_its_first_checkpoint(tmp_path):
    run_dir = _run_dir(tmp_path, checkpoint=False)  # killed while its data loaded, say
    assert resume_target("auto", _Store(found=("abc", str(run_dir))), "id") == ResumeTarget("abc", run_dir)
    assert resume_target("auto", _Store(found=None), "id") is None


def test_auto_starts_fresh_when_the_run_dir_is_gone_or_holds_another_run(tmp_path):
    run_dir = _run_dir(tmp_path, run_id="other")  # the store's run_dir tag names another run's
    assert resume_target("auto", _Store(found=("abc", str(run_dir))), "id") is None
    assert resume_target("auto", _Store(found=("abc", str(tmp_path / "gone"))), "id") is None


def test_a_run_id_whose_tag_names_another_runs_directory_is_refused(tmp_path, monkeypatch):
    import pipeline.tracking

    run_dir = _run_dir(tmp_path, run_id="someone-else")
    monkeypatch.setattr(pipeline.tracking, "run_directory", lambda uri, run_id: run_dir)
    with pytest.raises(ConfigError, match=r"resume='abc'.*records another run"):
        resume_target("abc", _Store(), "id")
    (run_dir / RUN_FILE).write_text(json.dumps({"run_id": "abc"}))
    assert resume_target("abc", _Store(), "id") == ResumeTarget("abc", run_dir)


def test_auto_is_off_for_multi_worker_runs(tmp_path):
    store = _Store(found=("abc", str(_run_dir(tmp_path))))
    assert resume_target("auto", store, "id", multi_worker=True) is None
    assert store.asked == []  # only the chief may ask the store, and workers must agree


def test_a_named_run_directory_is_resumed(tmp_path):
    run_dir = _run_dir(tmp_path, run_id="r-42")
    assert resume_target(str(run_dir), _Store(), "id", multi_worker=True) == ResumeTarget("r-42", run_dir)


def test_a_named_directory_without_run_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="has no readable mlflow_run.json"):
        resume_target(str(tmp_path), _Store(), "id")
    run_dir = _run_dir(tmp_path, checkpoint=False)  # no checkpoint yet: continued from epoch 0
    assert resume_target(str(run_dir), _Store(), "id") == ResumeTarget("abc", run_dir)


def test_rerun_check_warns_about_each_differing_fact(caplog):
    check = RerunCheck(("old-run", {"data.fingerprint": "aaa", "git.dirty": "false"}))
    assert check.tags == {"rerun_of": "old-run"}
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        facts = check.compare({"data.fingerprint": "bbb", "git.dirty": "false"})
    assert facts == {"data.fingerprint": "bbb", "git.dirty": "false"}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "data.fingerprint was 'aaa', now 'bbb'" in warnings[0]


def test_a_fresh_run_has_nothing_to_compare(caplog):
    check = RerunCheck(None)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        check.compare({"data.fingerprint": "bbb"})
    assert check.tags == {} and not caplog.records


def test_local_copy_holds_the_trained_weights():
    import keras

    from pipeline.types import AdaptedModel

    def build():
        inputs = keras.Input((3,))
        model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
        return AdaptedModel(model=model, backbone=None, head=model, task="multiclass", class_names=("a", "b"))

    trained = build()
    weights = [np.full(v.shape, i + 1.5, "float32") for i, v in enumerate(trained.model.weights)]
    copy = local_copy(build, weights)
    for variable, expected in zip(copy.model.weights, weights):
        np.testing.assert_array_equal(variable.numpy(), expected)


def test_every_strategy_value_has_a_builder_and_no_other():
    from typing import get_args

    from pipeline.distribute import _BUILDERS
    from pipeline.train import Strategy

    assert sorted(_BUILDERS) == sorted(get_args(Strategy))


def test_each_export_format_value_has_a_writer_and_no_other():
    from pipeline.export import FORMATS, Exporter

    assert sorted(Exporter(formats=list(FORMATS))._writers()) == sorted(FORMATS)


def test_auto_never_takes_over_a_run_whose_process_is_alive(tmp_path):
    from pipeline.files import run_dir_lock

    run_dir = _run_dir(tmp_path)
    store = _Store(found=("abc", str(run_dir)))
    with run_dir_lock(run_dir):  # the owner still runs (here, or on another host sharing the disk)
        assert resume_target("auto", store, "id") is None
    assert resume_target("auto", store, "id") == ResumeTarget("abc", run_dir)


@pytest.mark.slow
def test_a_sigterm_lost_inside_a_del_still_stops_the_run_at_the_next_stage(tmp_path, monkeypatch):
    """Python drops an exception raised in `__del__`; the signal must not be lost with it."""
    import os
    import signal

    from cli import runs
    from conftest import compose

    from pipeline.evaluate import Evaluator
    from pipeline.runner import run

    evaluate = Evaluator.evaluate

    class Collected:
        def __del__(self):  # the handler's KeyboardInterrupt is raised, and dropped, in here
            os.kill(os.getpid(), signal.SIGTERM)

    def evaluating(self, *args, **kwargs):
        Collected()  # made and collected at once, as TensorFlow's objects are during an export
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "evaluate", evaluating)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        run(compose(["train.epochs=1", "data.classes=[5,6,7]", "train.verbose=0",
                     f"train.feature_cache_dir={tmp_path / 'cache'}"], tmp_path))
    (killed,) = runs(tmp_path)
    assert killed.info.status == "KILLED"  # resumable by the same command
    assert not (tmp_path / "run" / "export").exists()  # stopped before the next stage



def test_a_cold_frozen_run_exports_through_the_backbone_its_feature_pass_traced(tmp_path, monkeypatch):
    from conftest import compose

    import pipeline.export as export
    from pipeline.runner import run

    composed = export._composed
    given = []
    monkeypatch.setattr(export, "_composed", lambda adapted, function: given.append(function)
                        or composed(adapted, function))
    metrics = run(compose(["freeze=all", "train.epochs=2", "data.classes=[5,6,7]", "train.verbose=0",
                           f"train.feature_cache_dir={tmp_path / 'cache'}"], tmp_path))
    (function,) = given
    assert function is not None and hasattr(function, "get_concrete_function")
    assert metrics["export_saved_model_max_abs_diff"] < 1e-5

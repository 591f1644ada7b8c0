"""hydra/sweeper=optuna (hydra_plugins/pipeline_optuna_sweeper) and pipeline.trials: the search
space, a study that continues, and pruning, in one process and in several."""

from __future__ import annotations

import json
import os
import pickle
import socket

import pytest

from cli import client, run_pipeline, runs
from conftest import PROJECT_ROOT


def test_params_become_distributions_and_the_command_line_wins():
    import optuna.distributions as d

    from hydra_plugins.pipeline_optuna_sweeper.search_space import SearchSpace

    search = SearchSpace.parse(
        {"train.learning_rate": "tag(log, interval(0.0001, 0.01))", "head.dropout": "interval(0.0, 0.5)",
         "train.label_smoothing": "choice(0.0, 0.1)", "train.epochs": "range(2, 8, 2)", "seed": "3"},
        ["head.dropout=0.2", "head=linear,mlp", "train.batch_size=tag(int, interval(8, 64))"],
    )
    assert search.distributions == {
        "train.learning_rate": d.FloatDistribution(0.0001, 0.01, log=True),
        "train.label_smoothing": d.CategoricalDistribution([0.0, 0.1]),
        "train.epochs": d.IntDistribution(2, 6, step=2),
        "head": d.CategoricalDistribution(["linear", "mlp"]),
        "train.batch_size": d.IntDistribution(8, 64),
    }
    assert search.fixed == ["head.dropout=0.2", "seed=3"]
    assert search.grid is None  # intervals cannot be listed
    overrides = search.overrides({"head": "mlp", "train.learning_rate": 0.001, "flag": "true", "name": "a b"})
    assert overrides[-4:] == ["head=mlp", "train.learning_rate=0.001", "flag='true'", "name='a b'"]


def test_the_digits_optuna_overlay_builds_its_sampler_pruner_and_search_space():
    import optuna
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from conftest import CONFIG_DIR
    from hydra_plugins.pipeline_optuna_sweeper.optuna_sweeper import OptunaSweeper, _build
    from hydra_plugins.pipeline_optuna_sweeper.search_space import SearchSpace

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=digits_optuna"], return_hydra_config=True)
    sweeper = instantiate(cfg.hydra.sweeper)  # as Hydra does: _recursive_ is off, the nodes stay config
    # (Hydra's plugin scan loads the module a second time, so compare the class by name.)
    assert type(sweeper).__qualname__ == OptunaSweeper.__qualname__
    assert sweeper.n_trials == 12 and sweeper.direction == "maximize"
    assert isinstance(sweeper._sampler(SearchSpace.parse(sweeper.params, [])), optuna.samplers.TPESampler)
    assert isinstance(_build("hydra.sweeper.pruner", sweeper.pruner), optuna.pruners.MedianPruner)
    assert set(SearchSpace.parse(sweeper.params, []).distributions) == {
        "train.learning_rate", "head.dropout", "train.label_smoothing"}


def test_sampled_values_parse_back_to_themselves():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.pipeline_optuna_sweeper.search_space import SearchSpace

    values = {"a": 1e-05, "b": 3, "c": "mlp", "d": "1e-3", "e": "it's", "f": None, "g": True, "h": "/x/y"}
    parsed = OverridesParser.create().parse_overrides(SearchSpace({}, [], None).overrides(values))
    assert {o.key_or_group: o.value() for o in parsed} == values


def test_a_grid_lists_choice_and_range_values():
    from hydra_plugins.pipeline_optuna_sweeper.search_space import SearchSpace

    search = SearchSpace.parse({"head.dropout": "choice(0.0, 0.5)", "train.epochs": "range(1, 3)"}, [])
    assert search.grid == {"head.dropout": [0.0, 0.5], "train.epochs": [1, 2]}


def test_an_unknown_search_space_names_the_key():
    from hydra_plugins.pipeline_optuna_sweeper.search_space import SearchSpace
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"hydra.sweeper.params: 'train.epochs=range\(5, 1\)'.*range is empty"):
        SearchSpace.parse({"train.epochs": "range(5, 1)"}, [])


def _study(tmp_path, **kwargs):
    import optuna

    from pipeline.trials import storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    return url, optuna.create_study(study_name="s", storage=storage(url), load_if_exists=True, **kwargs)


def test_a_dead_sweeps_running_trial_is_run_again_with_its_values_and_counted_once(tmp_path):
    import optuna.distributions as d
    from optuna.trial import TrialState

    from hydra_plugins.pipeline_optuna_sweeper.optuna_sweeper import OWNER, _counted, _requeue_stale

    _, study = _study(tmp_path)
    space = {"x": d.FloatDistribution(0.0, 1.0)}
    done = study.ask(space)
    study.tell(done, 0.5)
    dead = study.ask(space)
    dead.set_user_attr(OWNER, {"host": socket.gethostname(), "pid": "999999999"})  # no such process
    alive = study.ask(space)
    alive.set_user_attr(OWNER, {"host": socket.gethostname(), "pid": str(os.getpid())})
    elsewhere = study.ask(space)
    elsewhere.set_user_attr(OWNER, {"host": "another-host", "pid": "1"})

    _requeue_stale(study)

    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING,
                      TrialState.WAITING]
    again = study.ask(space)  # the queued trial comes first, with the dead trial's value
    assert again.params == dead.params
    study.tell(again, 0.7)
    assert _counted(study) == 2  # the completed trial and the repeat, not the lost one


def test_a_reporter_reports_each_epoch_and_raises_trial_pruned_when_the_pruner_says_so(tmp_path):
    import optuna

    from pipeline.errors import TrialPruned
    from pipeline.trials import TrialAddress, TrialReporter

    url, study = _study(tmp_path, direction="maximize")
    trial = study.ask()
    pruner = optuna.pruners.ThresholdPruner(lower=0.9, n_warmup_steps=1)
    reporter = TrialReporter.open(TrialAddress("s", url, trial.number), "val_accuracy", pruner)
    assert reporter.tags == {"trial_number": str(trial.number), "study_name": "s"}
    logged = []
    hook = reporter.after(lambda epoch, metrics: logged.append(epoch))
    hook(0, {"val_accuracy": 0.5, "loss": 1.0})  # warm-up: reported, not judged
    with pytest.raises(TrialPruned) as raised:
        hook(1, {"val_accuracy": 0.6, "loss": 0.9})
    assert logged == [0, 1]  # the pruned epoch is logged before the trial stops
    assert raised.value.epochs_completed == 2
    assert study.trials[0].intermediate_values == {0: 0.5, 1: 0.6}
    copy = pickle.loads(pickle.dumps(raised.value))  # it crosses process boundaries (joblib)
    assert (str(copy), copy.epochs_completed) == (str(raised.value), 2)


def test_a_trial_address_travels_in_the_environment():
    from pipeline.trials import TrialAddress

    address = TrialAddress("study one", "sqlite:////tmp/x.db", 7)
    assert TrialAddress.from_env(address.env()) == address
    assert TrialAddress.from_env({}) is None


def _prune_everything(*overrides: str) -> tuple[str, ...]:
    """A pruner that stops every trial after its second epoch (no val_accuracy reaches 1.01)."""
    return ("hydra.sweeper.pruner=null",
            "hydra.sweeper.pruner={_target_: optuna.pruners.ThresholdPruner, lower: 1.01, n_warmup_steps: 1}",
            *overrides)


def _trials_and_children(tmp_path, storage):
    import optuna

    study = optuna.load_study(study_name="digits-transfer", storage=storage)
    children = [r for r in runs(tmp_path) if "mlflow.parentRunId" in r.data.tags]
    return study, children


@pytest.mark.slow
def test_a_pruned_trial_stops_early_and_ends_finished_with_trial_state_pruned(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    good = PROJECT_ROOT / "pipeline" / "assets" / "digits_0to4"
    done = run_pipeline(
        tmp_path, "-m", "hparams_search=digits_optuna", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=5", "train.epochs=4",
        # A grid of two trials (n_trials is capped at its size): one trains, one fails in its run.
        "hydra.sweeper.sampler={_target_: optuna.samplers.GridSampler}", "hydra.sweeper.params=null",
        f"source.handle=choice({good},/nope)",
        *_prune_everything(),
    )
    assert done.returncode == 1, done.stderr[-3000:]  # a failed trial fails the sweep
    study, children = _trials_and_children(tmp_path, storage)
    by_handle = {t.params["source.handle"]: t for t in study.trials}
    assert len(study.trials) == 2
    assert by_handle[str(good)].state == optuna.trial.TrialState.PRUNED
    assert by_handle[str(good)].intermediate_values.keys() == {0, 1}
    assert by_handle["/nope"].state == optuna.trial.TrialState.FAIL

    states = {c.data.tags["trial_number"]: c for c in children}
    pruned = states[str(by_handle[str(good)].number)]
    assert pruned.info.status == "FINISHED" and pruned.data.tags["trial_state"] == "PRUNED"
    epochs = client(tmp_path).get_metric_history(pruned.info.run_id, "val_loss")
    assert [m.step for m in epochs] == [0, 1]  # two of the four epochs, then pruned
    assert pruned.data.metrics["epochs_completed"] == 2
    assert "test_accuracy" not in pruned.data.metrics  # no evaluation for a pruned trial
    # The trial's address travels outside the config: no MLflow param, no part of config_sha256.
    assert not [k for k in pruned.data.params if "trial" in k or "optuna" in k.lower()]
    failed = states[str(by_handle["/nope"].number)]
    assert failed.info.status == "FAILED" and failed.data.tags["trial_state"] == "FAIL"

    jobs = [json.loads(line) for line in (tmp_path / "sweep" / "jobs.jsonl").read_text().splitlines()]
    assert sorted(j["status"] for j in jobs) == ["FAILED", "PRUNED"]
    report = done.stdout[done.stdout.index("Sweep: 2 job(s)"):]
    assert "1 failed, 1 pruned" in report and "PRUNED job #" in report and "pruned after epoch 1" in report
    parent = next(r for r in runs(tmp_path) if r.data.tags.get("sweep") == "true")
    assert parent.data.metrics["pruned_jobs"] == 1 and parent.data.metrics["failed_jobs"] == 1
    assert "Error executing job" not in done.stderr  # a pruned trial is no error


@pytest.mark.slow
def test_trials_in_separate_processes_are_pruned_through_the_shared_storage(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    done = run_pipeline(
        tmp_path, "-m", "hparams_search=digits_optuna", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
        f"hydra.sweeper.storage={storage}", "hydra.sweeper.n_trials=2", "train.epochs=4",
        *_prune_everything(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study, children = _trials_and_children(tmp_path, storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(t.intermediate_values.keys() == {0, 1} for t in study.trials)  # reported by the jobs
    assert len(children) == 2 and {c.data.tags["trial_state"] for c in children} == {"PRUNED"}
    assert {c.info.status for c in children} == {"FINISHED"}
    pids = {c.data.tags["pid"] for c in children}
    assert len(pids) == 2 and str(os.getpid()) not in pids  # really in two other processes

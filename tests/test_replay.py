"""A config read back from a store is data: the attacks of issue 14 are refused, by key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import compose
from pipeline.errors import ConfigError
from pipeline.replay import check_replay


@pytest.fixture
def stored(tmp_path):
    """What a run stores: the resolved default config, as plain data."""
    resolved = OmegaConf.to_container(compose([], tmp_path), resolve=True)
    return yaml.safe_load(OmegaConf.to_yaml({k: v for k, v in resolved.items() if k != "hydra"}))


def test_a_genuine_stored_config_replays(stored):
    check_replay(stored)


def test_a_target_outside_the_allowlist_is_refused_naming_the_key(stored):
    stored["data"]["augmentation"] = {"_target_": "builtins.open", "file": "/etc/passwd"}
    with pytest.raises(ConfigError, match=r"data\.augmentation\._target_='builtins\.open' is not a class of this"):
        check_replay(stored)


def test_scikit_learn_estimators_replay_but_not_the_rest_of_scikit_learn(stored):
    stored["head"] = {"_target_": "pipeline.heads.SklearnHead", "estimator": {
        "_target_": "sklearn.pipeline.Pipeline", "steps": [
            ["scale", {"_target_": "sklearn.preprocessing.StandardScaler"}],
            ["knn", {"_target_": "sklearn.neighbors.KNeighborsClassifier", "n_neighbors": 3}]]}}
    check_replay(stored)
    stored["head"]["estimator"]["steps"][0][1] = {"_target_": "sklearn.datasets.fetch_openml", "name": "x"}
    with pytest.raises(ConfigError, match=r"head\.estimator\.steps\[0\]\[1\]\._target_='sklearn\.datasets\.fetch_openml'"):
        check_replay(stored)


def test_a_nested_loader_that_runs_code_is_refused(stored):
    stored["train"]["optimizer"] = {"_target_": "keras.saving.load_model", "filepath": "/x.keras", "safe_mode": False}
    with pytest.raises(ConfigError, match=r"train\.optimizer\._target_='keras\.saving\.load_model'"):
        check_replay(stored)
    stored["train"]["optimizer"] = {"_target_": "keras.optimizers.Adam", "_partial_": True}
    check_replay(stored)  # the genuine optimizer node is fine


def test_resolvers_that_read_the_machine_are_refused(stored):
    stored["tracking"]["run_name"] = "${oc.env:SECRET}"
    with pytest.raises(ConfigError, match=r"tracking\.run_name='\$\{oc\.env:SECRET\}' calls a resolver"):
        check_replay(stored)


def test_settings_that_run_code_need_the_command_line_flag(stored):
    stored["source"] = {"_target_": "pipeline.sources.keras_file.KerasFileSource", "path": "/m.keras",
                        "allow_unsafe": True}
    with pytest.raises(ConfigError, match=r"source\.allow_unsafe=True would run Python code .*--allow-unsafe"):
        check_replay(stored)
    check_replay(stored, allow_unsafe=True)


def test_rerun_refuses_an_edited_store_before_building_anything(stored, monkeypatch):
    from pipeline import rerun, runner, tracking

    stored["evaluate"] = {"_target_": "os.system", "command": "touch /tmp/owned"}
    record = SimpleNamespace(config_yaml=yaml.safe_dump(stored), tags={})
    monkeypatch.setattr(tracking, "run_record", lambda uri, run_id: record)
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("the replay reached the runner"))
    with pytest.raises(ConfigError, match=r"run abc's stored config\.yaml: evaluate\._target_='os\.system'"):
        rerun.rerun("abc", "sqlite:///unused.db")


def test_a_savedmodel_the_stored_config_names_is_checked_before_it_loads(tmp_path):
    from conftest import write_reading_saved_model
    from pipeline.errors import SourceError
    from pipeline.sources.graph_check import config_from_store
    from pipeline.sources.signatures import load_saved_model

    reading = tmp_path / "reading"
    write_reading_saved_model(reading)
    assert load_saved_model(str(reading), key="source.handle") is not None  # the user named it: trusted
    with config_from_store(), pytest.raises(SourceError) as refused:
        load_saved_model(str(reading), key="source.handle")
    assert str(refused.value).startswith(f"source.handle={str(reading)!r}, named by the stored config, runs "
                                         "TensorFlow ops that read or write files")
    assert "(ReadFile)" in str(refused.value) and "--allow-unsafe" in str(refused.value)


def test_rerun_checks_the_stored_configs_savedmodels_unless_allowed(stored, tmp_path, monkeypatch):
    from conftest import write_reading_saved_model
    from pipeline import rerun, runner, tracking
    from pipeline.errors import SourceError
    from pipeline.sources.signatures import load_saved_model

    reading = tmp_path / "reading"
    write_reading_saved_model(reading)
    stored["source"] = {"_target_": "pipeline.sources.hub.HubSource", "handle": str(reading),
                        "input_shape": [8, 8, 1]}
    record = SimpleNamespace(config_yaml=yaml.safe_dump(stored), tags={})
    monkeypatch.setattr(tracking, "run_record", lambda uri, run_id: record)
    # The runner's source stage loads what the config names (tests/test_resume.py replays a
    # whole run from the command line).
    monkeypatch.setattr(runner, "run", lambda cfg, **kwargs: {"loaded": load_saved_model(cfg.source.handle,
                                                                                          "source.handle")})
    with pytest.raises(SourceError, match=r"named by the stored config, runs TensorFlow ops .*--allow-unsafe"):
        rerun.rerun("abc", "sqlite:///unused.db", output_dir=tmp_path / "run")
    assert rerun.rerun("abc", "sqlite:///unused.db", output_dir=tmp_path / "run", allow_unsafe=True)["loaded"]

"""Tier 1: every shipped option composes and builds; bad config fails before TensorFlow."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, PROJECT_ROOT, compose
from pipeline import config
from pipeline.errors import ConfigError

GROUPS = ("source", "freeze", "head", "data", "train", "evaluate", "export", "tracking", "extract")

# Values for the `???` keys of options, so that each option can be built in isolation.
# Building an option must not touch these paths (loading happens in `load()`).
PLACEHOLDERS = {
    "source.handle": "/models/feature_vector",
    "source.path": "/models/model.keras",
    "source.name": "MobileNetV2",
    "source.run": "/runs/earlier",
    "source.preset": "/models/preset",
    "data.train_dir": "/data/train",
    "data.manifest": "/data/labels.csv",
    "data.file_pattern": "/data/train-*.tfrecord",
    "data.name": "mnist",
    "freeze.n": "2",
    "freeze.patterns": "[block_6]",
    "freeze.schedule": "[[0,1],[2,2]]",
}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in _options(g)], ids=lambda v: str(v)
)
def test_every_option_composes_validates_and_instantiates(group, option, tmp_path):
    cfg = compose([f"{group}={option}"], tmp_path)
    missing = sorted(OmegaConf.missing_keys(cfg))
    cfg = compose([f"{group}={option}", *(f"{k}={PLACEHOLDERS[k]}" for k in missing)], tmp_path)
    config.validate(cfg)
    built = instantiate(cfg[group])
    assert type(built).__module__.startswith("pipeline.")
    assert type(built).__name__ == cfg[group]._target_.rsplit(".", 1)[1]


@pytest.mark.parametrize("option", _options("experiment"))
def test_every_experiment_overlay_composes_and_validates(option, tmp_path):
    cfg = compose([f"experiment={option}"], tmp_path)
    config.validate(cfg)
    # What the overlay says reaches the composed config: its options and its values.
    overlay = OmegaConf.load(CONFIG_DIR / "experiment" / f"{option}.yaml")
    for entry in overlay.pop("defaults"):
        ((key, choice),) = entry.items()
        group = key.removeprefix("override /")
        assert cfg[group]._target_ == OmegaConf.load(CONFIG_DIR / group / f"{choice}.yaml")._target_, group
    for key, value in config.flatten(OmegaConf.to_container(overlay)).items():
        assert str(OmegaConf.select(cfg, key)) == value, key


def test_each_yaml_starts_with_the_command_that_uses_it():
    for path in CONFIG_DIR.rglob("*.yaml"):
        lines = [l for l in path.read_text().splitlines() if not l.startswith("# @package")]
        assert lines[0].startswith("# python -m pipeline"), path


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path):
    cfg = compose(["+train.epochz=3"], tmp_path)
    with pytest.raises(ConfigError) as caught:
        config.validate(cfg)
    message = str(caught.value)
    assert "train.epochz=3" in message
    assert "allowed keys" in message and "epochs" in message


def test_wrong_type_names_key_value_and_expected_type(tmp_path):
    cfg = compose(["train.epochs=ten"], tmp_path)
    with pytest.raises(ConfigError, match=r"train\.epochs='ten'.*expected int"):
        config.validate(cfg)


def test_literal_lists_the_allowed_values(tmp_path):
    cfg = compose(["source.preprocess=cafe"], tmp_path)
    with pytest.raises(ConfigError, match=r"source\.preprocess='cafe'.*'caffe', 'tf', 'torch'"):
        config.validate(cfg)


def test_missing_required_value_is_named(tmp_path):
    cfg = compose(["source=hub"], tmp_path)
    with pytest.raises(ConfigError, match=r"source\.handle"):
        config.validate(cfg)


def test_bool_is_not_accepted_for_int(tmp_path):
    cfg = compose(["train.batch_size=true"], tmp_path)
    with pytest.raises(ConfigError, match="train.batch_size"):
        config.validate(cfg)


def test_flatten_gives_dotted_keys():
    flat = config.flatten({"train": {"epochs": 3, "optimizer": {"_target_": "x"}}, "seed": 0})
    assert flat == {"train.epochs": "3", "train.optimizer._target_": "x", "seed": "0"}


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_rejects_bad_value_without_importing_tensorflow(tmp_path):
    code = (
        "import sys\n"
        "from conftest import compose\n"
        "from pipeline import config\n"
        f"cfg = compose(['train.epochs=ten'], __import__('pathlib').Path({str(tmp_path)!r}))\n"
        "try:\n"
        "    config.validate(cfg)\n"
        "except Exception as error:\n"
        "    print(type(error).__name__)\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT / "tests",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.split() == ["ConfigError", "False", "False"], done.stderr


def test_cli_reports_bad_value_and_exits_nonzero(tmp_path):
    done = _cli("train.epochs=ten", f"hydra.run.dir={tmp_path}")
    assert done.returncode != 0
    assert "train.epochs='ten'" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_help_lists_the_groups():
    done = _cli("--help")
    assert done.returncode == 0
    for group in GROUPS:
        assert f"{group}:" in done.stdout


def test_head_sklearn_freezes_the_backbone_and_checks_the_estimator(tmp_path):
    assert compose(["head=sklearn"], tmp_path).freeze._target_ == "pipeline.freeze.FreezeAll"
    with pytest.raises(ConfigError, match=r"head=sklearn .* freeze is 'pipeline\.freeze\.TopN'.*set freeze=all"):
        config.validate(compose(["head=sklearn", "freeze=top_n"], tmp_path))
    with pytest.raises(ConfigError, match=r"head\.estimator\.c=0\.1 is not a setting of sklearn\.linear_model\.LogisticRegression"):
        config.validate(compose(["head=sklearn", "+head.estimator.c=0.1"], tmp_path))
    cfg = compose(["head=sklearn", "head.estimator._target_=sklearn.svm.LinearSVC", "~head.estimator.max_iter",
                   "head.estimator.C=0.1"], tmp_path)
    config.validate(cfg)
    assert type(config.build(cfg, "head").estimator).__name__ == "LinearSVC"


def test_a_nonlinear_sklearn_head_exports_saved_model_only(tmp_path):
    knn = ["head=sklearn", "head.estimator._target_=sklearn.neighbors.KNeighborsClassifier",
           "~head.estimator.C", "~head.estimator.max_iter", "+head.estimator.n_neighbors=3"]
    config.validate(compose(knn, tmp_path))
    config.validate(compose([*knn, "export=none"], tmp_path))
    with pytest.raises(ConfigError, match=r"export\.formats includes keras, but head\.estimator "
                                          r"'sklearn\.neighbors\.KNeighborsClassifier' is not linear"):
        config.validate(compose([*knn, "export.formats=[saved_model,keras]"], tmp_path))
    scaled = ["head=sklearn", "head.estimator._target_=sklearn.pipeline.Pipeline", "~head.estimator.C",
              "~head.estimator.max_iter", "export.formats=[saved_model,tflite]",
              "+head.estimator.steps=[[s,{_target_:sklearn.preprocessing.StandardScaler}],"
              "[f,{_target_:sklearn.svm.LinearSVC}]]"]
    config.validate(compose(scaled, tmp_path))  # folded into a Dense layer: every format
    with pytest.raises(ConfigError, match=r"export\.formats includes tflite"):
        config.validate(compose([*scaled[:-1], scaled[-1].replace("svm.LinearSVC", "svm.SVC")], tmp_path))

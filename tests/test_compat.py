"""pipeline.compat: every private-API patch's check passes on the installed versions, and
fails naming the patch where what it patches is gone."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib import metadata
from types import SimpleNamespace

import pytest

from conftest import PROJECT_ROOT
from pipeline import compat
from pipeline.errors import IncompatibleVersion


@pytest.mark.parametrize("check", compat.CHECKS, ids=lambda check: check.__name__)
def test_each_check_passes_on_the_installed_versions(check):
    check()


def test_compat_imports_no_heavy_library():
    # Config checks import it before TensorFlow.
    code = (
        "import sys, pipeline.compat; "
        "print(sorted(m for m in ('keras', 'tensorflow', 'optuna', 'hydra', 'mlflow') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_require_names_the_patch_the_attribute_and_the_installed_version():
    stand_in = SimpleNamespace(other=1)
    with pytest.raises(IncompatibleVersion) as raised:
        compat.require(stand_in, "_gone", patch="some patch (owner/repo#1)", package="keras")
    message = str(raised.value)
    assert "some patch (owner/repo#1)" in message
    assert "SimpleNamespace object._gone" in message
    assert f"keras {metadata.version('keras')}" in message
    assert compat.require(stand_in, "other", patch="p", package="keras") == 1


# Each patch on a stand-in, or on the real module with the attribute it needs removed.


def test_multi_worker_build_on_a_model_without_symbolic_build():
    strategy = SimpleNamespace(scope=lambda: pytest.fail("nothing may run before the check"))
    with pytest.raises(IncompatibleVersion, match="multi-worker build"):
        compat.build_for_multi_worker_fit(SimpleNamespace(), strategy, local_batch=None)


def test_multi_worker_reduce_on_a_keras_without_its_helper(monkeypatch):
    from keras.src.backend.tensorflow import trainer

    monkeypatch.delattr(trainer, "_collective_all_reduce_multi_worker")
    with pytest.raises(IncompatibleVersion, match=r"multi-worker scalar metric reduction.*"
                                                  r"_collective_all_reduce_multi_worker"):
        compat.patch_multi_worker_reduce()


def test_multi_worker_reduce_patches_once_and_leaves_other_strategies_alone(monkeypatch):
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    monkeypatch.setattr(trainer, "reduce_per_replica", trainer.reduce_per_replica)  # restored after
    original = trainer.reduce_per_replica
    compat.patch_multi_worker_reduce()
    patched = trainer.reduce_per_replica
    compat.patch_multi_worker_reduce()
    assert patched is not original and trainer.reduce_per_replica is patched
    value = tf.constant(2.5)
    assert patched({"loss": value}, tf.distribute.get_strategy(), "auto")["loss"] is value


def test_var_key_on_an_optimizer_without_it():
    import keras

    with pytest.raises(IncompatibleVersion, match="per-variable learning rates"):
        compat.var_key(SimpleNamespace(), keras.Variable(1.0))
    optimizer = keras.optimizers.SGD()
    variable = keras.Variable(1.0)
    assert compat.var_key(optimizer, variable) == compat.var_key(optimizer, variable)


def test_keras_downloads_on_a_keras_without_get_file(monkeypatch):
    from keras.src.utils import file_utils

    monkeypatch.delattr(file_utils, "get_file")
    with pytest.raises(IncompatibleVersion, match="fail-fast Keras downloads.*get_file"):
        compat.keras_get_file()


def test_replace_keras_get_file_restores_the_original_also_after_an_error():
    from keras.src.utils import file_utils

    original = file_utils.get_file

    def replacement(*args, **kwargs):
        raise AssertionError("unused")

    with pytest.raises(RuntimeError):
        with compat.replace_keras_get_file(replacement):
            assert file_utils.get_file is replacement
            raise RuntimeError
    assert file_utils.get_file is original


def test_saved_model_layer_on_a_keras_without_tracker_unlock(monkeypatch):
    from keras.src.utils import tracking

    monkeypatch.delattr(tracking.Tracker, "unlock")
    with pytest.raises(IncompatibleVersion, match="SavedModelLayer variable aliasing.*unlock"):
        compat.check_saved_model_layer()
    with pytest.raises(IncompatibleVersion, match="SavedModelLayer variable aliasing.*_tracker"):
        with compat.unlocked(SimpleNamespace()):
            pass
    with pytest.raises(IncompatibleVersion, match="SavedModelLayer variable aliasing.*_track_variable"):
        compat.track_variable(SimpleNamespace(), None)


def test_unlocked_relocks_a_built_layer():
    import keras

    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    with compat.unlocked(layer):
        compat.track_variable(layer, keras.Variable(0.0, trainable=False))
    assert len(layer.weights) == 3
    with pytest.raises(ValueError):
        layer.extra = keras.Variable(1.0)  # Keras' own lock is back


def test_job_error_on_a_hydra_without_return_value(monkeypatch):
    from hydra.core.utils import JobReturn, JobStatus

    error = ValueError("bad")
    assert compat.job_error(JobReturn(status=JobStatus.FAILED, _return_value=error)) is error
    assert compat.job_error(JobReturn(status=JobStatus.COMPLETED, _return_value=3)) is None
    with pytest.raises(IncompatibleVersion, match="sweep job errors.*_return_value"):
        compat.job_error(SimpleNamespace(status=JobStatus.FAILED))
    monkeypatch.delattr(JobReturn, "_return_value")
    with pytest.raises(IncompatibleVersion, match="sweep job errors"):
        compat.check_job_error()


def test_mlflow_saving_a_model_checks_its_pins_by_metadata_and_still_warns(monkeypatch, caplog):
    import importlib_metadata
    from mlflow.utils import environment, requirements_utils

    mapped = []  # MLflow's own check maps every installed distribution first (cached per process)
    monkeypatch.setattr(importlib_metadata, "packages_distributions", lambda: mapped.append(1) or {})
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    numpy = metadata.version("numpy")
    with compat.pins_checked_by_metadata(), caplog.at_level("WARNING"):
        # What mlflow.pyfunc.save_model does with the pip requirements it is given.
        _, written, _ = environment._process_pip_requirements([], [f"numpy=={numpy}", "numpy-not-installed==1.0"])
    assert mapped == []
    assert f"numpy=={numpy}" in written
    (warning,) = [record for record in caplog.records if record.name == "pipeline"]
    assert "numpy-not-installed (current: uninstalled, required: numpy-not-installed==1.0)" in warning.message
    assert "numpy (current" not in warning.message
    assert environment.warn_dependency_requirement_mismatches is not compat._warn_mismatched_pins  # put back


def test_mismatched_pins_words_each_unsatisfied_requirement_as_mlflow_does():
    numpy = metadata.version("numpy")
    assert compat.mismatched_pins([f"numpy=={numpy}", "numpy>=1", "-c constraints.txt",
                                   "absent-package==1.0; python_version < '3'"]) == []
    assert compat.mismatched_pins(["numpy==0.0.1", "absent-package==1.0"]) == [
        f"numpy (current: {numpy}, required: numpy==0.0.1)",
        "absent-package (current: uninstalled, required: absent-package==1.0)",
    ]


def test_mlflow_pins_on_an_mlflow_without_its_check_leave_mlflow_to_check(monkeypatch):
    from mlflow.utils import environment

    monkeypatch.delattr(environment, "warn_dependency_requirement_mismatches")
    with pytest.raises(IncompatibleVersion, match="MLflow's check of a model's pins.*warn_dependency"):
        compat.check_mlflow_pins()
    with compat.pins_checked_by_metadata():  # a speed patch: nothing to swap, nothing fails
        assert not hasattr(environment, "warn_dependency_requirement_mismatches")


@pytest.mark.parametrize("package", ["keras", "hydra-core"])
def test_pyproject_pins_the_installed_version_of_each_patched_library(package):
    from packaging.requirements import Requirement

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    pins = {Requirement(line).name: Requirement(line).specifier for line in project["dependencies"]}
    assert package in pins, f"pyproject.toml does not pin {package}, which pipeline/compat.py patches"
    assert metadata.version(package) in pins[package]
    assert any(spec.operator == "<" for spec in pins[package])  # an upper bound

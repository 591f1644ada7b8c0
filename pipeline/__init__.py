"""Declarative transfer learning for TensorFlow.

`python -m pipeline` composes `conf/` with Hydra and runs load -> adapt -> train ->
evaluate -> export, logging to MLflow. Nothing here imports TensorFlow at import time,
so config checks and `--help` answer fast.

`import pipeline` is also all a consumer of an exported `model.keras` needs: this package's
Keras layers are registered with Keras as soon as Keras is imported (now, if it already
is), so `keras.saving.load_model("export/model.keras")` finds them.
"""

import sys

__version__ = "0.1.0"

# The modules whose Keras layers an exported model can hold.
KERAS_MODULES = (
    "pipeline.data.layers",
    "pipeline.estimator_layer",
    "pipeline.sources.backbone",
    "pipeline.sources.keras_hub_layer",
    "pipeline.sources.preprocess",
    "pipeline.sources.saved_model_layer",
)


def register_keras_layers() -> None:
    """Registers every Keras layer of this package with Keras (imports Keras)."""
    import importlib

    for name in KERAS_MODULES:
        importlib.import_module(name)


class _RegisterAfterKeras:
    """An import hook that registers the layers right after `keras` has been imported.

    Registering at `import pipeline` would import Keras (and TensorFlow, seconds) in every
    command, config checks included; this waits until the process imports Keras itself.
    It only wraps the spec that the other finders give (a lookup such as TensorFlow's
    `importlib.util.find_spec("keras")` may come before the import), and leaves once the
    layers are registered.
    """

    def __init__(self):
        self._searching = False

    def find_spec(self, name, path=None, target=None):
        if name != "keras" or self._searching:
            return None
        import importlib.util

        self._searching = True  # the other finders locate keras; this only wraps it
        try:
            spec = importlib.util.find_spec("keras")
        finally:
            self._searching = False
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            register_keras_layers()

        spec.loader.exec_module = exec_module
        return spec


if "keras" in sys.modules:
    register_keras_layers()
else:
    sys.meta_path.insert(0, _RegisterAfterKeras())

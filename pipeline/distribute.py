"""`train.strategy`: the `tf.distribute` strategy a run trains under."""

from __future__ import annotations

import json
import os
from typing import Any

from pipeline import compat
from pipeline.errors import ConfigError


def make_strategy(name: str) -> Any:
    """The strategy for `train.strategy=name`; `multi_worker` must be made before other TF ops.

    `name` is a `pipeline.train.Strategy`, checked against that enum with the rest of the
    config before TensorFlow is imported; each value has one small builder below.
    """
    return _BUILDERS[name]()


def _default() -> Any:
    import tensorflow as tf

    return tf.distribute.get_strategy()


def _one_device() -> Any:
    import tensorflow as tf

    device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
    return tf.distribute.OneDeviceStrategy(device)


def _mirrored() -> Any:
    import tensorflow as tf

    return tf.distribute.MirroredStrategy()


def _multi_worker() -> Any:
    import tensorflow as tf

    if "TF_CONFIG" not in os.environ:
        raise ConfigError(
            "train.strategy='multi_worker' needs the TF_CONFIG environment variable "
            '(for example {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}); set it on every worker, or use '
            "train.strategy=mirrored on one machine"
        )
    return tf.distribute.MultiWorkerMirroredStrategy()


def _tpu() -> Any:
    import tensorflow as tf

    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.NotFoundError) as error:
        raise ConfigError(
            f"train.strategy='tpu' found no TPU ({error}); run on a TPU VM or set "
            "TPU_NAME, or choose train.strategy=default"
        ) from error
    return tf.distribute.TPUStrategy(resolver)


_BUILDERS = {
    "default": _default,
    "one_device": _one_device,
    "mirrored": _mirrored,
    "multi_worker": _multi_worker,
    "tpu": _tpu,
}


def is_chief(name: str) -> bool:
    """Whether this process logs and exports: always, except non-chief multi-worker tasks."""
    if name != "multi_worker":
        return True
    config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    task = config.get("task", {})
    cluster = config.get("cluster", {})
    if "chief" in cluster:
        return task.get("type") == "chief"
    return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0


def prepare_multi_worker_fit(model: Any, strategy: Any, local_batch: Any) -> None:
    """Work around two Keras 3 bugs that stop `fit` under MultiWorkerMirroredStrategy.

    Keras builds metrics by reducing the first *distributed* batch eagerly, which
    MultiWorkerMirroredStrategy cannot do, and reduces scalar metrics along axis 0
    (keras-team/keras#20585). The patches live in `pipeline.compat`, which fails loudly
    when the installed Keras no longer has what they patch; the two-worker test fails if
    Keras changes the behaviour itself.
    """
    compat.build_for_multi_worker_fit(model, strategy, local_batch)
    compat.patch_multi_worker_reduce()

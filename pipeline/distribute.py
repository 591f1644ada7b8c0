"""`train.strategy`: the `tf.distribute` strategy a run trains under."""

from __future__ import annotations

import json
import os
from typing import Any

from pipeline.errors import ConfigError


def make_strategy(name: str) -> Any:
    """The strategy for `train.strategy=name`; `multi_worker` must be made before other TF ops."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ConfigError(
                "train.strategy='multi_worker' needs the TF_CONFIG environment variable "
                '(for example {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                '"task": {"type": "worker", "index": 0}}); set it on every worker, or use '
                "train.strategy=mirrored on one machine"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
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
    raise ConfigError(f"train.strategy={name!r}: expected default, one_device, mirrored, multi_worker or tpu")


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
    (keras-team/keras#20585). We build from a local batch inside the strategy's scope and
    reduce scalars over replicas instead. The two-worker test fails if Keras changes here.
    """
    with strategy.scope():
        model._symbolic_build(data_batch=local_batch)
    model._maybe_symbolic_build = lambda *args, **kwargs: None
    _patch_scalar_reduction()


def _patch_scalar_reduction() -> None:
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer.reduce_per_replica, "_pipeline_patched", False):
        return
    original = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None)
                if isinstance(v, tf.distribute.DistributedValues)
                else v,
                values,
            )
        return original(values, strategy, reduction)

    reduce_per_replica._pipeline_patched = True
    trainer.reduce_per_replica = reduce_per_replica

"""`train.strategy`: the `tf.distribute` strategy a run trains under."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Literal

from pipeline import compat
from pipeline.errors import ConfigError

Cluster = Literal["tf_config", "slurm"]
# What SlurmClusterResolver reads: srun sets them in each task of a job step.
SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE")


def make_strategy(name: str, cluster: Cluster = "tf_config", cluster_port: int = 8888) -> Any:
    """The strategy for `train.strategy=name`; `multi_worker` must be made before other TF ops.

    `name` is a `pipeline.train.Strategy`, checked against that enum with the rest of the
    config before TensorFlow is imported; each value has one small builder below. `cluster`
    and `cluster_port` tell `multi_worker` where to find its workers.
    """
    if name == "multi_worker":
        return _multi_worker(cluster, cluster_port)
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


def _multi_worker(cluster: Cluster, cluster_port: int) -> Any:
    import tensorflow as tf

    if cluster == "slurm":
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=_slurm_resolver(cluster_port))
    if "TF_CONFIG" not in os.environ:
        raise ConfigError(
            "train.strategy='multi_worker' with train.cluster='tf_config' needs the TF_CONFIG "
            'environment variable (for example {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}); set it on every worker (a Kubernetes TFJob '
            "does), set train.cluster=slurm under srun, or use train.strategy=mirrored on one machine"
        )
    return tf.distribute.MultiWorkerMirroredStrategy()


def _slurm_resolver(cluster_port: int) -> Any:
    """The workers of this srun job step: one per task, at `host:cluster_port + i` for a node's i-th task."""
    import tensorflow as tf

    missing = [name for name in SLURM_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(
            f"train.cluster='slurm' needs the variables srun sets in each task; not set: {', '.join(missing)}. "
            "Start one worker per task with srun inside an sbatch job (README: Strategies), "
            "or set train.cluster=tf_config and TF_CONFIG"
        )
    resolvers = tf.distribute.cluster_resolver
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None and shutil.which("nvidia-smi") is not None:
        return resolvers.SlurmClusterResolver(port_base=cluster_port)  # shares the node's GPUs among its tasks
    gpus = len([device for device in (visible or "").split(",") if device.strip()])
    # SLURM_STEP_TASKS_PER_NODE reads like "2(x3),1".
    tasks = max(int(part.split("(")[0]) for part in os.environ["SLURM_STEP_TASKS_PER_NODE"].split(","))
    if gpus >= tasks:
        return resolvers.SlurmClusterResolver(port_base=cluster_port, gpus_per_node=gpus)
    # Fewer GPUs than tasks: none, or srun bound each task to its own. The resolver places a
    # node's tasks by GPU, so give each a nominal one, and tell the strategy what it really sees.
    slurm = resolvers.SlurmClusterResolver(port_base=cluster_port, gpus_per_node=tasks, gpus_per_task=1,
                                           auto_set_gpu=False)
    cluster_spec = slurm.cluster_spec()
    task_type, task_id = slurm.get_task_info()
    return resolvers.SimpleClusterResolver(cluster_spec, task_type=task_type, task_id=task_id,
                                           num_accelerators={"GPU": gpus}, rpc_layer="grpc")


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
    "multi_worker": _multi_worker,  # called with the cluster settings, by make_strategy
    "tpu": _tpu,
}


def is_chief(name: str, cluster: Cluster = "tf_config") -> bool:
    """Whether this process logs and exports: always, except non-chief multi-worker tasks."""
    if name != "multi_worker":
        return True
    if cluster == "slurm":  # SlurmClusterResolver makes every task a worker, indexed by rank
        return int(os.environ.get("SLURM_PROCID", "0")) == 0
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

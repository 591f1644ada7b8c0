"""The Ray launcher: each job of a multirun runs as one Ray task, in a process of its own.

# python -m pipeline -m hydra/launcher=ray hydra.launcher.address=auto seed=0,1,2,3

Hydra imports this module when it looks for plugins, so Ray is imported only in `launch`.
No `from __future__ import annotations`: Hydra's plugin scan runs the module before it is in
`sys.modules`, where `dataclass` looks string annotations up.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.pipeline_ray_launcher.ray_launcher.RayLauncher"
    # null: a Ray instance on this machine, for this sweep only; auto: the cluster this machine
    # joined (ray start); host:6379 or ray://host:10001: that cluster's head
    address: str | None = None
    num_cpus: float = 1  # reserved per job: Ray runs (cluster CPUs / num_cpus) jobs at once
    num_gpus: float = 0  # per job; 1 gives each job a GPU of its own
    init: dict[str, Any] = field(default_factory=dict)  # more ray.init() arguments, e.g. runtime_env
    remote: dict[str, Any] = field(default_factory=dict)  # more ray.remote() options, e.g. memory


ConfigStore.instance().store(group="hydra/launcher", name="ray", node=RayLauncherConf, provider="pipeline")


class RayLauncher(Launcher):
    """Runs a multirun's jobs as Ray tasks and waits for all of them.

    Each task calls Hydra's `run_job` in a fresh worker process (`max_calls=1`: TensorFlow
    gives back its memory and GPU only when its process ends), so the jobs' callbacks, output
    directories and return values are those of the basic launcher.

    Args:
        address: the Ray cluster to use (`ray.init(address=...)`); None starts a local one.
        num_cpus: CPUs Ray reserves for each job.
        num_gpus: GPUs Ray reserves for each job.
        init: further keyword arguments of `ray.init`.
        remote: further options of `ray.remote` for the job's task.

    Example:
        >>> # ray start --head --port 6379   (then on each other machine: ray start --address head:6379)
        >>> # python -m pipeline -m hydra/launcher=ray hydra.launcher.address=auto seed=0,1,2,3
    """

    def __init__(self, address: str | None = None, num_cpus: float = 1, num_gpus: float = 0,
                 init: Any = None, remote: Any = None) -> None:
        self.address = address
        self.init = _plain(init)
        self.remote = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_calls": 1, **_plain(remote)}
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if not ray.is_initialized():  # a later batch of the same sweep reuses the connection
            ray.init(address=self.address, **self.init)
        task = ray.remote(**self.remote)(_execute_job)
        log.info("Ray is launching %d jobs (%s), sweep output dir: %s", len(job_overrides),
                 ", ".join(f"{k}={v}" for k, v in self.remote.items()), sweep_dir)
        state = Singleton.get_state()
        pending = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            pending.append(task.remote(idx, list(overrides), self.hydra_context, self.config,
                                       self.task_function, state))
        return ray.get(pending)


def _execute_job(idx: int, overrides: list[str], hydra_context: HydraContext, config: DictConfig,
                 task_function: TaskFunction, singleton_state: dict[Any, Any]) -> JobReturn:
    """One job, in a Ray worker: what the joblib launcher does in a loky worker."""
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = hydra_context.config_loader.load_sweep_config(config, overrides)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    return run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


def _plain(value: Any) -> dict[str, Any]:
    """A config node as the plain dict that Ray's functions take."""
    if value is None:
        return {}
    return dict(OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value)

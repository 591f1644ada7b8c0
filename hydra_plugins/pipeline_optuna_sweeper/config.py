"""The `hydra/sweeper=optuna` option: the keys of `OptunaSweeper`, with their defaults.

Hydra imports every module under `hydra_plugins` at start-up, so this one imports nothing
heavy (Optuna is imported when a sweep starts). Hydra runs these modules without entering
them in `sys.modules`, so no `from __future__ import annotations` here: dataclasses would
look their string annotations up there.
"""


from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.pipeline_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sweeper builds the sampler (a grid needs the params) and pruner
    direction: str = "minimize"  # or maximize: what to do with the value the job returns
    study_name: Optional[str] = None  # null: Optuna names it (a rerun then starts a new study)
    storage: Optional[str] = None  # null: sqlite in the sweep directory (one study per sweep)
    n_trials: int = 20  # in the study in all: a rerun continues it up to this many
    n_jobs: int = 1  # trials launched together (a parallel launcher runs them at once)
    max_failure_rate: float = 0.0  # stop the sweep once more than this fraction of its trials failed
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None})
    pruner: Any = None  # e.g. {_target_: optuna.pruners.MedianPruner}; null: trials run all epochs
    params: Optional[Dict[str, str]] = None  # key: interval(..) | tag(log, interval(..)) | choice(..) | range(..)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf,
                             provider="pipeline_optuna_sweeper")

"""Hydra's side of `python -m pipeline`: its start-up errors as one line, its run directory tidied.

Hydra composes the config and creates the run directory before any code of ours runs. Its
own errors (an unknown key or option, a bad override, a run directory it cannot write) are
printed by Hydra over several lines with exit status 1; `start_error` turns each into the
one `error:` line that every other user mistake gets. A run that fails before writing
anything, or that writes into another directory (a resume), leaves Hydra's directory
holding only Hydra's files; `tidy_run_dir` removes it, keeping the log beside the run.
"""

from __future__ import annotations

import difflib
import logging
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from pipeline.errors import PipelineError, describe_write_fault, is_disk_full, write_fault
from pipeline.files import LOCK_FILE

log = logging.getLogger("pipeline")
_HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}  # what Hydra writes in `.hydra/`


def start_error(error: BaseException) -> str | None:
    """One line for a mistake that Hydra reports before the run starts; None for anything else."""
    from hydra.errors import (
        ConfigCompositionException,
        HydraException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, PipelineError):  # raised by a sweeper of ours, before or between its jobs
        return str(error)
    if isinstance(error, OverrideParseException):
        return (
            f"the override {error.override!r} is not valid override syntax ({_first_line(error.message)}): "
            "write key=value or group=option, and quote a value with brackets or spaces for the "
            "shell, for example 'data.classes=[5,6,7]'"
        )
    if isinstance(error, MissingConfigException):
        return _unknown_option(error)
    if isinstance(error, ConfigCompositionException) and "To append to your config use +" in str(error):
        return _unknown_key(error)
    if isinstance(error, HydraException):
        text = str(error).split("\nConfig search path")[0]
        return (
            f"the overrides do not compose: {' '.join(text.split())} "
            "(`python -m pipeline --help` lists the groups, their options and the keys)"
        )
    if isinstance(error, OmegaConfBaseException) and str(getattr(error, "full_key", "")).startswith("hydra."):
        # Resolved by Hydra itself (hydra.run.dir=${...}); our own keys are checked by config.validate.
        return (
            f"{error.full_key} could not be resolved ({_first_line(str(error))}): fix its "
            "${...} interpolation, or give a plain path"
        )
    # Hydra creates the run directory and opens its log there before calling us; the log
    # handler's failure arrives as a ValueError raised from the OSError.
    handler = isinstance(error, ValueError) and str(error).startswith("Unable to configure handler")
    fault = write_fault(error) if isinstance(error, OSError) or handler else None
    if fault is None:
        return None
    if is_disk_full(fault):
        return f"{describe_write_fault(fault)} (the run directory); free space and run the same command again"
    return (
        f"cannot write the run directory: {describe_write_fault(fault)}. Make its folder writable, "
        "or choose a writable one with hydra.run.dir=... (hydra.sweep.dir=... for -m)"
    )


def _unknown_key(error: BaseException) -> str:
    """`train.epoch=3`: the key, the keys of its group that are close, and `+key=value`."""
    cause = error.__cause__
    override = str(error).split("To append to your config use +", 1)[1].strip()
    key = getattr(cause, "full_key", None) or override.split("=", 1)[0].lstrip("+~")
    name = key.rsplit(".", 1)[-1]
    group = key.rsplit(".", 1)[0] if "." in key else ""
    parent = getattr(cause, "parent_node", None)
    keys = sorted(k for k in (parent.keys() if isinstance(parent, Mapping) else [])
                  if isinstance(k, str) and not k.startswith("_") and k != "hydra")
    close = difflib.get_close_matches(name, keys, n=3, cutoff=0.6)
    where = f"in {group}" if group else "at the top level"
    if close:
        hint = "did you mean " + " or ".join(_dotted(group, k) for k in close) + "?"
    else:
        hint = f"{group or 'the config'} has {', '.join(keys)}." if keys else "check the spelling."
    return (
        f"{override}: there is no key {key!r} {where}; {hint} To add a new key on purpose, "
        f"write +{override}"
    )


def _unknown_option(error) -> str:
    """`data=digitz`: the options of the group, the close ones first."""
    missing = str(getattr(error, "missing_cfg_file", "") or "")
    options = sorted(getattr(error, "options", None) or [])
    if "/" not in missing or not options:
        return f"the overrides do not compose: {_first_line(str(error))}"
    group, option = missing.rsplit("/", 1)
    close = difflib.get_close_matches(option, options, n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(f'{group}={c}' for c in close)}?" if close else "."
    return (
        f"{group}={option}: there is no option {option!r} in group {group}{hint} The options are: "
        f"{', '.join(options)} (conf/{group}/<option>.yaml; `python -m pipeline --help` lists all groups)"
    )


def tidy_run_dir(hydra_dir: Path, own_files: Iterable[str], run_dir: Path | None, resumed: bool) -> bool:
    """Removes Hydra's run directory when it holds nothing but Hydra's own files; True if removed.

    Hydra creates `hydra_dir` (with `.hydra/` and the job's log) before the run starts. A run
    that failed before writing anything of its own leaves only that; so does a run that
    wrote into another directory (`run_dir`: the resumed run's, or an `output_dir` set
    elsewhere), which first gets a copy of the log (`resume-<name>.log` for a resume). A
    directory holding anything else, or whose log cannot be kept, stays as it is.

    Args:
        own_files: the names Hydra writes at the top of `hydra_dir`: its output subdirectory
            (`.hydra`) and the job's log (`pipeline.log`).
    """
    hydra_dir = Path(hydra_dir)
    own = set(own_files) | {LOCK_FILE}  # the lock of a run that stopped before writing
    try:
        entries = list(hydra_dir.iterdir())
        if not all(entry.name in own and _only_hydra_files(entry) for entry in entries):
            return False
        logs = [entry for entry in entries if entry.is_file() and entry.suffix == ".log"]
        if run_dir is not None and logs and Path(run_dir).resolve() != hydra_dir.resolve():
            kind = "resume" if resumed else logs[0].stem
            shutil.copyfile(logs[0], Path(run_dir) / f"{kind}-{hydra_dir.name}.log")
        shutil.rmtree(hydra_dir)
    except OSError as error:  # tidying is a courtesy: never the reason a run fails
        log.debug("kept %s (%s)", hydra_dir, error)
        return False
    return True


def _only_hydra_files(entry: Path) -> bool:
    if entry.is_symlink():
        return False
    if entry.is_dir():
        return all(child.is_file() and child.name in _HYDRA_FILES for child in entry.iterdir())
    return entry.is_file()


def _dotted(group: str, key: str) -> str:
    return f"{group}.{key}" if group else key


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")

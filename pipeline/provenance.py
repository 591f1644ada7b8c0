"""What a run records about itself so that it can be found, resumed and rerun faithfully.

Tags: the command line, package versions, the git commit and whether the tree was dirty,
the host and process id (to tell a killed run from a live one), and a fingerprint of the
resolved config (to find the run that the same command started before).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tensorflow", "keras", "tensorflow-hub", "tf-keras", "mlflow", "hydra-core", "numpy")
# Keys that name where or how verbosely a run happens, not what it computes (`extract` is
# `pipeline.extract`'s group: a training run never reads it).
_NOT_IDENTITY = ("output_dir", "resume", "hydra", "extract")
_NOT_IDENTITY_NESTED = (("tracking", "run_name"), ("train", "verbose"))


def config_fingerprint(resolved: Mapping[str, Any]) -> str:
    """A digest of the resolved config, without run-specific keys (output_dir, resume)."""
    identity = {k: v for k, v in resolved.items() if k not in _NOT_IDENTITY}
    for group, key in _NOT_IDENTITY_NESTED:
        if isinstance(identity.get(group), Mapping):
            identity[group] = {k: v for k, v in identity[group].items() if k != key}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def environment_tags() -> dict[str, str]:
    """Command line, package versions, git state, host and process of this run."""
    tags = {
        "command": shlex.join(["python", "-m", "pipeline", *sys.argv[1:]]),
        "mlflow.source.name": "pipeline",
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
    }
    for package in PACKAGES:
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[f"version.{package}"] = "not installed"
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    return tags


def is_alive(tags: Mapping[str, str]) -> bool:
    """Whether the process that opened a run still runs (only knowable on the same host)."""
    if tags.get("host") != socket.gethostname() or not tags.get("pid", "").isdigit():
        return False
    try:
        os.kill(int(tags["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


COMPARED = {
    "data.fingerprint": "the data (files, sizes, contents or split)",
    "source.fingerprint": "the source model (structure or weights)",
    "mlflow.source.git.commit": "the git commit",
    "git.dirty": "uncommitted changes in the tree",
    **{f"version.{p}": f"the {p} version" for p in PACKAGES},
}


def differences(original: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """One sentence per recorded fact that differs between two runs' tags."""
    found = []
    for key, meaning in COMPARED.items():
        if key in original and key in current and original[key] != current[key]:
            found.append(f"{meaning} differs: {key} was {original[key]!r}, now {current[key]!r}")
    return found


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""

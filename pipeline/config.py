"""Config checks that run before TensorFlow is imported.

The `_target_` of each node is the registry and its constructor signature is the schema:
every key of a node must be a parameter of its target, and every value must fit the
parameter's annotation. Required values are `???` in the YAML. Targets outside this
package (a Keras optimizer) are checked when they are built, which is still before the
first weight is loaded: importing them would import TensorFlow.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import ConfigError

ASSETS = Path(__file__).parent / "assets"


def _asset(name: str) -> str:
    path = ASSETS / name
    if not path.exists():
        raise ConfigError(
            f"${{asset:{name}}}: no asset '{name}' in {ASSETS}; "
            f"available: {sorted(p.name for p in ASSETS.iterdir()) if ASSETS.exists() else []}. "
            "Rebuild the demo source with `python scripts/build_demo_source.py`."
        )
    return str(path)


def register_resolvers() -> None:
    """`${asset:NAME}`: the absolute path of a model that ships inside the package."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", _asset)


register_resolvers()


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Check the whole config and return it resolved, as plain containers.

    Raises:
        ConfigError: naming the key, the value received, what is allowed and the fix.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        keys = ", ".join(missing)
        raise ConfigError(
            f"required config value(s) not set: {keys}. Set each on the command line "
            f"(for example `python -m pipeline {missing[0]}=...`) or in an experiment file."
        )
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except ConfigError:
        raise
    except Exception as error:  # omegaconf raises several types, all with the key in them
        raise ConfigError(f"config could not be resolved: {error}") from error
    _check_node(resolved, prefix="")
    _check_text_data(resolved.get("data") or {})
    _check_combination(resolved)
    return resolved


def _check_text_data(data: Mapping[str, Any]) -> None:
    """Values of the text data keys that their types cannot rule out: an encoding Python
    does not know (`data.encoding=utf8x`), `data.max_chars` below 1."""
    if "encoding" in data or data.get("max_chars") is not None:
        from pipeline.data.text import text_settings  # no TensorFlow

        text_settings(data.get("encoding", "utf-8"), data.get("max_chars"))


def _check_combination(resolved: Mapping[str, Any]) -> None:
    """Settings of different groups that cannot go together."""
    head, freeze = resolved.get("head") or {}, resolved.get("freeze") or {}
    if head.get("_target_") != "pipeline.heads.SklearnHead":
        return
    if freeze.get("_target_") != "pipeline.freeze.FreezeAll":
        raise ConfigError(
            f"head=sklearn fits a scikit-learn classifier on the frozen backbone's features, but "
            f"freeze is {freeze.get('_target_')!r}, which trains backbone weights: set freeze=all."
        )
    from pipeline.heads import linear_config

    formats = [f for f in (resolved.get("export") or {}).get("formats") or () if f != "saved_model"]
    if formats and not linear_config(head.get("estimator") or {}):
        raise ConfigError(
            f"export.formats includes {', '.join(map(str, formats))}, but head.estimator "
            f"{(head.get('estimator') or {}).get('_target_')!r} is not linear: it is served as a SavedModel "
            "of the backbone plus estimator.skops, which only export.formats=[saved_model] writes. "
            "Set that, or use a linear estimator (LogisticRegression, LinearSVC, RidgeClassifier)."
        )


def build(cfg: DictConfig, group: str) -> Any:
    """The object that config group `group` describes (`hydra.utils.instantiate`).

    Raises:
        ConfigError: the target refused its keys; names the group and the target. A
            `PipelineError` the target raised itself (already clear) passes unchanged.
    """
    from hydra.utils import instantiate

    from pipeline.errors import PipelineError

    try:
        return instantiate(cfg[group])
    except PipelineError:
        raise
    except Exception as error:
        cause = error.__cause__ or error
        if isinstance(cause, PipelineError):  # a nested node's own, already clear, error
            raise cause from None
        raise ConfigError(
            f"{group}: could not build {cfg[group].get('_target_')} from the config "
            f"({type(cause).__name__}: {cause}). Check the keys of conf/{group}/ "
            "against the target's arguments."
        ) from error


def _check_node(node: Any, prefix: str) -> None:
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if isinstance(target, str) and target.startswith(("pipeline.", "sklearn.")):
            _check_target(node, target, prefix)
        for key, value in node.items():
            if key != "hydra":
                _check_node(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _check_node(value, f"{prefix[:-1]}[{index}].")


def _locate(target: str, key: str) -> Any:
    module_name, _, attribute = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"{key}_target_='{target}' cannot be imported ({error}). "
            "Check the spelling against the files in conf/ or the classes in pipeline/."
        ) from error


def _check_target(node: Mapping[str, Any], target: str, prefix: str) -> None:
    factory = _locate(target, prefix)
    signature = inspect.signature(factory)
    hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    parameters = {
        name: p
        for name, p in signature.parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    for key, value in node.items():
        if key.startswith("_") and key.endswith("_"):
            continue  # Hydra's own keys: _target_, _partial_, _recursive_, ...
        if key not in parameters:
            if takes_any:
                continue
            raise ConfigError(
                f"{prefix}{key}={value!r} is not a setting of {target}; "
                f"allowed keys: {', '.join(sorted(parameters))}. Fix the spelling or remove it."
            )
        hint = hints.get(key, Any)
        if isinstance(value, Mapping) and "_target_" in value:
            continue  # a nested object, checked on its own
        if not _fits(value, hint):
            raise ConfigError(
                f"{prefix}{key}={value!r} has the wrong type: expected {_describe(hint)}. "
                f"Set it like `{prefix}{key}={_example(hint)}`."
            )


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(map(_fits, value, args))
        item = args[0] if args else Any
        return all(_fits(v, item) for v in value)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            return False
        value_hint = args[1] if len(args) == 2 else Any
        return all(_fits(v, value_hint) for v in value.values())
    if origin is not None and callable(value) is False and origin.__module__ == "collections.abc":
        return True  # a Callable etc.: checked when it is built
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin in (list, tuple, Sequence):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    return getattr(hint, "__name__", str(hint))


def _example(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return str(args[0])
    if origin in (Union, types.UnionType):
        return _example(next(a for a in args if a is not type(None)))
    if origin in (list, tuple, Sequence):
        return f"[{_example(args[0]) if args else '...'}]"
    return {bool: "true", int: "10", float: "0.001", str: "NAME"}.get(hint, "...")


def flatten(container: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys to string values, as MLflow params: `{"train.epochs": "10"}`."""
    flat: dict[str, str] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat

"""Which backbone weights fine-tuning may change, and when.

Every backbone is seen as an ordered list of *units*, bottom to top: the weight-holding
layers of a Keras backbone (nested models are walked), or the variable scopes of a TF Hub /
SavedModel backbone (`MobilenetV2/expanded_conv_16/project`). `top_n`, `regex` and `gradual`
choose units; `batchnorm` decides separately whether BatchNorm units train and update their
moving statistics.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

BatchNorm = Literal["frozen", "trainable"]


@dataclass
class Unit:
    """One freezable piece of a backbone: a Keras layer or a SavedModel variable scope."""

    name: str
    variables: list[Any]
    batchnorm: bool
    layer: Any = None  # the Keras layer, or None for a SavedModel variable scope

    def set_trainable(self, trainable: bool) -> None:
        if self.layer is not None:
            self.layer.trainable = trainable
        else:
            for variable in self.variables:
                # Moving statistics are never trainable: they move by training-mode calls.
                variable.trainable = trainable and variable.value.trainable


@dataclass
class FrozenState:
    """What the train stage needs from the freeze setting."""

    units: list[Unit]
    on_epoch_begin: Callable[[int], bool] | None = None  # True when the trainable set changed
    candidates: list[Any] = field(default_factory=list)  # every variable that may ever train
    unfreeze_epochs: tuple[int, ...] = ()  # when on_epoch_begin opens more of the backbone


def backbone_units(backbone: Any) -> list[Unit]:
    """The backbone's units, bottom to top."""
    from pipeline.sources.saved_model_layer import SavedModelLayer

    units: list[Unit] = []
    for layer in _leaf_layers(backbone):
        if isinstance(layer, SavedModelLayer):
            units.extend(_scopes(layer))
        elif layer.weights:
            batchnorm = "BatchNormalization" in type(layer).__name__
            units.append(Unit(layer.name, list(layer.weights), batchnorm, layer))
    return units


def _leaf_layers(model: Any):
    for layer in getattr(model, "layers", []):
        if getattr(layer, "layers", None) and not _is_saved_model_layer(layer):
            yield from _leaf_layers(layer)
        else:
            yield layer


def _is_saved_model_layer(layer: Any) -> bool:
    return type(layer).__name__ == "SavedModelLayer"


def _scopes(layer: Any) -> list[Unit]:
    grouped: dict[str, list[Any]] = {}
    for variable in layer.variables:
        name = variable.value.name.split(":")[0]
        grouped.setdefault(name.rsplit("/", 1)[0] if "/" in name else name, []).append(variable)
    units = []
    for scope, variables in grouped.items():
        leaf_names = {v.value.name.split(":")[0].rsplit("/", 1)[-1] for v in variables}
        units.append(Unit(scope, variables, bool(leaf_names & {"moving_mean", "moving_variance"})))
    return units


def _prepare(backbone: Any, batchnorm: BatchNorm) -> list[Unit]:
    """Unfreeze the backbone container, freeze every unit; the caller then opens some."""
    backbone.trainable = True
    units = backbone_units(backbone)
    for unit in units:
        unit.set_trainable(False)
    # A SavedModel runs as one function: with BatchNorm frozen it is called in inference
    # mode, so its moving statistics stay fixed (and its dropout is off).
    for layer in _leaf_layers(backbone):
        if _is_saved_model_layer(layer):
            layer.inference_mode = batchnorm == "frozen"
    return units


def _open(units: list[Unit], chosen: list[Unit], batchnorm: BatchNorm) -> None:
    for unit in chosen:
        unit.set_trainable(batchnorm == "trainable" or not unit.batchnorm)


def _trainable_when_open(backbone: Any, units: list[Unit], chosen: list[Unit], batchnorm: BatchNorm) -> list[Any]:
    """The variables Keras would train with `chosen` open (units are left closed)."""
    _open(units, chosen, batchnorm)
    variables = list(backbone.trainable_weights)
    for unit in chosen:
        unit.set_trainable(False)
    return variables


class FreezeAll:
    """Keep every backbone weight fixed and train the head alone (feature extraction).

    The backbone also runs in inference mode, so BatchNorm statistics stay fixed.

    Example:
        >>> FreezeAll().apply(backbone)
    """

    def apply(self, backbone: Any) -> FrozenState:
        units = backbone_units(backbone)
        backbone.trainable = False
        return FrozenState(units)


class FreezeNone:
    """Fine-tune every backbone weight together with the head.

    Args:
        batchnorm: `frozen` keeps BatchNorm layers in inference mode with fixed moving
            statistics and scale/offset (the safe choice when fine-tuning on small
            batches); `trainable` lets them train and update their statistics.

    Example:
        >>> FreezeNone(batchnorm="frozen").apply(backbone)
    """

    def __init__(self, batchnorm: BatchNorm = "frozen"):
        self.batchnorm = batchnorm

    def apply(self, backbone: Any) -> FrozenState:
        units = _prepare(backbone, self.batchnorm)
        _open(units, units, self.batchnorm)
        return FrozenState(units, candidates=list(backbone.trainable_weights))


class TopN:
    """Fine-tune the top `n` units (layers, or variable scopes of a SavedModel); freeze the rest.

    Args:
        n: how many weight-holding units, counted from the top, train.
        batchnorm: `frozen` or `trainable`, as for `freeze=none`.

    Example:
        >>> TopN(n=10).apply(backbone)  # the last 10 weight layers train
    """

    def __init__(self, n: int, batchnorm: BatchNorm = "frozen"):
        self.n = n
        self.batchnorm = batchnorm

    def apply(self, backbone: Any) -> FrozenState:
        units = _prepare(backbone, self.batchnorm)
        chosen = units[len(units) - self.n :] if self.n > 0 else []
        _open(units, chosen, self.batchnorm)
        return FrozenState(units, candidates=list(backbone.trainable_weights))


class Regex:
    """Fine-tune the units whose name matches any of `patterns` (`re.search`); freeze the rest.

    Unit names are Keras layer names (`block_16_project`, `conv5_block3_out`) or, for TF Hub
    and SavedModel backbones, variable scopes (`MobilenetV2/expanded_conv_16/project`).
    `python -m pipeline.inspect` lists them.

    Args:
        patterns: regular expressions; a pattern that matches no unit is an error.
        batchnorm: `frozen` or `trainable`, as for `freeze=none`.

    Example:
        >>> Regex(patterns=["block_1[56]", "Conv_1"]).apply(backbone)
    """

    def __init__(self, patterns: list[str], batchnorm: BatchNorm = "frozen"):
        self.patterns = list(patterns)
        self.batchnorm = batchnorm

    def apply(self, backbone: Any) -> FrozenState:
        units = _prepare(backbone, self.batchnorm)
        chosen = _matching(units, self.patterns, "freeze.patterns")
        _open(units, chosen, self.batchnorm)
        return FrozenState(units, candidates=list(backbone.trainable_weights))


class Gradual:
    """Start with the backbone frozen; at each epoch in `epochs`, unfreeze the next group.

    Groups are the next `units_per_step` units from the top, or, when `patterns` is given,
    the units matching `patterns[i]` at `epochs[i]`. One optimizer serves the whole run, so
    its state, the learning-rate schedule, callbacks and the MLflow step axis carry on.

    Args:
        epochs: 0-based epochs at which a group is unfrozen, ascending.
        units_per_step: units unfrozen at each of `epochs` (when `patterns` is null).
        patterns: one regular expression per epoch in `epochs`, choosing that step's units.
        batchnorm: `frozen` or `trainable`, as for `freeze=none`.

    Example:
        >>> Gradual(epochs=[3, 6], units_per_step=4)  # head alone, then top 4, then top 8
    """

    def __init__(
        self,
        epochs: list[int],
        units_per_step: int = 1,
        patterns: list[str] | None = None,
        batchnorm: BatchNorm = "frozen",
    ):
        from pipeline.errors import ConfigError

        if list(epochs) != sorted(set(epochs)) or any(e < 0 for e in epochs):
            raise ConfigError(
                f"freeze.epochs={list(epochs)!r}: expected distinct epochs >= 0 in ascending "
                "order, for example [3, 6]"
            )
        if patterns is not None and len(patterns) != len(epochs):
            raise ConfigError(
                f"freeze.patterns has {len(patterns)} entries but freeze.epochs has "
                f"{len(epochs)}: give one pattern per unfreezing epoch"
            )
        self.epochs = list(epochs)
        self.units_per_step = units_per_step
        self.patterns = patterns
        self.batchnorm = batchnorm

    def apply(self, backbone: Any) -> FrozenState:
        units = _prepare(backbone, self.batchnorm)
        groups = self._groups(units)
        steps = dict(zip(self.epochs, groups))

        def on_epoch_begin(epoch: int) -> bool:
            if epoch not in steps:
                return False
            _open(units, steps[epoch], self.batchnorm)
            return True

        chosen = [unit for group in groups for unit in group]
        candidates = _trainable_when_open(backbone, units, chosen, self.batchnorm)
        return FrozenState(units, on_epoch_begin, candidates, tuple(self.epochs))

    def _groups(self, units: list[Unit]) -> list[list[Unit]]:
        if self.patterns is not None:
            return [_matching(units, [p], "freeze.patterns") for p in self.patterns]
        groups, top = [], len(units)
        for _ in self.epochs:
            groups.append(units[max(top - self.units_per_step, 0) : top])
            top -= self.units_per_step
        return groups


def _matching(units: list[Unit], patterns: list[str], key: str) -> list[Unit]:
    from pipeline.errors import ConfigError

    chosen: list[Unit] = []
    for pattern in patterns:
        try:
            matched = [u for u in units if re.search(pattern, u.name)]
        except re.error as error:
            raise ConfigError(f"{key}: {pattern!r} is not a valid regular expression ({error})") from error
        if not matched:
            sample = ", ".join(u.name for u in units[-8:])
            raise ConfigError(
                f"{key}: {pattern!r} matches no backbone unit. The top units are: {sample}. "
                "`python -m pipeline.inspect` lists them all."
            )
        chosen.extend(u for u in matched if u not in chosen)
    return chosen

"""`hydra.sweeper.params` and the command line's sweeps, read with Hydra's override parser.

Each key is one override: `interval(a, b)` (`tag(log, ...)` for a log scale, `tag(int, ...)`
for integers), `choice(a, b, ...)` (also `a,b,...`) or `range(start, stop[, step])` become a
distribution the sampler draws from; a plain value is passed to every trial as it is. The
command line wins over `params` for the same key.
"""


import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

from pipeline.errors import ConfigError

_PLAIN = re.compile(r"[A-Za-z_/][\w./:@-]*")  # a string that needs no quotes in an override
_NOT_STRINGS = {"true", "false", "null", "inf", "nan"}  # bare, these parse as other types


@dataclass(frozen=True)
class SearchSpace:
    """What each trial draws (`distributions`, by override key) and what all trials share (`fixed`)."""

    distributions: dict[str, Any]
    fixed: list[str]
    grid: dict[str, list[Any]] | None  # the values of each key, when all are enumerable

    @classmethod
    def parse(cls, params: Mapping[str, str] | None, arguments: Sequence[str]) -> "SearchSpace":
        """`hydra.sweeper.params` (`{key: override value}`), then the command line's overrides."""
        lines = [f"{key}={value}" for key, value in (params or {}).items()]
        by_key: dict[str, Override] = {}
        for override in OverridesParser.create().parse_overrides([*lines, *arguments]):
            by_key[override.get_key_element()] = override  # the command line comes last: it wins
        distributions, fixed, grid = {}, [], {}
        for key, override in by_key.items():
            if not override.is_sweep_override():
                fixed.append(override.input_line or f"{key}={override.get_value_element_as_str()}")
                continue
            distributions[key], values = _distribution(key, override)
            if grid is not None:
                grid = {**grid, key: values} if values is not None else None
        return cls(distributions, fixed, grid)

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The overrides of a trial whose sampled values are `params` (keyed like `distributions`)."""
        return [*self.fixed, *(f"{key}={_format(value)}" for key, value in params.items())]


def _distribution(key: str, override: Override) -> tuple[Any, list[Any] | None]:
    """Optuna's distribution for a sweep override, and its values when they can be listed."""
    import optuna.distributions as d

    sweep = override.value()
    tags = sweep.tags if sweep is not None else set()
    try:
        if isinstance(sweep, ChoiceSweep):
            choices = list(override.sweep_iterator())  # quoted strings come back as str
            for choice in choices:
                if choice is not None and not isinstance(choice, (bool, int, float, str)):
                    raise ValueError(f"choice {choice!r} is not a number, string, bool or null")
            return d.CategoricalDistribution(choices), choices
        if isinstance(sweep, RangeSweep):
            values = list(override.sweep_iterator())
            if not values:
                raise ValueError("the range is empty")
            step = sweep.step
            if all(isinstance(v, int) for v in values) and float(step).is_integer():
                return d.IntDistribution(values[0], values[-1], step=int(step), log="log" in tags), values
            return d.FloatDistribution(float(min(values)), float(max(values)), step=float(step)), values
        if isinstance(sweep, IntervalSweep):
            if "int" in tags:
                return d.IntDistribution(int(sweep.start), int(sweep.end), log="log" in tags), None
            return d.FloatDistribution(float(sweep.start), float(sweep.end), log="log" in tags), None
    except ValueError as error:
        raise ConfigError(
            f"hydra.sweeper.params: {override.input_line!r} is not a search space Optuna can draw from "
            f"({error}). Use interval(low, high), tag(log, interval(low, high)), tag(int, interval(low, "
            "high)), choice(a, b, ...) or range(start, stop, step)."
        ) from error
    raise ConfigError(
        f"hydra.sweeper.params: {override.input_line!r} is a sweep the optuna sweeper does not know "
        f"(key {key}). Use interval(..), tag(log, interval(..)), choice(..) or range(..)."
    )


def _format(value: Any) -> str:
    """`value` as the value part of an override that parses back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _NOT_STRINGS:
        return text  # group options stay bare (head=mlp)
    return quote(text)


def quote(text: str) -> str:
    """`text` as a quoted override value: always a string."""
    return "'" + text.replace("'", "\\'") + "'"

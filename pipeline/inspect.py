"""`python -m pipeline.inspect [overrides]`: show the source model a run would load, before training.

Takes the same overrides as `python -m pipeline`, checks the config the same way, builds and
loads only `source`, and prints what it is: description, input shape and preprocessing,
feature shape, layer and variable counts, trainable parameters and, for SavedModels, every
signature with its input and output specs and whether `__call__` exists and takes
`training`. Nothing is trained or written.

    python -m pipeline.inspect source=saved_model source.path=/models/x source.input_shape=[224,224,3]
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.errors import ConfigError, PipelineError
from pipeline.types import SourceModel

USAGE = """\
usage: python -m pipeline.inspect [key=value | group=option ...]

Shows the source model a run with the same overrides would load: its signatures and their
input/output specs, layer and variable counts, trainable parameters, and the input size and
preprocessing it expects. Nothing is trained or written.

example: python -m pipeline.inspect source=saved_model source.path=/models/x source.input_shape=[224,224,3]
"""


def describe_source(source: SourceModel, cut_points: bool = False) -> str:
    """Plain text about a loaded source: shapes, preprocessing, counts, SavedModel signatures,
    and with `cut_points` the layers `source.layer` can name."""
    from pipeline.sources.backbone import walk_layers
    from pipeline.sources.saved_model_layer import SavedModelLayer
    from pipeline.sources.signatures import describe_call, describe_signatures, format_signatures

    backbone = source.backbone
    layers = list(walk_layers(backbone))
    trainable = _count(backbone.trainable_weights)
    non_trainable = _count(backbone.non_trainable_weights)
    lines = [
        f"source:            {source.description}",
        *(["input:             text (a batch of raw strings; the tokenizer is inside the backbone)"]
          if source.input_kind == "text" else
          [f"input shape:       {tuple(source.input_shape)} (raw 0-255 pixels, float32)",
           f"preprocessing:     {source.preprocess} (inside the backbone)"]),
        f"feature shape:     {tuple(source.feature_shape)}",
        f"layers:            {len(layers)} ({len(backbone.layers)} at the top level: "
        f"{', '.join(layer.name for layer in backbone.layers)})",
        f"variables:         {len(backbone.weights)} ({len(backbone.trainable_weights)} trainable, "
        f"{len(backbone.non_trainable_weights)} non-trainable)",
        f"parameters:        {trainable + non_trainable:,} "
        f"({trainable:,} trainable, {non_trainable:,} non-trainable)",
    ]
    for layer in layers:
        if isinstance(layer, SavedModelLayer):
            called = f"signature {layer.signature!r}" if layer.signature else "__call__"
            if layer.preprocessor is not None:
                packed = f", packed to {layer.seq_length} positions" if layer.seq_length else ""
                lines.append(f"preprocessor of layer {layer.name!r}: {layer.preprocessor} (called first, "
                             f"never trained{packed})")
            lines += [
                f"SavedModel in layer {layer.name!r}: {layer.handle} (called through {called})",
                "  signatures:",
                format_signatures(describe_signatures(layer.loaded), indent="    "),
                f"  {describe_call(layer.loaded)}",
            ]
    if cut_points and (described := _describe_cut_points(backbone)):
        lines.append(described)
    lines.append(_describe_units(backbone))
    return "\n".join(lines)


def _describe_units(backbone) -> str:
    """The units that freeze=top_n / regex / gradual count and match, top first."""
    from pipeline.freeze import backbone_units

    units = backbone_units(backbone)
    shown = [
        f"    {len(units) - i:>4}  {unit.name}{'  (BatchNorm)' if unit.batchnorm else ''}"
        for i, unit in enumerate(reversed(units))
    ]
    if len(shown) > 40:
        shown = [*shown[:30], f"    ...   ({len(units) - 40} more)", *shown[-10:]]
    return "\n".join([f"freeze units:      {len(units)} (for freeze=top_n/regex/gradual; top first)", *shown])


def _describe_cut_points(backbone) -> str:
    """The layers `source.layer` can name, top first, with their output shapes."""
    from pipeline.sources.cut import block_ends, cut_points, keras_extractor

    model = keras_extractor(backbone)
    points = cut_points(model) if model is not None else []
    if not points:
        return ""
    width = max(len(name) for name, _ in points)
    shown = [f"    {name:<{width}}  {shape}" for name, shape in reversed(points)]
    if len(shown) > 40:  # of the middle, only the layers where blocks end: the usual cuts
        ends = block_ends(model)
        middle = [name for name, _ in reversed(points[10:-30]) if name in ends]
        among = f"; among them, feeding several layers: {', '.join(middle)}" if middle else ""
        shown = [*shown[:30], f"    ...   ({len(points) - 40} more{among})", *shown[-10:]]
    header = f"cut points:        {len(points)} (for source.layer; top first, with output shapes)"
    return "\n".join([header, *shown])


def inspect_source(overrides: Sequence[str]) -> str:
    """Compose and check the config for `overrides`, load its source, and describe it."""
    from pipeline import config

    cfg = compose_config(overrides)
    config.validate(cfg)  # before TensorFlow is imported
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    loaded = config.build(cfg, "source").load()
    return describe_source(loaded, cut_points="layer" in cfg.source)


def compose_config(overrides: Sequence[str]) -> Any:
    """The config `python -m pipeline` would run with these overrides."""
    from hydra import compose, initialize_config_dir

    from pipeline.runner import CONFIG_DIR

    given = list(overrides)
    extra = []
    if not any(o.split("=", 1)[0].lstrip("+~") == "output_dir" for o in given):
        # `${hydra:runtime.output_dir}` only exists inside a Hydra run; inspect writes nothing.
        extra = [f"output_dir={os.devnull}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        try:
            return compose(config_name="config", overrides=[*extra, *given])
        except Exception as error:  # hydra's override and missing-option errors
            reason = str(error).split("\nConfig search path")[0].strip()
            raise ConfigError(
                f"the overrides {' '.join(given)!r} do not compose: {reason}\n"
                "Use the same `group=option` and `key=value` overrides as `python -m pipeline`; "
                "`python -m pipeline --help` lists the groups and options."
            ) from error


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pipeline.inspect [overrides]`; exits 2 with the error on a bad config or source."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE, end="")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        text = inspect_source(argv)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(text, flush=True)


def _count(weights) -> int:
    total = 0
    for weight in weights:
        size = 1
        for dim in weight.shape:
            size *= int(dim)
        total += size
    return total


if __name__ == "__main__":
    from pipeline.quick_exit import exit_after

    exit_after(main)

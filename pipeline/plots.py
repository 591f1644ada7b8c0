"""PNG pictures of a run: a confusion matrix and the training curves.

Drawn on a bare `matplotlib.figure.Figure` (no pyplot), so nothing depends on a display or
on global plotting state; matplotlib is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

_MAX_ANNOTATED = 20  # more rows than this and the counts would not be legible


def heatmap(
    matrix: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    path: Path,
    title: str,
    xlabel: str = "predicted class",
    ylabel: str = "true class",
) -> Path:
    """A matrix of counts as a colored grid with the counts written in (a confusion matrix).

    Colors are per-row fractions, so a rare class's row is as readable as a common one's.

    Example:
        >>> heatmap([[5, 1], [0, 4]], ["cat", "dog"], ["cat", "dog"], Path("cm.png"), "test")
    """
    import numpy as np
    from matplotlib.figure import Figure

    counts = np.asarray(matrix, dtype="float64")
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    size = max(4.0, 0.45 * max(counts.shape) + 2.5)
    figure = Figure(figsize=(size * max(1.0, counts.shape[1] / counts.shape[0]) ** 0.5, size))
    axes = figure.add_subplot()
    image = axes.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the row")
    axes.set_xticks(range(counts.shape[1]), labels=list(column_labels), rotation=45, ha="right")
    axes.set_yticks(range(counts.shape[0]), labels=list(row_labels))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    if max(counts.shape) <= _MAX_ANNOTATED:
        for (row, column), count in np.ndenumerate(counts):
            color = "white" if fractions[row, column] > 0.5 else "black"
            axes.text(column, row, f"{count:g}", ha="center", va="center", color=color, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return Path(path)


def training_curves(history: Mapping[str, Sequence[float]], path: Path) -> Path:
    """One panel per metric of a Keras history, training and validation over the epochs.

    Example:
        >>> training_curves({"loss": [1.0, 0.5], "val_loss": [1.1, 0.7]}, Path("curves.png"))
    """
    from matplotlib.figure import Figure

    names = sorted({key.removeprefix("val_") for key in history if history[key]})
    # Loss first, then the rest alphabetically: the panel a reader looks for first.
    names.sort(key=lambda name: (name != "loss", name))
    columns = min(3, max(1, len(names)))
    rows = max(1, -(-len(names) // columns))
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows))
    for index, name in enumerate(names, start=1):
        axes = figure.add_subplot(rows, columns, index)
        series = [(label, list(history.get(key, ()))) for key, label in ((name, "train"), (f"val_{name}", "val"))]
        series = [(label, values) for label, values in series if values]
        for label, values in series:
            axes.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
        axes.set_title(name)
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        if len(series) > 1:
            axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return Path(path)

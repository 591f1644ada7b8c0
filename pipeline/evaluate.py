"""The evaluate stage: final metrics on held-out splits, named by split (`test_accuracy`).

Besides the flat metrics it writes what a reader looks at: each split's confusion matrix
(JSON and PNG) and the training curves (PNG).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.types import AdaptedModel, DataBundle, EvaluationResult

log = logging.getLogger(__name__)
_SPLITS = ("train", "val", "test")


class Evaluator:
    """Scores the trained model on each held-out split and draws what it found.

    Metrics, per split: `loss`, `accuracy`, `top_<k>_accuracy` (multiclass, when `k` is
    below the number of classes), per-class `precision_<class>`, `recall_<class>`,
    `f1_<class>` with their `macro_` means, and `roc_auc` for binary tasks. Class names
    are made safe for MLflow metric names (`"tabby cat"` -> `tabby_cat`).

    Args:
        splits: which splits to score (`val`, `test`).
        top_k: also report whether the true class is among the `k` most probable.
        batch_size: examples per prediction batch.

    Example:
        >>> result = Evaluator(top_k=3).evaluate(adapted, data, Path("run/evaluation"),
        ...                                      history=trained.history)
        >>> result.metrics["test_macro_f1"], result.artifacts
    """

    def __init__(self, splits: list[str] = ("val", "test"), top_k: int = 3, batch_size: int = 256):
        unknown = [s for s in splits if s not in _SPLITS]
        if unknown:
            raise ConfigError(
                f"evaluate.splits={list(splits)!r}: {unknown} are not splits; expected some "
                f"of {', '.join(_SPLITS)}, for example evaluate.splits=[val,test]"
            )
        if top_k < 1:
            raise ConfigError(f"evaluate.top_k={top_k!r}: expected 1 or more, for example evaluate.top_k=3")
        self.splits = list(splits)
        self.top_k = top_k
        self.batch_size = batch_size

    def evaluate(
        self,
        adapted: AdaptedModel,
        data: DataBundle,
        output_dir: Path | None = None,
        history: Mapping[str, Sequence[float]] | None = None,
        features: Mapping[str, Any] | None = None,
    ) -> EvaluationResult:
        """Metrics for each split; with `output_dir`, also confusion matrices and curves there.

        `features` (`TrainResult.features`): the frozen backbone's cached outputs per split;
        a split found there is scored by the head alone on them, the same numbers as the
        full model without running the backbone again.
        """

        from pipeline import plots

        if output_dir is not None:
            output_dir = Path(output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
        metrics: dict[str, float] = {}
        artifacts: list[Path] = []
        names = metric_names(adapted.class_names)
        for split in self.splits:
            cached = features is not None and split in features
            model = adapted.head if cached else adapted.model
            dataset = features[split] if cached else getattr(data, split)
            scored = _predict(model, dataset.batch(self.batch_size))
            if scored is None:  # e.g. data.val_split=0: nothing to score
                log.warning("evaluate: the %s split is empty; no %s_* metrics", split, split)
                continue
            probabilities, labels = scored
            metrics.update(_scores(split, probabilities, labels, adapted.task, self.top_k))
            metrics.update(_class_scores(split, probabilities, labels, adapted.task, names))
            if output_dir is not None:
                artifacts += _write_confusion(
                    split, probabilities, labels, adapted.task, adapted.class_names, output_dir
                )
        if output_dir is not None and history and any(history.values()):
            artifacts.append(plots.training_curves(history, output_dir / "training_curves.png"))
        return EvaluationResult(metrics=metrics, artifacts=tuple(artifacts))


def _predict(model, batches):
    """`(outputs, labels)` of a batched split in one pass: each prediction beside its own label.

    One iteration, so the pairs stay right however tf.data orders the elements
    (`data.deterministic=false` lets parallel decoding reorder them from pass to pass).
    None when the split is empty.
    """
    import numpy as np
    import tensorflow as tf

    call = tf.function(lambda inputs: model(inputs, training=False), reduce_retracing=True)
    outputs, labels = [], []
    for inputs, targets in batches:
        outputs.append(np.asarray(call(inputs)))
        labels.append(targets.numpy())
    if not outputs:
        return None
    return np.concatenate(outputs), np.concatenate(labels)


def metric_names(class_names: Sequence[str]) -> list[str]:
    """Class names as MLflow metric-name parts: letters, digits, `_ - .`; unique, never empty."""
    safe: list[str] = []
    for index, name in enumerate(class_names):
        part = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or f"class_{index}"
        if part in safe:
            part = f"{part}_{index}"
        safe.append(part)
    return safe


def _scores(split, probabilities, labels, task, top_k) -> dict[str, float]:
    import numpy as np

    eps = 1e-7
    p = np.clip(probabilities.astype("float64"), eps, 1 - eps)
    if task != "multiclass":
        y = labels.reshape(p.shape).astype("float64")
        loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
        accuracy = np.mean((p > 0.5) == (y > 0.5))
        return {f"{split}_loss": float(loss), f"{split}_accuracy": float(accuracy)}
    rows = np.arange(len(labels))
    scores = {
        f"{split}_loss": float(-np.mean(np.log(p[rows, labels]))),
        f"{split}_accuracy": float(np.mean(np.argmax(p, axis=1) == labels)),
    }
    if 1 < top_k < p.shape[1]:  # with k >= the number of classes it is trivially 1.0
        top = np.argsort(-p, axis=1)[:, :top_k]
        scores[f"{split}_top_{top_k}_accuracy"] = float(np.mean(np.any(top == labels[:, None], axis=1)))
    return scores


def _predicted(probabilities, task):
    """Class indices (multiclass, binary) or 0/1 bits per label (multilabel)."""
    import numpy as np

    from pipeline.heads import predicted_classes

    return np.asarray(predicted_classes(probabilities, task)).astype("int64")


def _class_scores(split, probabilities, labels, task, names) -> dict[str, float]:
    """Per-class precision, recall and F1 with their macro means; ROC AUC for binary tasks."""
    import numpy as np
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    predicted = _predicted(probabilities, task)
    if task == "multilabel":
        truth = labels.reshape(predicted.shape).astype("int64")
        kwargs = {}
    else:
        truth = labels.reshape(-1).astype("int64")
        kwargs = {"labels": list(range(len(names)))}
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, predicted, average=None, zero_division=0, **kwargs
    )
    scores: dict[str, float] = {}
    for kind, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        scores[f"{split}_macro_{kind}"] = float(np.mean(values))
        scores.update({f"{split}_{kind}_{name}": float(v) for name, v in zip(names, values)})
    if task == "binary":
        if len(np.unique(truth)) == 2:
            scores[f"{split}_roc_auc"] = float(roc_auc_score(truth, probabilities.reshape(-1)))
        else:
            log.warning("evaluate: the %s split holds one class only; no %s_roc_auc", split, split)
    return scores


def _write_confusion(split, probabilities, labels, task, class_names, output_dir) -> list[Path]:
    """`confusion_matrix_<split>.json` and `.png`: rows are true classes, columns predicted."""
    from sklearn.metrics import confusion_matrix, multilabel_confusion_matrix

    from pipeline import plots

    predicted = _predicted(probabilities, task)
    names = [str(name) for name in class_names]
    json_path = output_dir / f"confusion_matrix_{split}.json"
    png_path = output_dir / f"confusion_matrix_{split}.png"
    if task == "multilabel":
        # One 2x2 matrix per label: [[true negatives, false positives], [false negatives, true positives]].
        per_label = multilabel_confusion_matrix(labels.reshape(predicted.shape).astype("int64"), predicted)
        content = {
            "split": split,
            "class_names": names,
            "layout": "per label: [[tn, fp], [fn, tp]] at threshold 0.5",
            "matrices": {name: m.tolist() for name, m in zip(names, per_label)},
        }
        rows = per_label.reshape(len(names), 4)
        plots.heatmap(rows, names, ["TN", "FP", "FN", "TP"], png_path, f"{split}: per label", "", "label")
    else:
        matrix = confusion_matrix(labels.reshape(-1).astype("int64"), predicted, labels=list(range(len(names))))
        content = {
            "split": split,
            "class_names": names,
            "layout": "rows: true class, columns: predicted class",
            "matrix": matrix.tolist(),
        }
        plots.heatmap(matrix, names, names, png_path, f"{split}: confusion matrix")
    json_path.write_text(json.dumps(content, indent=2) + "\n")
    return [json_path, png_path]

"""The evaluate stage: final metrics on held-out splits, named by split (`test_accuracy`)."""

from __future__ import annotations

import logging

from pipeline.errors import ConfigError
from pipeline.types import AdaptedModel, DataBundle

log = logging.getLogger(__name__)
_SPLITS = ("train", "val", "test")


class Evaluator:
    """Loss, accuracy and top-k accuracy of the trained model on each held-out split.

    Args:
        splits: which splits to score (`val`, `test`).
        top_k: also report whether the true class is among the `k` most probable.
        batch_size: examples per prediction batch.

    Example:
        >>> Evaluator(top_k=3).evaluate(adapted, data)["test_accuracy"]
    """

    def __init__(self, splits: list[str] = ("val", "test"), top_k: int = 3, batch_size: int = 256):
        unknown = [s for s in splits if s not in _SPLITS]
        if unknown:
            raise ConfigError(
                f"evaluate.splits={list(splits)!r}: {unknown} are not splits; expected some "
                f"of {', '.join(_SPLITS)}, for example evaluate.splits=[val,test]"
            )
        self.splits = list(splits)
        self.top_k = top_k
        self.batch_size = batch_size

    def evaluate(self, adapted: AdaptedModel, data: DataBundle) -> dict[str, float]:
        import numpy as np

        metrics: dict[str, float] = {}
        for split in self.splits:
            dataset = getattr(data, split).batch(self.batch_size)
            batches = [y.numpy() for _, y in dataset]
            if not batches:  # e.g. data.val_split=0: nothing to score (Keras' predict fails)
                log.warning("evaluate: the %s split is empty; no %s_* metrics", split, split)
                continue
            labels = np.concatenate(batches)
            probabilities = adapted.model.predict(dataset.map(lambda x, y: x), verbose=0)
            metrics.update(_scores(split, probabilities, labels, adapted.task, self.top_k))
        return metrics


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
    k = min(top_k, p.shape[1])
    if k > 1:
        top = np.argsort(-p, axis=1)[:, :k]
        scores[f"{split}_top_{k}_accuracy"] = float(np.mean(np.any(top == labels[:, None], axis=1)))
    return scores

"""The export stage: write the fine-tuned model for serving, verify it, then move it into place.

Everything is written into a temporary directory beside the destination, reloaded and
compared with the in-memory model there, and only then renamed into place: a crash or a
failed check never leaves half an export where a user would look for one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Literal

from pipeline.errors import ExportError
from pipeline.types import AdaptedModel, DataBundle, ExportResult

Format = Literal["saved_model", "keras"]


class Exporter:
    """Writes the model (preprocessing included) in each requested format.

    Args:
        formats: `saved_model` (its `serving_default` signature takes raw 0-255 images of
            the training shape and returns `probabilities` and the top `class_name`) and/or
            `keras` (a `.keras` file for `keras.saving.load_model`).
        tolerance: the largest difference allowed between a reloaded export's probabilities
            and the in-memory model's on the test images.
        verify_examples: how many images the check uses (test images first, then val, train).

    Example:
        >>> Exporter(formats=["saved_model"]).export(adapted, data, Path("run/export"))
    """

    def __init__(
        self,
        formats: list[Format] = ("saved_model",),
        tolerance: float = 1e-5,
        verify_examples: int = 256,
    ):
        self.formats = list(formats)
        self.tolerance = tolerance
        self.verify_examples = verify_examples

    def export(self, adapted: AdaptedModel, data: DataBundle, destination: Path) -> ExportResult:
        import numpy as np

        destination = Path(destination)
        if destination.exists():
            raise ExportError(
                f"{destination} already exists; exports never overwrite. Choose a new run "
                "directory (each Hydra run gets its own) or move the old export away."
            )
        destination.parent.mkdir(parents=True, exist_ok=True)
        # Test images first; the other splits make up for a small or empty test split.
        examples = data.test.concatenate(data.val).concatenate(data.train)
        images = np.concatenate(
            [x.numpy() for x, _ in examples.take(self.verify_examples).batch(256)]
        )
        expected = adapted.model.predict(images, verbose=0)
        # mkdir, not tempfile.mkdtemp: mkdtemp's 0700 mode would follow the export into place
        # and hide it from a server running as another user.
        staging = destination.parent / f".{destination.name}-partial-{uuid.uuid4().hex[:12]}"
        staging.mkdir()
        try:
            (staging / "labels.txt").write_text("\n".join(adapted.class_names) + "\n")
            paths: dict[str, Path] = {}
            differences: dict[str, float] = {}
            for name in self.formats:
                write, reload = _WRITERS[name]
                path = write(adapted, data.input_shape, staging)
                actual = reload(path, images)
                differences[name] = float(np.max(np.abs(actual - expected)))
                if differences[name] > self.tolerance:
                    raise ExportError(
                        f"the {name} export's predictions differ from the in-memory model's by "
                        f"{differences[name]:.3g} (> export.tolerance={self.tolerance}); the "
                        "export was not kept. Raise export.tolerance only if this is expected."
                    )
                paths[name] = destination / path.relative_to(staging)
            os.replace(staging, destination)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return ExportResult(root=destination, paths=paths, max_abs_diff=differences)


def _write_saved_model(adapted: AdaptedModel, input_shape, directory: Path) -> Path:
    import keras
    import tensorflow as tf

    model = adapted.model
    class_names = tf.constant(list(adapted.class_names))

    def serve(images):
        probabilities = model(images, training=False)
        if adapted.task == "binary":
            top = tf.where(probabilities > 0.5, class_names[-1], class_names[0])[:, 0]
        else:  # multiclass, and for multilabel the most probable label
            top = tf.gather(class_names, tf.argmax(probabilities, axis=-1))
        return {"probabilities": probabilities, "class_name": top}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name="serving_default",
        fn=serve,
        input_signature=[tf.TensorSpec((None, *input_shape), tf.float32, name="images")],
    )
    path = directory / "saved_model"
    archive.write_out(str(path), verbose=False)
    return path


def _reload_saved_model(path: Path, images):
    import tensorflow as tf

    serving = tf.saved_model.load(str(path)).signatures["serving_default"]
    return serving(images=tf.constant(images))["probabilities"].numpy()


def _write_keras(adapted: AdaptedModel, input_shape, directory: Path) -> Path:
    path = directory / "model.keras"
    adapted.model.save(path)
    return path


def _reload_keras(path: Path, images):
    import keras

    return keras.saving.load_model(path).predict(images, verbose=0)


_WRITERS = {
    "saved_model": (_write_saved_model, _reload_saved_model),
    "keras": (_write_keras, _reload_keras),
}

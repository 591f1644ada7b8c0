"""The benchmarks' own baselines: what they compare the pipeline against must be sound."""

from __future__ import annotations

import importlib.util

from conftest import PROJECT_ROOT


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_plain_scripts_validation_and_test_images_are_disjoint_also_on_a_small_folder(tmp_path):
    import numpy as np

    folder = _script("benchmark_input").synthetic_folder(tmp_path / "images", 14, (8, 8), classes=2)
    train, val, test, class_names = _script("plain_keras_transfer").datasets(
        str(folder), image_size=8, batch_size=32, val_split=0.2, test_split=0.2, seed=0)

    def images(dataset):  # each image's pixels, as a key; read twice, as fit and evaluate do
        return [x.tobytes() for batch, _ in dataset for x in batch.numpy().astype(np.uint8)]

    held = images(val) + images(test)
    assert len(images(val)) >= 1 and len(images(test)) >= 1  # one batch of held-out images held both
    assert len(held) == len(set(held)) == 14 - len(images(train))  # no image in both splits
    assert images(val) == images(val) and images(test) == images(test)  # the same images on every pass
    assert class_names == ["class_0", "class_1"]

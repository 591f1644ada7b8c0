"""`data=tfds`: builds without tensorflow-datasets, and says how to install it when loading."""

from __future__ import annotations

import importlib.util

import pytest

from pipeline.data.tfds import TfdsData
from pipeline.errors import ConfigError, DataError


@pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is not None,
                    reason="tensorflow-datasets is installed")
def test_missing_package_says_how_to_install_it():
    data = TfdsData(name="mnist", data_dir="/data/tfds")
    with pytest.raises(DataError, match=r"pip install tensorflow-datasets"):
        data.load()


def test_split_needs_train_val_and_test():
    with pytest.raises(ConfigError, match=r"data\.split=.*train, val and test"):
        TfdsData(name="mnist", split={"train": "train", "validation": "test"})
    assert TfdsData(name="mnist").split == {"train": "train[:80%]", "val": "train[80%:]", "test": "test"}

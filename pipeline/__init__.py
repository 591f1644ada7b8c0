"""Declarative transfer learning for TensorFlow.

`python -m pipeline` composes `conf/` with Hydra and runs load -> adapt -> train ->
evaluate -> export, logging to MLflow. Nothing here imports TensorFlow at import time,
so config checks and `--help` answer fast.
"""

__version__ = "0.1.0"

"""Which backbone weights fine-tuning may change."""

from __future__ import annotations

from typing import Any


class FreezeAll:
    """Keep every backbone weight fixed and train the head alone (feature extraction).

    The backbone also runs in inference mode, so BatchNorm statistics stay fixed.

    Example:
        >>> FreezeAll().apply(backbone)
    """

    def apply(self, backbone: Any) -> None:
        backbone.trainable = False


class FreezeNone:
    """Fine-tune every backbone weight together with the head.

    Example:
        >>> FreezeNone().apply(backbone)
    """

    def apply(self, backbone: Any) -> None:
        backbone.trainable = True

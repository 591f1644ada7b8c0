"""What the text options share: reading one text, reporting the skipped ones, the datasets.

A text option (`text_folder`, `csv` with `text_column`, `tfds` with `text_key`) turns each
raw example (a file's bytes, a CSV cell, a TFDS feature) into a Python string with
`read_text`, which says why an example is unusable instead (bytes that are not valid in the
encoding, an empty or whitespace-only text). The usable texts are held in memory (aclImdb's
25,000 training reviews are about 33 MB) and handed on as unbatched `tf.data` datasets of
`(tf.string scalar, label)`; tokenizing is the source's job, so nothing here splits words.
No TensorFlow until the datasets are built.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError
from pipeline.types import DataBundle

log = logging.getLogger(__name__)

SHOWN = 5  # skipped texts quoted in the warning; the count says how many more there are


@dataclass(frozen=True)
class TextSettings:
    """How every text of an option is read (see the option's Args)."""

    encoding: str = "utf-8"
    max_chars: int | None = None
    deterministic: bool = True

    def identity(self) -> dict[str, Any]:
        """The settings that change the texts a model sees, for the fingerprint."""
        return {"encoding": codecs.lookup(self.encoding).name, "max_chars": self.max_chars}


def text_settings(encoding: str = "utf-8", max_chars: int | None = None, deterministic: bool = True) -> TextSettings:
    """Checked settings; raises ConfigError naming the `data.` key, the value and the fix."""
    try:
        b"x".decode(encoding)  # also refuses codecs that are not text encodings (base64, rot13)
    except UnicodeError:
        pass  # a text encoding that cannot read this one byte (utf-16): still an encoding
    except (LookupError, TypeError) as error:
        raise ConfigError(
            f"data.encoding={encoding!r} is not a text encoding Python knows ({error}): set "
            "data.encoding to the files' encoding, for example utf-8, latin-1, cp1252 or utf-16."
        ) from None
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
        raise ConfigError(
            f"data.max_chars={max_chars!r}: expected a positive number of characters to keep of "
            "each text, for example data.max_chars=5000, or null to keep whole texts (truncating "
            "to tokens is the source's seq_length)."
        )
    return TextSettings(encoding, max_chars, bool(deterministic))


def cut_texts(texts: Any, max_chars: int | None) -> Any:
    """A batch of UTF-8 strings, each cut to its first `max_chars` characters (Unicode code
    points, as `read_text` cuts); unchanged when `max_chars` is None. What an export serves
    of a model trained with `data.max_chars`."""
    if max_chars is None:
        return texts
    import tensorflow as tf

    return tf.strings.substr(texts, 0, max_chars, unit="UTF8_CHAR")


def read_text(raw: bytes | str, settings: TextSettings) -> tuple[str | None, str | None]:
    """`(text, None)` for a usable example, `(None, problem)` for one that is left out.

    Bytes are decoded strictly in `settings.encoding` (a leading byte order mark is
    dropped); a string is taken as it is. A text that is empty or only whitespace, or that
    holds NUL characters (a binary file read as text), is refused. A usable text is cut to
    its first `settings.max_chars` characters; it is not otherwise changed.

    Example:
        >>> read_text("A quiet, patient film.", TextSettings(max_chars=7))
        ('A quiet', None)
        >>> read_text(b"\\xff\\xfe\\x00", TextSettings())[1]
        'not valid utf-8 text (invalid start byte at byte 0)'
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            text = bytes(raw).decode(settings.encoding)
        except UnicodeDecodeError as error:
            return None, f"not valid {settings.encoding} text ({error.reason} at byte {error.start})"
        except UnicodeError as error:  # codecs that fail without a position (idna)
            return None, f"not valid {settings.encoding} text ({error})"
    else:
        text = str(raw)
    text = text.removeprefix("\ufeff")
    if not text.strip():
        return None, "empty" if not text else "only whitespace"
    if "\0" in text:
        return None, "holds NUL characters: a binary file, or not in this encoding"
    if settings.max_chars is not None:
        text = text[: settings.max_chars]
    return text, None


def report_skipped(skipped: Sequence[tuple[str, str]], total: int, key: str, fix: str) -> None:
    """Log one warning with the count and the first few `(example, problem)` pairs.

    Like `scan.report_skipped` for images: the examples are left out of every split and
    listed in the run's `skipped_files`.
    """
    if not skipped:
        return
    shown = "; ".join(f"{name}: {problem}" for name, problem in skipped[:SHOWN])
    more = f" (and {len(skipped) - SHOWN} more)" if len(skipped) > SHOWN else ""
    log.warning(
        "%s: skipped %d of %d texts that are empty or cannot be read: %s%s. They are left out "
        "of every split and listed in the run's skipped_files; %s",
        key, len(skipped), total, shown, more, fix,
    )


def text_dataset(texts: Sequence[str], labels: Any, deterministic: bool = True):
    """An unbatched `tf.data.Dataset` of `(tf.string scalar, label)`, in the given order."""
    import numpy as np
    import tensorflow as tf

    strings = tf.constant(np.array(list(texts), dtype=object).reshape(-1), dtype=tf.string)
    dataset = tf.data.Dataset.from_tensor_slices((strings, labels))
    options = tf.data.Options()
    options.deterministic = deterministic
    return dataset.with_options(options)


def text_bundle(
    texts: Mapping[str, Sequence[str]],
    labels: Mapping[str, Any],
    class_names: Sequence[str],
    task: str,
    settings: TextSettings,
    skipped: Sequence[str],
    fingerprint: str,
    example_ids: Mapping[str, Sequence[str]] | None = None,
) -> DataBundle:
    """The text `DataBundle`: `input_shape=()`, `input_kind="text"`, no augmentation.

    Args:
        texts, labels: split (`train`, `val`, `test`) -> the usable texts and their labels.
        skipped: the examples `read_text` refused, as the option names them.
        fingerprint: the option's digest, which already covers `settings.identity()`.
    """
    return DataBundle(
        train=text_dataset(texts["train"], labels["train"], settings.deterministic),
        val=text_dataset(texts["val"], labels["val"], settings.deterministic),
        test=text_dataset(texts["test"], labels["test"], settings.deterministic),
        class_names=tuple(class_names),
        input_shape=(),
        task=task,
        num_examples={split: len(texts[split]) for split in ("train", "val", "test")},
        augmentation=None,
        skipped_files=tuple(skipped),
        fingerprint=fingerprint,
        resizable=False,
        example_ids={split: list(ids) for split, ids in (example_ids or {}).items()},
        input_kind="text",
        max_chars=settings.max_chars,
    )

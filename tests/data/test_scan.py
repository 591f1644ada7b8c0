"""The pre-scan reads each unchanged file once per process; a changed file is read again."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from image_files import truncated_jpeg, write_image
from pipeline.data import scan


@pytest.fixture
def reads(monkeypatch):
    counted: list[str] = []
    original = Path.read_bytes

    def read_bytes(self):
        counted.append(self.name)
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(scan, "_SCANNED", {})
    return counted


def _age(path: Path, seconds: float = 60) -> Path:
    old = time.time() - seconds
    os.utime(path, (old, old))
    return path


def test_an_unchanged_file_is_read_once_per_process(tmp_path, reads):
    files = [_age(write_image(tmp_path / "a.png")), _age(truncated_jpeg(tmp_path / "b.jpg"))]
    first = scan.scan_files(files)
    second = scan.scan_files(files)
    assert second == first and first[1].problem and not first[0].problem
    assert sorted(reads) == ["a.png", "b.jpg"]  # the second scan read nothing


def test_a_changed_file_is_read_again(tmp_path, reads):
    path = _age(write_image(tmp_path / "a.png", colour=(10, 10, 10)))
    before = scan.scan_files([path])[0]
    truncated_jpeg(path)  # new bytes and size, a fresh mtime
    after = scan.scan_files([path])[0]
    assert after.sha256 != before.sha256 and after.problem and reads == ["a.png", "a.png"]


def test_a_file_written_just_now_is_not_remembered(tmp_path, reads):
    path = write_image(tmp_path / "fresh.png")  # its mtime is now: a same-size rewrite could hide
    scan.scan_files([path])
    scan.scan_files([path])
    assert reads == ["fresh.png", "fresh.png"]


def test_file_digest_streams_and_reads_an_unchanged_file_once(tmp_path, monkeypatch):
    monkeypatch.setattr(scan, "_DIGESTS", {})
    opened: list[str] = []

    def counting_open(path, mode):
        opened.append(path)
        return open(path, mode)

    data = os.urandom(3 * scan.BLOCK + 5)  # several blocks and a ragged end
    path = tmp_path / "shard.tfrecord"
    path.write_bytes(data)
    _age(path)
    expected = (len(data), hashlib.sha256(data).hexdigest())
    assert scan.file_digest(path, counting_open) == expected
    assert scan.file_digest(path, counting_open) == expected and len(opened) == 1
    path.write_bytes(data[:-1] + b"\0")  # one byte changed, same size
    assert scan.file_digest(path, counting_open) == (len(data), hashlib.sha256(data[:-1] + b"\0").hexdigest())
    assert len(opened) == 2


def test_relative_paths_do_not_follow_links(tmp_path):
    target = write_image(tmp_path / "pool" / "a.png")
    (tmp_path / "root" / "cat").mkdir(parents=True)
    (tmp_path / "root" / "cat" / "a.png").symlink_to(target)
    relative = scan.relative_to(tmp_path / "root")
    assert relative(str(tmp_path / "root" / "cat" / "a.png")) == "cat/a.png"  # the link's class folder
    assert relative(str(target)) == target.as_posix()  # outside the root: absolute


def test_an_image_over_max_pixels_is_refused_from_its_header():
    from test_predict import huge_png

    from pipeline.data.scan import image_problem

    assert "over the limit of 100,000,000 pixels (data.max_pixels)" in image_problem(huge_png())
    small = huge_png(30, 20)  # declares 600 pixels: under any sane limit, then fails to decode
    assert "over the limit" not in (image_problem(small) or "")
    assert image_problem(small, max_pixels=599).startswith("30 x 20 pixels is over the limit of 599")

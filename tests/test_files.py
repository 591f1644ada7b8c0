"""Leftovers of killed runs: stale staging folders go, fresh ones (a live writer's) stay."""

from __future__ import annotations

import os
import time

from pipeline.files import STALE_AFTER, remove_stale


def _aged(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_only_stale_matching_entries_are_removed(tmp_path):
    stale, fresh, other = tmp_path / ".export-partial-aaa", tmp_path / ".export-partial-bbb", tmp_path / "export"
    for folder in (stale, fresh, other):
        folder.mkdir()
    (stale / "saved_model.pb").write_bytes(b"x")
    _aged(stale, STALE_AFTER + 60)
    _aged(other, STALE_AFTER + 60)  # old, but not a partial write
    assert remove_stale(tmp_path, ".export-partial-*") == [stale]
    assert not stale.exists() and fresh.exists() and other.exists()


def test_a_missing_folder_is_not_an_error(tmp_path):
    assert remove_stale(tmp_path / "nope", ".partial-*") == []


def test_the_export_and_the_cache_clean_up_at_start(tmp_path, hub_model_dir):
    from test_export import _adapted, _data, _images

    from pipeline.data.digits import DigitsData
    from pipeline.export import Exporter
    from pipeline.features import FeatureCache
    from pipeline.sources.hub import HubSource

    run = tmp_path / "run"
    run.mkdir()
    killed_export = run / ".export-partial-0123456789ab"
    killed_export.mkdir()
    _aged(killed_export, STALE_AFTER + 1)
    Exporter().export(_adapted(hub_model_dir), _data(_images()), run / "export")
    assert not killed_export.exists() and (run / "export" / "saved_model").is_dir()

    cache = tmp_path / "cache"
    cache.mkdir()
    killed_entry, live_entry = cache / ".partial-abc-1", cache / ".partial-abc-2"
    killed_entry.mkdir()
    live_entry.mkdir()
    _aged(killed_entry, STALE_AFTER + 1)
    backbone = HubSource(handle=str(hub_model_dir), input_shape=[8, 8, 1]).load().backbone
    FeatureCache(cache).load_or_compute(backbone, DigitsData(classes=[5, 6]).load())
    assert not killed_entry.exists() and live_entry.exists()


def test_one_run_one_directory(tmp_path):
    import json

    import pytest

    from pipeline.errors import ConfigError
    from pipeline.files import LOCK_FILE, in_use, run_dir_lock

    run_dir = tmp_path / "run"
    assert not in_use(run_dir)
    with run_dir_lock(run_dir):
        assert in_use(run_dir)
        owner = json.loads((run_dir / LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=r"is in use by process \d+ on host .+ \(since .+\): one run, one directory"):
            with run_dir_lock(run_dir):  # a second open file: what a second process gets
                pass
    assert not in_use(run_dir)
    with run_dir_lock(run_dir):  # free again once the holder let go
        pass


def test_the_lock_dies_with_its_process(tmp_path):
    import subprocess
    import sys

    from pipeline.files import in_use

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pipeline.files import run_dir_lock\n"
         f"with run_dir_lock({str(tmp_path / 'run')!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert in_use(tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
    assert not in_use(tmp_path / "run")  # SIGKILL released it: the same command may resume

"""`pipeline.quick_exit`: a command's status, output and atexit handlers kept, the teardown skipped."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import PROJECT_ROOT


def _run(tmp_path: Path, body: str, *flags: str) -> subprocess.CompletedProcess:
    """Runs a script that ends with `exit_after(main)`; `marks` is a folder it may write to."""
    script = tmp_path / "command.py"
    script.write_text(textwrap.dedent(f"""\
        import atexit, sys, threading, time
        from pathlib import Path
        from pipeline.quick_exit import exit_after

        marks = Path({str(tmp_path / 'marks')!r})
        marks.mkdir(exist_ok=True)

        class Teardown:  # its __del__ runs only when the interpreter tears the module down
            def __del__(self):
                (marks / "teardown").write_text("ran")

        kept_until_teardown = Teardown()
        atexit.register(lambda: (marks / "atexit").write_text("ran"))
    """) + textwrap.dedent(body) + "\nexit_after(main)\n")
    return subprocess.run([sys.executable, *flags, str(script)], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)


def _marks(tmp_path: Path) -> set[str]:
    return {path.name for path in (tmp_path / "marks").iterdir()}


def test_the_status_output_and_atexit_handlers_are_kept_and_the_teardown_is_skipped(tmp_path):
    done = _run(tmp_path, """
        def main():
            print("result line", end="")  # unflushed, no newline: still reaches the pipe
            print("log line", file=sys.stderr, end="")
            return 3
    """)
    assert done.returncode == 3
    assert done.stdout == "result line" and done.stderr == "log line"
    assert _marks(tmp_path) == {"atexit"}  # the handler ran; the module's teardown did not


def test_system_exit_keeps_its_code_and_message(tmp_path):
    done = _run(tmp_path, """
        def main():
            raise SystemExit("error: one line")
    """)
    assert done.returncode == 1 and done.stderr.strip() == "error: one line"
    done = _run(tmp_path, """
        def main():
            raise SystemExit(2)
    """)
    assert done.returncode == 2 and _marks(tmp_path) == {"atexit"}


def test_a_running_non_daemon_thread_is_waited_for_before_the_atexit_handlers(tmp_path):
    done = _run(tmp_path, """
        def late():
            time.sleep(1.0)
            (marks / "thread").write_text("finished")
            time.sleep(0.2)
            (marks / "thread-then").write_text("before atexit" if not (marks / "atexit").exists() else "after")

        def main():
            threading.Thread(target=late).start()
    """)
    assert done.returncode == 0, done.stderr
    assert _marks(tmp_path) == {"atexit", "thread", "thread-then"}  # waited for; the teardown still skipped
    assert (tmp_path / "marks" / "thread-then").read_text() == "before atexit"


def test_a_thread_pool_left_open_ends_its_work_and_the_teardown_is_skipped(tmp_path):
    # MLflow's local artifact store keeps such a pool, idle, once a run has logged its files.
    done = _run(tmp_path, """
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="left-open")

        def slow(name):
            time.sleep(0.5)
            (marks / name).write_text("done")

        def main():
            pool.submit(slow, "idle-before").result()
            pool.submit(slow, "busy-at-exit")  # still running when main returns
            return 5
    """)
    assert done.returncode == 5, done.stderr
    assert _marks(tmp_path) == {"atexit", "idle-before", "busy-at-exit"}


def test_a_profiler_gets_the_normal_exit_so_that_its_report_is_written(tmp_path):
    report = tmp_path / "profile.out"
    done = _run(tmp_path, """
        def main():
            return 0
    """, "-m", "cProfile", "-o", str(report))
    assert done.returncode == 0, done.stderr
    assert report.stat().st_size > 0 and "teardown" in _marks(tmp_path)


def test_a_crash_keeps_its_traceback_and_status(tmp_path):
    done = _run(tmp_path, """
        def main():
            raise RuntimeError("a bug of ours")
    """)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: a bug of ours" in done.stderr


def test_without_cpythons_run_exitfuncs_the_exit_is_a_normal_one(tmp_path):
    done = _run(tmp_path, """
        del atexit._run_exitfuncs  # another Python, or a later CPython without it

        def main():
            return 4
    """)
    assert done.returncode == 4
    assert _marks(tmp_path) == {"atexit", "teardown"}

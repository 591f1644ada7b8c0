"""Ending a command's process without the interpreter's teardown of TensorFlow.

Once a run has finished (its files written and closed, its MLflow run ended, its summary
printed), Python still tears down every module and object before the process ends: with
TensorFlow, Keras and MLflow loaded that takes 2-3.5 s on 2 cores, after the last line a
user waits for, and it writes nothing. `exit_after(main)` runs a command's `main`, then
does what a normal exit does that matters, in the interpreter's order: it waits for the
other threads (their own exit calls first, such as a thread pool's shutdown, which lets its
idle workers end and waits for busy ones; then every non-daemon thread is joined), runs the
`atexit` handlers (logging's flush and close, MLflow's, coverage's) and flushes the
standard streams; then it ends the process with `os._exit` and the same exit status.

Waiting matters for the pipeline's own runs: MLflow's local artifact store keeps a pool of
worker threads, idle once the artifacts are copied, for the rest of the process, and a
check for "no other thread alive" sent every run that logged its export to the slow exit.

It falls back to a normal exit whenever the teardown could matter: a profiler or tracer
attached (`python -m cProfile` writes its report after `main` returns), `main` run outside
the main thread, or a Python without the private functions used here. A crash, an
exception other than `SystemExit`, takes the normal path too, with its traceback.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn


def exit_after(main: Callable[[], Any]) -> NoReturn:
    """Runs `main()`; then exits with its status, skipping the teardown.

    The status is what `sys.exit(main())` would give: `main`'s return value (None is 0) or
    the code of the `SystemExit` it raised.

    Example:
        >>> if __name__ == "__main__":
        ...     exit_after(main)
    """
    try:
        code: Any = main()
    except SystemExit as stop:
        code = stop.code
    if not isinstance(code, int):  # what SystemExit does with None and with a message
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    # Private functions of CPython's (since 3.0), what its own exit calls first: without them,
    # the other threads or the atexit handlers would be cut short.
    wait_for_threads = getattr(threading, "_shutdown", None)
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if wait_for_threads is None or run_exit_handlers is None or not safe_to_skip_teardown():
        raise SystemExit(code)
    for stream in (sys.stdout, sys.stderr):
        _flush(stream)
    wait_for_threads()  # thread pools shut down (MLflow's artifact workers), non-daemon threads joined
    run_exit_handlers()  # logging.shutdown among them: Hydra's log file is flushed and closed
    for stream in (sys.stdout, sys.stderr):
        _flush(stream)
    os._exit(code)


def safe_to_skip_teardown() -> bool:
    """In the main thread (which the wait for the others needs), and no profiler, tracer or
    monitoring tool attached."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return False
    monitoring = getattr(sys, "monitoring", None)  # Python 3.12+: cProfile and coverage use it
    if monitoring is not None and any(monitoring.get_tool(tool) is not None for tool in range(6)):
        return False
    return True


def _flush(stream: Any) -> None:
    try:
        if stream is not None:
            stream.flush()
    except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
        pass

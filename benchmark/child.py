"""A call run in a forked child process under a time limit: a hang, a segfault or an out-of-memory kill
fails that call, never the process that made it.

``call_in_child(fn, timeout)`` forks, runs ``fn()`` in the child and sends its result back (pickled over
a pipe); the parent waits at most ``timeout`` seconds, then kills the child. The child inherits the
parent's memory copy-on-write (the loaded data sets, the registered plugins), so nothing it writes to
memory reaches the parent: what it passes on travels in its return value or through the disk cache.
It never touches the results store. Needs the ``fork`` start method (Linux, macOS) and CUDA not yet
initialized in the parent (a forked child cannot use the parent's CUDA context); the OpenMP thread
pool is released before each fork (``release_openmp_threads``), else the child would hang.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Callable, TypeVar

import torch

from benchmark.errors import UEBenchError

log = logging.getLogger(__name__)
T = TypeVar("T")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
OMP_PAUSE_HARD = 2    # omp.h: free the OpenMP runtime's threads


class ChildFailed(Exception):
    """The call did not return: it timed out, crashed, or raised (the message says which)."""


class TimedOut(ChildFailed):
    pass


class Crashed(ChildFailed):
    pass


def check_timeout(value: object, where: str) -> float | None:
    """A time limit in seconds: a positive finite number, or ``None`` / ``0`` for no limit."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UEBenchError(f"{where}={value!r} must be a number of seconds > 0 (0 or none: no time limit)")
    return float(value) if value > 0 else None


def exit_reason(exitcode: int | None) -> str:
    """Why a child ended without a result: ``killed by signal 11 (SIGSEGV)``, ``exited with code 1``."""
    if exitcode is None:
        return "did not end"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        hint = "; e.g. the out-of-memory killer" if -exitcode == signal.SIGKILL else ""
        return f"killed by signal {-exitcode} ({name}{hint})"
    return f"exited with code {exitcode} without a result"


def call_in_child(fn: Callable[[], T], timeout: float) -> T:
    """``fn()`` computed in a forked child, within ``timeout`` seconds of wall time.

    Raises ``TimedOut`` ("timed out after N s") or ``Crashed`` ("crashed: killed by signal 11 (SIGSEGV)");
    an exception ``fn`` raises comes back as a ``UEBenchError`` if it was one, else as ``ChildFailed``
    with its type and message.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        raise UEBenchError("a cell time limit needs the 'fork' start method (Linux or macOS); run without one")
    if torch.cuda.is_initialized():
        raise UEBenchError("a cell time limit needs CUDA uninitialized in the driver process (a forked child "
                           "cannot use its CUDA context); run without one, or let only the cells use CUDA")
    release_openmp_threads()
    mp = multiprocessing.get_context("fork")
    receive, send = mp.Pipe(duplex=False)
    for stream in (sys.stdout, sys.stderr):  # else the child flushes the parent's buffered output again
        stream.flush()
    proc = mp.Process(target=_child, args=(fn, send, os.getpid()), name="uebench-cell")
    proc.start()
    send.close()  # the child holds the only writing end: its death is an EOF here
    try:
        if not receive.poll(timeout):
            raise TimedOut(f"timed out after {timeout:g} s")
        try:
            kind, payload = receive.recv()
        except EOFError:
            proc.join()
            raise Crashed(f"crashed: {exit_reason(proc.exitcode)}") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        receive.close()
    if kind == "ok":
        return payload
    name, message, user_error = payload
    if user_error:
        raise UEBenchError(message)
    raise ChildFailed(f"{name}: {message}")


def release_openmp_threads() -> None:
    """Free the OpenMP thread pool before a fork (``omp_pause_resource_all``, OpenMP 5.0).

    GNU libgomp, which torch's Linux wheels bundle, has no fork handler: a child that inherits a pool
    the parent has used hangs in its first parallel region. Without the pool, parent and child each
    start a new one when they next need it, with the same number of threads.
    """
    for path in _openmp_libraries():
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError) as exc:
            log.debug("cannot release the OpenMP threads of %s: %s", path, exc)
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        if pause(OMP_PAUSE_HARD) != 0:
            log.debug("omp_pause_resource_all failed in %s", path)


def _openmp_libraries() -> list[str]:
    """The OpenMP runtimes loaded in this process (Linux; elsewhere torch's runtime handles fork)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if len(line.split()) >= 6}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith(("libgomp", "libomp", "libiomp")))


def _child(fn: Callable[[], object], send: Connection, parent: int) -> None:
    _die_with(parent)
    try:
        result: tuple[str, object] = ("ok", fn())
    except Exception as exc:  # reported to the parent, which decides what it means
        log.debug("%s", traceback.format_exc())
        result = ("error", (type(exc).__name__, str(exc), isinstance(exc, UEBenchError)))
    try:
        send.send(result)
    except Exception as exc:  # an unpicklable result
        send.send(("error", (type(exc).__name__, f"the result could not be sent back: {exc}", False)))
    finally:
        send.close()


def _die_with(parent: int) -> None:
    """Linux: the child is killed when the parent dies, so a hung cell never outlives a killed run."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError) as exc:
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

"""Running torch work in a short-lived thread, so that one thread (the scheduler's) owns the process's OpenMP team.

libgomp gives every thread that starts a parallel region a team of worker threads of its own, kept until that
thread exits. Once the process holds more libgomp threads than CPUs, libgomp stops letting idle workers spin
("throttled" spinning of 100 iterations) and every worker sleeps between parallel regions, so each small op of a
decode step pays a futex wake-up. Measured on the 2-core machine: a thread that had loaded the model (one team) and
the scheduler thread (a second team) made decode 25-30% slower than with the scheduler's team alone, and element-
wise ops on one row took twice as long. So work that would leave a team behind in a long-lived thread (loading a
model, merging an adapter, a benchmark's own measurements) runs in a fresh thread that exits, and its team with it.
Any one op large enough to fork counts: the bench once wrote its random test adapters in its main thread (GPT-2's
3072 x 16 tensors fork), which cut its own 4-row serving figure from ~200 to ~120 tok/s. ``openmp_workers`` tells
how many workers a process holds; tests/test_threads.py checks that serving through sessions, adapters, merges and
the HTTP API leaves only the scheduler's.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_fresh_thread(fn: Callable[[], T], name: str = "scratchchat-worker") -> T:
    """Call ``fn()`` in a new thread, wait for it, and return its result (or raise its exception here).

    Inherits nothing thread-local from the caller except torch's grad mode, which is passed on; the intra-op thread
    count is the process default (``torch.set_num_threads`` in the new thread follows the caller's).
    """
    import torch

    box: dict[str, object] = {}
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()

    def work() -> None:
        torch.set_num_threads(threads)
        try:
            with torch.set_grad_enabled(grad):
                box["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    th = threading.Thread(target=work, name=name, daemon=True)
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[return-value]


def openmp_workers(pid: int | str = "self") -> int | None:
    """How many OpenMP (libgomp) worker threads are parked in the process: a diagnostic for the rule above.

    A thread counts when it sits in a system call made from libgomp's code (a worker waiting for its next parallel
    region, found through ``/proc/PID/task/*/syscall`` and the process's memory map). While the engine serves with
    ``torch.get_num_threads() == n``, the scheduler's team is ``n - 1`` workers; more means another long-lived thread
    ran parallel torch work and holds a team of its own. Threads running at that moment are not counted, so call it
    when the process is idle. ``None`` where /proc does not tell (not Linux, or no permission).
    """
    try:
        text = open(f"/proc/{pid}/maps").read()
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    code = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 6 and "x" in parts[1] and "libgomp" in os.path.basename(parts[5]):
            lo, hi = parts[0].split("-")
            code.append((int(lo, 16), int(hi, 16)))
    count = 0
    for tid in tasks:
        try:
            fields = open(f"/proc/{pid}/task/{tid}/syscall").read().split()
        except OSError:  # the thread has exited meanwhile, or reading it is not allowed
            continue
        if len(fields) < 3 or fields[0] == "running":
            continue
        pc = int(fields[-1], 16)
        count += any(lo <= pc < hi for lo, hi in code)
    return count

"""Running torch work in a short-lived thread, so that one thread (the scheduler's) owns the process's OpenMP team.

libgomp gives every thread that starts a parallel region a team of worker threads of its own, kept until that
thread exits. Once the process holds more libgomp threads than CPUs, libgomp stops letting idle workers spin
("throttled" spinning of 100 iterations) and every worker sleeps between parallel regions, so each small op of a
decode step pays a futex wake-up. Measured on the 2-core machine: a thread that had loaded the model (one team) and
the scheduler thread (a second team) made decode 25-30% slower than with the scheduler's team alone, and element-
wise ops on one row took twice as long. So work that would leave a team behind in a long-lived thread (loading a
model, merging an adapter, a benchmark's own measurements) runs in a fresh thread that exits, and its team with it.
"""

from __future__ import annotations

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

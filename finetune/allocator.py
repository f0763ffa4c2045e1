"""Keeping freed memory in the process while training on the CPU (glibc ``mallopt``), and handing it back afterwards.

glibc serves each allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) with a fresh ``mmap`` and
unmaps it again on ``free``. A training step allocates and frees the same big tensors every time: the logits and
their log-softmax (B x T x vocab floats, 118 MB each for SmolLM2 at batch 8 x 75 tokens), the activations, and
(full SFT) every gradient. So each step the kernel hands back ~0.5 GB of new zeroed pages, one page fault per 4 KiB:
100-400k faults per step. On the 2-core KVM machine this cost 0.1-0.9 s of system time per 3-4 s single-thread step,
and the cold pages slowed the math as well. SmolLM2-135M at batch 8 on 2 threads, three alternating runs each: LoRA
229-263 -> 278-283 tokens/s, full SFT 203-219 -> 233-239. (PyTorch's CPU tuning guides recommend jemalloc or
tcmalloc for the same reason.) ``M_MMAP_MAX = 0`` puts big blocks on the heap and a high ``M_TRIM_THRESHOLD`` keeps
freed heap memory, so the next step reuses resident pages. The peak RSS barely moves (3.97 vs 4.00 GB in a LoRA
run): memory is kept longer, until :func:`release_freed_memory`, not used more.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_MAX = -4
_KEEP = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of free memory at the top of the heap
_applied = False


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it (once per process; no-op off glibc).

    Returns:
        True when the setting is in effect.
    """
    global _applied
    if _applied:
        return True
    libc = _libc()
    if libc is None:
        return False
    # mallopt returns 1 on success; setting the trim threshold also stops glibc's dynamic threshold adjustment
    _applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP) == 1
    log.debug("glibc malloc keeps freed memory: %s", _applied)
    return _applied


def release_freed_memory() -> None:
    """Return the free memory kept by :func:`keep_freed_memory` to the kernel (``malloc_trim(0)``)."""
    libc = _libc() if _applied else None
    if libc is not None:
        libc.malloc_trim(0)

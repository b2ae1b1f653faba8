"""glibc malloc settings for CPU runs (through ctypes): keep freed memory, give it back."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve every allocation from its heap and never give memory back.

    By default glibc maps each allocation above a (dynamic, at most 32 MiB) threshold afresh from the kernel and
    unmaps it when freed, so a model whose activations are bigger pays page faults for every one of them on every
    call. This sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to their maximum, the in-process equivalent of
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``. The process then keeps its peak memory for good (a
    training loop reaches that peak every step anyway). Returns False where malloc is not glibc's.
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 2 ** 31 - 1)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


def trim() -> None:
    """Give the heap's free memory back to the kernel (before a resident-memory measurement)."""
    with contextlib.suppress(Exception):
        _libc().malloc_trim(0)

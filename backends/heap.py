"""Handing freed memory back to the system. glibc keeps the pages of freed transient tensors (a
load's float copies, a prompt's activations: every prompt length fragments the heap differently)
in its heap, so resident memory stays at its high-water mark; `malloc_trim` returns them. Nothing
to do elsewhere (macOS's allocator returns them itself; Windows has no C library by that name)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    return None if name is None else getattr(ctypes.CDLL(name), "malloc_trim", None)


def release_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

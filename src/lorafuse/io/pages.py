"""Dropping the pages of memory-mapped input tensors from this process's resident set once used.

A tensor read from a safetensors file is a read-only numpy view of a shared file mapping; the pages
it touched count in the process's RSS until they are unmapped. `release_pages` advises the kernel
(MADV_DONTNEED) that they are not needed: they leave the resident set, stay in the page cache, and
come back from it if read again. Arrays that are not read-only views of an mmap are left alone."""

from __future__ import annotations

import mmap
from collections.abc import Iterable

import numpy as np

from lorafuse.backends.pages import mapping_of as _mapping
from lorafuse.backends.pages import releasable

__all__ = ["release_pages", "releasable"]

_PAGE = mmap.PAGESIZE


def _address(x: np.ndarray) -> int:
    return int(x.__array_interface__["data"][0])


def release_pages(arrays: Iterable[np.ndarray]) -> int:
    """Drop the pages under read-only mmap views among `arrays` from the resident set; the bytes advised."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    done = 0
    for arr in arrays:
        if arr.flags.writeable or arr.nbytes == 0 or not arr.flags.c_contiguous:
            continue  # a writable mapping could hold changes that DONTNEED would discard
        m = _mapping(arr)
        if m is None or m.closed:
            continue
        try:
            start = _address(arr) - _address(np.frombuffer(m, dtype=np.uint8, count=1))
        except (ValueError, BufferError):
            continue
        stop = min(len(m), start + arr.nbytes)
        start -= start % _PAGE
        if 0 <= start < stop:
            m.madvise(mmap.MADV_DONTNEED, start, stop - start)
            done += stop - start
    return done

"""File ranges mapped side by side into one strided array, without copying them.

A fit task reads a block of rows at every epoch of its window: one range of each epoch's chunk
file. Reading copies every byte from the page cache into the task's buffer (about half of the
task's time at 2.5 GB/s per process). :func:`map_ranges` maps the ranges instead, each into
its own slot of one reserved address range, so that the block is an ordinary 2-D array
``(n_ranges, n_values)`` whose rows are the files' pages themselves (page-cache pages, or read
from disk on first touch).

The mappings are private and writable (copy on write: a write never reaches the file) and are
removed when the last view of the array is gone. Linux only (``MAP_FIXED`` into a reservation
through libc); :func:`available` says whether this process can map.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.errors import StoreError

__all__ = ["PAGE", "available", "map_ranges"]

PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10  # the same value on every Linux architecture
_PROT_NONE = 0
#: ask for a mapped range's pages when it is mapped (``posix_fadvise(WILLNEED)``) if its first
#: page is not in the page cache: from a disk the range's reads are then in flight at once,
#: instead of a fault per file that reads around it as much as the disk's readahead setting
#: says (8 MiB where we measured: a cold 52 MB block read 839 MB in 0.72 s, now 52 MB in
#: 0.10 s). Asked for always, it would cost about 1 ms per 52 MB block from the page cache
#: (the kernel looks every page up).
_ADVISE = hasattr(os, "posix_fadvise")
#: rows of a block probed for that while none was found out of the cache (a probe costs
#: about 4 us through ctypes: 100 per block would be 0.4 ms of a 45 ms fit task)
_PROBE_EVERY = 8

_libc: Any = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
        ]  # fmt: skip
        lib.munmap.restype = ctypes.c_int
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.restype = ctypes.c_int
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        _libc = lib
    return _libc


def available() -> bool:
    """Whether ranges can be mapped here (Linux, 64-bit, libc's ``mmap`` reachable), and not
    turned off by ``CMD_PIPELINE_NO_MMAP`` (any value but empty or ``0``)."""
    if os.environ.get("CMD_PIPELINE_NO_MMAP", "") not in ("", "0"):
        return False
    if not sys.platform.startswith("linux") or sys.maxsize < 2**32:
        return False
    try:
        _lib()
    except (OSError, AttributeError):  # pragma: no cover - no libc symbols (static builds)
        return False
    return True


def _resident(lib: Any, addr: int) -> bool:
    """Whether the page mapped at ``addr`` is in the page cache (``mincore``; False where it
    cannot say: then the range is asked for, which is harmless)."""
    vec = ctypes.c_ubyte(0)
    if lib.mincore(addr, PAGE, ctypes.byref(vec)) != 0:
        return False
    return bool(vec.value & 1)


def _unmap(addr: int, size: int) -> None:
    _lib().munmap(addr, size)


def map_ranges(
    parts: Sequence[Sequence[tuple[str, int, int]]], n_values: int, dtype: Any
) -> np.ndarray:
    """``parts[k]`` (pieces ``(path, offset, nbytes)`` laid end to end) as row ``k`` of a
    C-contiguous ``(len(parts), n_values)`` array of ``dtype``, mapped, not read.

    Every row holds ``n_values * itemsize`` bytes, a multiple of :data:`PAGE`; every piece's
    offset and length are page multiples; each file must hold its pieces (else
    :class:`~pipeline.errors.StoreError`: a file shorter than its range would fault on
    access). A missing file raises StoreError.
    """
    dt = np.dtype(dtype)
    row = n_values * dt.itemsize
    if row % PAGE or row <= 0:
        raise ValueError(f"a mapped row must be a positive multiple of {PAGE} bytes, got {row}")
    lib = _lib()
    total = row * len(parts)
    prot_rw = mmap.PROT_READ | mmap.PROT_WRITE
    base = lib.mmap(None, total, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if base in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"cannot reserve {total} bytes of address space")
    probe_all = False  # a range found not in the page cache: then every range is probed
    try:
        for k, pieces in enumerate(parts):
            dest = base + k * row
            if sum(n for _p, _o, n in pieces) != row:
                raise ValueError(f"row {k}: its pieces do not hold {row} bytes")
            for path, offset, nbytes in pieces:
                if offset % PAGE or nbytes % PAGE:
                    raise ValueError(f"{path}: range {offset}+{nbytes} is not page-aligned")
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError as e:
                    raise StoreError(f"trajectory chunk {path} is missing (unfinished ingest?)") from e
                try:
                    if os.fstat(fd).st_size < offset + nbytes:
                        raise StoreError(f"trajectory chunk {path} is truncated")
                    got = lib.mmap(
                        dest, nbytes, prot_rw, mmap.MAP_PRIVATE | _MAP_FIXED, fd, offset
                    )
                    if got != dest:
                        raise OSError(ctypes.get_errno(), f"cannot map {path}")
                    probe = probe_all or k % _PROBE_EVERY == 0
                    if _ADVISE and probe and not _resident(lib, dest):
                        # the range's pages all asked for now, in flight at once
                        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
                        probe_all = True
                finally:
                    os.close(fd)
                dest += nbytes
    except BaseException:
        _unmap(base, total)
        raise
    buf = (ctypes.c_char * total).from_address(base)
    # unmapped when the last array viewing ``buf`` is gone (numpy keeps its buffer alive)
    weakref.finalize(buf, _unmap, base, total)
    return np.ndarray((len(parts), n_values), dtype=dt, buffer=buf)

"""Key-level access to a Zarr store: listing, deletion and partial-file cleanup.

The one place that uses zarr's private modules (zarr-python 3.1: if they move, only this
module changes): ``zarr.core.sync`` drives the async store API from synchronous code, and
``zarr.storage._local._put`` writes whole values to local stores in the calling thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zarr.core.sync import sync

__all__ = [
    "delete",
    "delete_dir",
    "get",
    "get_ranges",
    "list_dir",
    "list_prefix",
    "put",
    "remove_partials",
    "size",
]


def list_prefix(store: Any, prefix: str) -> list[str]:
    """Every key under ``prefix`` (recursively), as the store lists them."""

    async def _ls() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    return sync(_ls())


def list_dir(store: Any, prefix: str) -> list[str]:
    """The immediate children of ``prefix`` (an empty list when there is nothing there)."""

    async def _ls() -> list[str]:
        return [k async for k in store.list_dir(prefix)]

    try:
        return sync(_ls())
    except FileNotFoundError:
        return []


def delete(store: Any, key: str) -> None:
    sync(store.delete(key))


def delete_dir(store: Any, prefix: str) -> None:
    sync(store.delete_dir(prefix))


def remove_partials(store: Any, prefix: str) -> int:
    """Delete the temporary files (``*.partial``) under ``prefix`` that a writer killed
    mid-write left behind (zarr's local store writes ``<key>.<uuid>.partial`` and renames it
    into place; no later write replaces such a file). Returns how many were deleted."""
    from zarr.storage import LocalStore

    if not isinstance(store, LocalStore):
        return 0  # other stores write a value whole or not at all (an object store's PUT)
    stray = [k for k in list_prefix(store, prefix) if k.endswith(".partial")]
    for k in stray:
        delete(store, k)
    return len(stray)


def size(store: Any, prefix: str = "") -> int:
    """Bytes stored under ``prefix``."""
    return int(sync(store.getsize_prefix(prefix)))


def put(store: Any, key: str, data: Any) -> None:
    """Write one whole value (a zarr ``Buffer``) at ``key``.

    On a local store the file is written here, in the calling thread, by zarr's own local
    writer (``<key>.<uuid>.partial`` renamed into place), without the round trip through zarr's
    event-loop thread that ``store.set`` makes: tasks write many small result chunks, and that
    wait cost about 1.5 ms per write. Other stores go through zarr.
    """
    root = _local_root(store)
    if root is None:
        sync(store.set(key, data))
        return
    from zarr.storage import _local

    _local._put(Path(root, *key.split("/")), data)


def _local_root(store: Any) -> str | None:
    """The folder of a writable zarr ``LocalStore``, else None."""
    from zarr.storage import LocalStore

    if isinstance(store, LocalStore) and not store.read_only:
        return str(store.root)
    return None


def get(store: Any, key: str) -> Any:
    """The value at ``key`` (a zarr ``Buffer``), or None when there is none."""
    from zarr.core.buffer import default_buffer_prototype

    return sync(store.get(key, prototype=default_buffer_prototype()))


def get_ranges(store: Any, requests: list[tuple[str, int, int]]) -> list[bytes | None]:
    """Bytes ``[start, end)`` of each ``(key, start, end)``, all requests in flight at once;
    None for a key that does not exist."""
    import asyncio

    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import default_buffer_prototype

    proto = default_buffer_prototype()

    async def one(key: str, start: int, end: int) -> bytes | None:
        buf = await store.get(key, prototype=proto, byte_range=RangeByteRequest(start, end))
        return None if buf is None else buf.to_bytes()

    async def every() -> list[bytes | None]:
        return list(await asyncio.gather(*(one(*r) for r in requests)))

    return sync(every())

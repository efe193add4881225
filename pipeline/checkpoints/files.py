"""Where checkpoint bytes come from: local files (``os.pread``, as before) or fsspec URLs
(``s3://``, ``gs://``, ...: ranged reads, listings and ``info`` through the URL's filesystem).

The readers and discovery see one small interface: :class:`ByteSource` (size and positioned
reads into a caller's buffer), :func:`read_bytes` for small whole files (indexes, metadata),
:func:`identity` (size and modification time: what tells a file unchanged) and
:class:`RemotePath`, the few ``pathlib.Path`` methods discovery uses, for a remote folder.
The options of a URL's filesystem (credentials, endpoint) come from
:mod:`pipeline.store.remote`; a URL never carries them.

Every failure becomes a one-line :class:`~pipeline.errors.InputError` naming the file.

>>> p = RemotePath("s3://bucket/run/epoch_3.pt")
>>> p.name, p.stem, p.suffix, str(p.parent), str(p.parent / "b.pt")
('epoch_3.pt', 'epoch_3', '.pt', 's3://bucket/run', 's3://bucket/run/b.pt')
"""

from __future__ import annotations

import io
import os
import posixpath
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import InputError
from pipeline.store.remote import is_remote

__all__ = [
    "ByteSource",
    "CkptPath",
    "LocalSource",
    "RemotePath",
    "RemoteSource",
    "Window",
    "canonical_url",
    "exists",
    "identity",
    "is_url",
    "open_source",
    "open_stream",
    "path_of",
    "read_bytes",
    "remote_error",
]


def is_url(path: str) -> bool:
    """Whether ``path`` is a remote URL (read through fsspec); local paths and ``file://``
    URLs are read with ``os.pread``."""
    return is_remote(path)


def _local(path: str) -> str:
    """A local path for a path or ``file://`` URL."""
    if path.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(path).path)
    return path


def fs_of(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` (with the options of its protocol) and its path there."""
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as e:  # an unknown protocol, or its package missing
        raise InputError(f"cannot open this URL: {e}", path=url) from None


def remote_error(e: BaseException, url: str, epoch: int | None = None) -> InputError:
    """A one-line error for a failed remote operation (missing object or bucket, access
    denied, unreachable endpoint), naming the URL; never the options."""
    if isinstance(e, InputError):
        return e
    if isinstance(e, FileNotFoundError):
        reason = "no such object, folder or bucket"
    elif isinstance(e, PermissionError):
        reason = (
            "access denied: check the credentials in the storage options "
            "(--storage-options / storage_options=)"
        )
    else:
        text = " ".join(str(e).split()) or type(e).__name__
        reason = f"cannot read it: {type(e).__name__}: {text[:300]}"
    return InputError(reason, path=url, epoch=epoch)


# --------------------------------------------------------------------------- byte sources
class ByteSource(Protocol):
    """A file opened for positioned reads."""

    path: str
    size: int

    def readinto(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the file's bytes from ``offset`` (all of them, or an error)."""
        ...

    def read(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``offset`` (fewer only at the end of the file)."""
        ...

    def close(self) -> None: ...


class LocalSource:
    """A local file read with ``os.preadv``."""

    def __init__(self, path: str, epoch: int | None = None) -> None:
        self.path = path
        local = _local(path)
        try:
            self._fd: int | None = os.open(local, os.O_RDONLY)
            self.size = os.fstat(self._fd).st_size
        except OSError as e:
            raise InputError(f"cannot read file: {e.strerror}", path=path, epoch=epoch) from e

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        return self._fd

    def readinto(self, view: memoryview, offset: int) -> None:
        done, n = 0, len(view)
        while done < n:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise InputError(
                    f"unexpected end of file at byte {offset + done} (truncated?)", path=self.path
                )
            done += got

    def read(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


#: ranges of one prefetch closer than this are fetched as one (a request costs more)
PREFETCH_MERGE_GAP = 1 << 20


class RemoteSource:
    """A remote object read by ranges (``fs.cat_file(path, start=, end=)``: one request each;
    one source serves every thread).

    :meth:`prefetch` fetches many ranges at once (merged when close, all requests in flight
    together) and keeps them for the calling thread's next reads: a task reading a column's
    tensor pieces one by one then waits for one round trip, not one per piece.
    """

    def __init__(self, url: str, epoch: int | None = None, size: int | None = None) -> None:
        self.path = url
        self._epoch = epoch
        self._local = threading.local()
        self._fs, self._fspath = fs_of(url)
        if size is None:
            try:
                size = int(self._fs.size(self._fspath))
            except Exception as e:
                raise remote_error(e, url, epoch) from None
        self.size = size

    def prefetch(self, ranges: Sequence[tuple[int, int]], gap: int = PREFETCH_MERGE_GAP) -> None:
        """Fetch the byte ranges ``[start, end)`` for this thread's next reads (replacing
        what an earlier call kept); ranges less than ``gap`` bytes apart are fetched as one."""
        spans: list[list[int]] = []
        for a, b in sorted((max(0, a), min(b, self.size)) for a, b in ranges if b > a):
            if spans and a - spans[-1][1] <= gap:
                spans[-1][1] = max(spans[-1][1], b)
            else:
                spans.append([a, b])
        self._local.kept = []
        if not spans:
            return
        try:
            got = self._fs.cat_ranges(
                [self._fspath] * len(spans), [a for a, _ in spans], [b for _, b in spans]
            )
        except Exception as e:
            raise remote_error(e, self.path, self._epoch) from None
        self._local.kept = [(a, bytes(data)) for (a, _b), data in zip(spans, got, strict=True)]

    def read(self, offset: int, n: int) -> bytes:
        end = min(offset + n, self.size)
        if end <= offset:
            return b""
        for a, data in getattr(self._local, "kept", ()):
            if a <= offset and end <= a + len(data):
                return data[offset - a : end - a]
        try:
            return bytes(self._fs.cat_file(self._fspath, start=offset, end=end))
        except Exception as e:
            raise remote_error(e, self.path, self._epoch) from None

    def readinto(self, view: memoryview, offset: int) -> None:
        n = len(view)
        data = self.read(offset, n)
        if len(data) != n:
            raise InputError(
                f"unexpected end of file at byte {offset + len(data)} (truncated?)",
                path=self.path,
                epoch=self._epoch,
            )
        view[:] = data

    def close(self) -> None:
        pass


class Window(io.RawIOBase):
    """``[begin, begin + length)`` of a :class:`ByteSource`, as a read-only seekable file
    (what :mod:`zipfile` reads a zip inside a file through)."""

    def __init__(self, source: ByteSource, begin: int, length: int) -> None:
        super().__init__()
        self._src, self._begin, self._length, self._pos = source, begin, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._length - self._pos))
        if n == 0:
            return 0
        data = self._src.read(self._begin + self._pos, n)
        memoryview(b)[: len(data)] = data
        self._pos += len(data)
        return len(data)


def prefetch_headers(src: ByteSource, offsets: Sequence[int]) -> None:
    """Fetch the local headers of a zip's members at once (a remote source: one round trip
    instead of one per member); ``[]`` drops them."""
    fetch = getattr(src, "prefetch", None)
    if fetch is not None:
        # a header is 30 bytes plus the member's name and extra field (torch: under 128)
        fetch([(o, o + 256) for o in offsets], gap=4096)


def exists(path: str) -> bool:
    """Whether a file is at ``path``."""
    if not is_url(path):
        return os.path.exists(_local(path))
    fs, p = fs_of(path)
    try:
        return bool(fs.exists(p))
    except Exception as e:
        raise remote_error(e, path) from None


def open_source(path: str, epoch: int | None = None) -> ByteSource:
    """The file at ``path`` (local path, ``file://`` or remote URL), for positioned reads."""
    return RemoteSource(path, epoch) if is_url(path) else LocalSource(path, epoch)


def read_bytes(path: str, epoch: int | None = None) -> bytes:
    """The whole (small) file at ``path``."""
    if not is_url(path):
        try:
            with open(_local(path), "rb") as f:
                return f.read()
        except OSError as e:
            raise InputError(f"cannot read file: {e.strerror}", path=path, epoch=epoch) from e
    fs, p = fs_of(path)
    try:
        return bytes(fs.cat_file(p))
    except Exception as e:
        raise remote_error(e, path, epoch) from None


def open_stream(path: str, block_size: int, epoch: int | None = None) -> Any:
    """A binary file object for one sequential read of the whole file (the digest pass):
    remote files are fetched ``block_size`` bytes per request, without caching."""
    if not is_url(path):
        try:
            return open(_local(path), "rb")
        except OSError as e:
            raise InputError(f"cannot read file: {e.strerror}", path=path, epoch=epoch) from e
    fs, p = fs_of(path)
    try:
        return fs.open(p, "rb", block_size=block_size, cache_type="none")
    except Exception as e:
        raise remote_error(e, path, epoch) from None


def identity(path: str, epoch: int | None = None) -> tuple[int, int]:
    """``(size, modification time in ns)`` of a file; the time is -1 when the filesystem does
    not say (then the file is hashed again by every ingest)."""
    if not is_url(path):
        try:
            st = os.stat(_local(path))
        except OSError as e:
            raise InputError(f"cannot read file: {e.strerror}", path=path, epoch=epoch) from e
        return st.st_size, st.st_mtime_ns
    fs, p = fs_of(path)
    try:
        info = fs.info(p)
    except Exception as e:
        raise remote_error(e, path, epoch) from None
    if info.get("type") == "directory":
        raise InputError("a folder, not a file", path=path, epoch=epoch)
    return int(info.get("size") or 0), _mtime_ns(info)


def _mtime_ns(info: dict[str, Any]) -> int:
    """The modification time of an fsspec ``info`` entry, in ns (-1 unknown)."""
    import datetime as dt

    for key in ("LastModified", "last_modified", "mtime", "updated", "modified", "created"):
        v = info.get(key)
        if isinstance(v, dt.datetime):
            if v.tzinfo is None:
                v = v.replace(tzinfo=dt.UTC)
            return int(v.timestamp() * 1e9)
        if isinstance(v, int | float) and v > 0:
            return int(v * 1e9)
        if isinstance(v, str) and v:
            try:
                parsed = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                continue
            return _mtime_ns({"mtime": parsed})
    return -1


# --------------------------------------------------------------------------- remote folders
class RemotePath:
    """A remote file or folder with the ``pathlib.Path`` methods discovery uses. ``kind``
    (``"file"``/``"directory"``) is known when it comes from a listing."""

    def __init__(self, url: str, kind: str | None = None) -> None:
        proto, rest = url.split("://", 1)
        rest = rest.rstrip("/")
        self._url = f"{proto}://{rest}"
        self._kind = kind

    # names
    def __str__(self) -> str:
        return self._url

    def __repr__(self) -> str:
        return f"RemotePath({self._url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other._url == self._url

    def __hash__(self) -> int:
        return hash(self._url)

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self._url}/{name}")

    @property
    def name(self) -> str:
        return posixpath.basename(self._url.split("://", 1)[1])

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        s = self.suffix
        return self.name[: -len(s)] if s else self.name

    @property
    def parent(self) -> RemotePath:
        proto, rest = self._url.split("://", 1)
        head = posixpath.dirname(rest)
        return RemotePath(f"{proto}://{head}") if head else self

    # the filesystem
    def _fs(self) -> tuple[Any, str]:
        return fs_of(self._url)

    def iterdir(self) -> Iterator[RemotePath]:
        fs, p = self._fs()
        try:
            entries = fs.ls(p, detail=True)
        except Exception as e:
            raise remote_error(e, self._url) from None
        for entry in entries:
            name = str(entry["name"]).rstrip("/")
            if name == p.rstrip("/"):
                continue  # some filesystems list a folder's own marker object
            yield RemotePath(fs.unstrip_protocol(name), entry.get("type"))

    def _kind_now(self) -> str | None:
        if self._kind is None:
            fs, p = self._fs()
            try:
                info = fs.info(p)
            except FileNotFoundError:
                return None
            except Exception as e:
                raise remote_error(e, self._url) from None
            self._kind = str(info.get("type"))
        return self._kind

    def is_dir(self) -> bool:
        return self._kind_now() == "directory"

    def is_file(self) -> bool:
        return self._kind_now() == "file"

    def exists(self) -> bool:
        return self._kind_now() is not None

    def read_text(self, encoding: str = "utf-8") -> str:
        return read_bytes(self._url).decode(encoding)

    def glob(self, pattern: str) -> list[str]:
        """URLs matching a glob pattern (the pattern is this path itself)."""
        fs, p = self._fs()
        try:
            return [fs.unstrip_protocol(m) for m in fs.glob(p)]
        except Exception as e:
            raise remote_error(e, self._url) from None

    def invalidate(self) -> None:
        """Forget what the filesystem cached about this folder (listings of an earlier call)."""
        fs, p = self._fs()
        fs.invalidate_cache(p)


#: what discovery walks: a local path, or a remote one
CkptPath = Path | RemotePath


def path_of(item: str) -> CkptPath:
    """The local or remote path ``item`` names."""
    return RemotePath(canonical_url(item)) if is_url(item) else Path(_local(item))


def canonical_url(url: str) -> str:
    """``url`` spelled as its filesystem lists its files (``s3://bucket/run``, no trailing
    slash; ``memory:///x``), so a file named directly and the same file found in a listing
    are recorded alike."""
    if "::" in url:
        return url.rstrip("/")
    fs, p = fs_of(url)
    return str(fs.unstrip_protocol(p.rstrip("/") or p))

"""What a checkpoint file holds, byte for byte: its zip members (and their CRC-32), and its
content digest (:data:`~pipeline.kernels.digests.CONTENT_PREFIX`).

An ingest reads each byte of a new checkpoint once: its tasks digest the 64 KiB blocks they
read whole while copying tensor data, and :func:`digest_blocks` reads the blocks no task read
whole (headers, pickles, zip directories, tensors left out of the trajectory, the blocks at the
edges of the tasks' ranges). :func:`digest_file` is the same digest in one sequential pass, for
a file that must be compared with a recorded one before anything is written (a stored epoch's
file with another path or modification time), and for ``export``'s check of an original file.

Files of a zip format (PyTorch ``.pt``/``.pth``/``.bin``/``.ckpt``, the archives inside a
Distributed Checkpoint's ``.distcp`` files) have their stored members' CRC-32 checked from the
same reads: a flipped bit is an :class:`~pipeline.errors.InputError` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import struct
import zipfile
from dataclasses import dataclass
from typing import Any

from pipeline.buffers import scratch
from pipeline.checkpoints.files import (
    ByteSource,
    Window,
    is_url,
    open_source,
    open_stream,
    prefetch_headers,
    remote_error,
)
from pipeline.config import READ_BLOCK_BYTES
from pipeline.errors import InputError
from pipeline.kernels.digests import (
    BLOCK_BYTES,
    BlockRanges,
    BlockRun,
    FileDigest,
    block_leaf,
    block_span,
    n_blocks,
)

__all__ = [
    "SHA256",
    "FileLayout",
    "check_members",
    "digest_blocks",
    "digest_file",
    "file_layout",
    "zip_members",
]

#: the scheme of stores written before content digests: a sha256 of the whole file
SHA256 = "sha256"
#: files that are zip archives when they are PyTorch checkpoints
ZIP_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

Member = tuple[str, int, int, int]  # (name, data begin, data end, crc)


@dataclass(frozen=True)
class FileLayout:
    """A file of a checkpoint as the digest needs it: its size and its zip members' data
    ranges and CRC-32 (``()`` for other formats), sorted by offset."""

    path: str
    size: int
    members: tuple[Member, ...] = ()

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        """The members' data ranges ``[begin, end)``."""
        return tuple((b, e) for _n, b, e, _c in self.members)


def zip_members(src: ByteSource) -> list[Member]:
    """``(name, data begin, data end, crc)`` of the stored (uncompressed) members of a zip."""
    try:
        zf = zipfile.ZipFile(io.BufferedReader(Window(src, 0, src.size)))
    except (zipfile.BadZipFile, OSError, ValueError):
        return []  # not a zip: the reader reports it with a clear message
    out = []
    with zf:
        stored = [zi for zi in zf.infolist() if zi.compress_type == zipfile.ZIP_STORED]
        prefetch_headers(src, [zi.header_offset for zi in stored])
        for zi in stored:
            hdr = src.read(zi.header_offset, 30)
            if len(hdr) < 30 or hdr[:4] != b"PK\x03\x04":
                raise InputError(f"corrupt zip local header for {zi.filename}", path=src.path)
            nlen, xlen = struct.unpack("<HH", hdr[26:30])
            begin = zi.header_offset + 30 + nlen + xlen
            out.append((zi.filename, begin, begin + zi.compress_size, zi.CRC))
        prefetch_headers(src, [])
    return out


def file_layout(path: str, epoch: int | None = None, src: ByteSource | None = None) -> FileLayout:
    """The size and zip members of the file at ``path`` (reads its directories only)."""
    own = src is None
    s = open_source(path, epoch) if src is None else src
    try:
        if path.endswith(".distcp"):
            from pipeline.checkpoints.distcp import distcp_members

            members = distcp_members(path, s)
        else:
            members = zip_members(s) if path.endswith(ZIP_SUFFIXES) else []
        size = s.size
    finally:
        if own:
            s.close()
    members = sorted(members, key=lambda m: m[1])
    for (_n0, _b0, e0, _c0), (n1, b1, _e1, _c1) in itertools.pairwise(members):
        if b1 < e0:
            raise InputError(f"zip member {n1} overlaps another one", path=path, epoch=epoch)
    return FileLayout(path, size, tuple(members))


def check_members(layout: FileLayout, crcs: list[int], epoch: int | None) -> None:
    """Raise when a member's CRC-32 (computed from the blocks) is not the recorded one."""
    for (name, _b, _e, want), got in zip(layout.members, crcs, strict=True):
        if want != got:
            raise InputError(
                f"zip member {name} fails its CRC check (corrupted file)",
                path=layout.path,
                epoch=epoch,
            )


def digest_blocks(
    layout: FileLayout, ranges: BlockRanges, epoch: int | None = None
) -> tuple[BlockRun, ...]:
    """Read and digest the blocks ``ranges`` of a file (the ingest's pass over the bytes no
    task read whole); raises when the file's size changed since ``layout`` was taken."""
    src = open_source(layout.path, epoch)
    members = layout.ranges
    out = []
    try:
        if src.size != layout.size:
            raise InputError(
                f"changed while it was ingested ({layout.size} bytes, now {src.size})",
                path=layout.path,
                epoch=epoch,
            )
        step = max(1, READ_BLOCK_BYTES // BLOCK_BYTES)
        for a, b in ranges:
            for k0 in range(a, b, step):
                k1 = min(b, k0 + step)
                begin, end = k0 * BLOCK_BYTES, block_span(k1 - 1, layout.size)[1]
                buf = scratch("content-read", end - begin, "u1")
                view = memoryview(buf)
                src.readinto(view, begin)
                leaves, crcs = [], []
                for k in range(k0, k1):
                    bb, be = block_span(k, layout.size)
                    d, c = block_leaf(view[bb - begin : be - begin], bb, members)
                    leaves.append(d)
                    crcs.append(c)
                out.append((k0, b"".join(leaves), tuple(crcs) if members else ()))
    except InputError as e:
        if e.path is None or e.epoch is None:
            raise InputError(e.reason, path=layout.path, epoch=epoch, key=e.key) from None
        raise
    except Exception as e:
        if not is_url(layout.path):
            raise InputError(f"cannot read file: {e}", path=layout.path, epoch=epoch) from e
        raise remote_error(e, layout.path, epoch) from None
    finally:
        src.close()
    return tuple(out)


def digest_file(path: str, epoch: int | None = None, scheme: str = "content") -> tuple[int, str]:
    """Size and digest of a file in one sequential read (a remote file: 8 MiB per request):
    its content digest, or (``scheme="sha256"``) the sha256 that older stores record.

    The CRC-32 of every stored zip member is checked during the same read, so a flipped bit
    is caught without a second pass.
    """
    layout = file_layout(path, epoch)
    members = layout.ranges
    fd = FileDigest(layout.size, members)
    h = hashlib.sha256() if scheme == SHA256 else None
    buf = scratch("content-read", READ_BLOCK_BYTES, "u1")
    mv = memoryview(buf)
    pos = 0
    remote = is_url(path)
    with open_stream(path, READ_BLOCK_BYTES, epoch) as f:
        while True:
            got = _fill(f, mv, path, epoch, remote)
            if not got:
                break
            if h is not None:
                h.update(mv[:got])
            k0 = pos // BLOCK_BYTES  # pos is on the block grid: every read but the last is full
            end = min(pos + got, layout.size)
            leaves, crcs = [], []
            for k in range(k0, n_blocks(end)):
                bb, be = block_span(k, layout.size)
                d, c = block_leaf(mv[bb - pos : be - pos], bb, members)
                leaves.append(d)
                crcs.append(c)
            fd.add((k0, b"".join(leaves), tuple(crcs) if members else ()))
            pos += got
            if got < len(mv):
                break
    if pos != layout.size:
        raise InputError(
            f"file changed while reading ({layout.size} bytes expected, {pos} read)",
            path=path,
            epoch=epoch,
        )
    check_members(layout, fd.member_crcs(), epoch)
    return layout.size, (h.hexdigest() if h is not None else fd.digest())


def _fill(f: Any, mv: memoryview, path: str, epoch: int | None, remote: bool) -> int:
    """Read into all of ``mv`` unless the file ends first; the number of bytes read."""
    done = 0
    while done < len(mv):
        try:
            got = f.readinto(mv[done:])
        except InputError:
            raise
        except Exception as e:
            if not remote:
                raise InputError(f"cannot read file: {e}", path=path, epoch=epoch) from e
            raise remote_error(e, path, epoch) from None
        if not got:
            break
        done += got
    return done

"""Object storage: the fsspec options (``storage_options``) of remote stores and checkpoints.

Stores and checkpoints are named by URL everywhere (in tasks, in the store's records); the
options that reach them (credentials, ``endpoint_url``, ``anon``...) are never part of a URL,
a task's arguments, the store's metadata or a report. They are set per fsspec protocol
(``s3``, ``gs``, ``abfs``...) as fsspec's own configuration defaults (``fsspec.config.conf``,
what the ``FSSPEC_S3='{...}'`` environment variables set too), so every filesystem of that
protocol opened in this process picks them up: zarr's, and the checkpoint readers'.

:func:`storage_options` applies them for the duration of an operation on the client;
:func:`snapshot` is what the runtime installs on Dask workers (a worker plugin, replaced
whenever the options change) so that tasks opening the same URLs there get the same options.
Explicitly passed filesystem arguments always win over these defaults.

>>> protocol_of("s3://bucket/store.zarr"), protocol_of("/data/store.zarr")
('s3', None)
>>> protocol_of("file:///data/store.zarr"), protocol_of("gs://b/run/")
(None, 'gs')
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from pipeline.errors import InputError

__all__ = [
    "LOCAL_PROTOCOLS",
    "StorageOptions",
    "install",
    "is_remote",
    "options_key",
    "parse_options",
    "protocol_of",
    "snapshot",
    "storage_options",
    "uninstall",
    "with_storage_options",
]

StorageOptions = Mapping[str, Any]
_F = TypeVar("_F", bound=Callable[..., Any])

#: protocols of the local filesystem: no options, read with os.pread
LOCAL_PROTOCOLS = frozenset({"file", "local"})

_lock = threading.RLock()
#: protocol -> the options this process applied (what the workers get); generation counts changes
_applied: dict[str, dict[str, Any]] = {}
_generation = 0


def protocol_of(url: str) -> str | None:
    """The fsspec protocol of a remote URL (the outermost of a chained one), None for a
    local path or ``file://`` URL."""
    s = str(url)
    if "://" not in s:
        return None
    proto = s.split("://", 1)[0].split("::")[-1].lower()
    return None if proto in LOCAL_PROTOCOLS else proto


def is_remote(url: str) -> bool:
    """Whether ``url`` names something on a non-local fsspec filesystem."""
    return protocol_of(url) is not None


def parse_options(text: str | None, where: str = "--storage-options") -> dict[str, Any] | None:
    """Storage options from JSON text (an object), or a one-line :class:`InputError`.

    >>> parse_options('{"anon": true}')
    {'anon': True}
    >>> parse_options("") is None
    True
    """
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(
            f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); give an "
            'object such as \'{"endpoint_url": "http://127.0.0.1:9000", "anon": false}\''
        ) from None
    return check_options(value, where)


def check_options(value: Any, where: str = "storage_options") -> dict[str, Any]:
    """``value`` as a dict of options, or a one-line :class:`InputError` (never echoing the
    values: they may hold credentials)."""
    if not isinstance(value, Mapping):
        raise InputError(
            f"{where}: expected a JSON object of fsspec options (key/secret, endpoint_url, "
            f"client_kwargs, ...), got a {type(value).__name__}"
        )
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise InputError(f"{where}: option names must be strings")
    return dict(value)


def _conf() -> dict[str, dict[str, Any]]:
    import fsspec.config

    return fsspec.config.conf


def install(options: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Set ``{protocol: options}`` as this process's fsspec defaults (merged over what is
    there); returns the token :func:`uninstall` takes to put the previous values back."""
    conf = _conf()
    previous: dict[str, Any] = {}
    mine: dict[str, dict[str, Any]] = {}
    with _lock:
        for proto, opts in options.items():
            previous[proto] = conf.get(proto)
            mine[proto] = {**(conf.get(proto) or {}), **opts}
            conf[proto] = mine[proto]
    return {"previous": previous, "mine": mine}


def uninstall(token: Mapping[str, Any]) -> None:
    """Undo :func:`install`: each protocol gets its earlier defaults back, unless something
    else has replaced ours since (then that stays)."""
    conf = _conf()
    with _lock:
        for proto, mine in token["mine"].items():
            if conf.get(proto) is not mine:
                continue
            before = token["previous"].get(proto)
            if before is None:
                conf.pop(proto, None)
            else:
                conf[proto] = before


@contextlib.contextmanager
def storage_options(options: StorageOptions | None, urls: Iterable[str]) -> Iterator[None]:
    """Apply ``options`` to the protocols of the remote ``urls`` while inside (in this
    process; the runtime copies them to its Dask workers before it runs tasks).

    Local paths take no options; options given for local paths only are ignored. One dict
    serves every remote URL of the call (the store and the checkpoints).
    """
    global _generation
    if not options:
        yield
        return
    opts = check_options(options)
    protocols = sorted({p for u in urls if (p := protocol_of(str(u))) is not None})
    if not protocols:
        yield
        return
    with _lock:
        token = install({p: opts for p in protocols})
        before = {p: _applied.get(p) for p in protocols}
        _applied.update(token["mine"])
        _generation += 1
    try:
        yield
    finally:
        with _lock:
            uninstall(token)
            for p, old in before.items():
                if old is None:
                    _applied.pop(p, None)
                else:
                    _applied[p] = old
            _generation += 1


def snapshot() -> tuple[int, dict[str, dict[str, Any]]]:
    """``(generation, {protocol: options})``: the options applied in this process now, and a
    number that changes whenever they do (the runtime re-installs them on its workers then)."""
    with _lock:
        return _generation, {p: dict(o) for p, o in _applied.items()}


def options_key(url: str) -> str:
    """A digest of the options that apply to ``url`` now ("" for a local path): keys caches of
    opened stores and readers, so a change of options opens them afresh."""
    proto = protocol_of(url)
    if proto is None:
        return ""
    opts = _conf().get(proto) or {}
    text = json.dumps(opts, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_storage_options(*url_params: str) -> Callable[[_F], _F]:
    """Decorate an operation that takes ``storage_options=``: its options apply to the URLs
    its parameters ``url_params`` name (strings, or sequences of them) during the call."""

    def decorate(f: _F) -> _F:
        sig = inspect.signature(f)

        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            opts = kwargs.get("storage_options")
            if not opts:
                return f(*args, **kwargs)
            bound = sig.bind_partial(*args, **kwargs)
            urls: list[str] = []
            for name in url_params:
                v = bound.arguments.get(name)
                if isinstance(v, str) or hasattr(v, "__fspath__"):
                    urls.append(str(v))
                elif isinstance(v, Iterable):  # URLs, or (URL, name) pairs (compare's runs)
                    for x in v:
                        first = x[0] if isinstance(x, tuple | list) and x else x
                        if isinstance(first, str) or hasattr(first, "__fspath__"):
                            urls.append(str(first))
                elif v is not None and hasattr(v, "url"):  # an open TrajectoryStore
                    urls.append(str(v.url))
            with storage_options(opts, urls):
                return f(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate

"""Task arguments dask passes through without walking them.

When dask builds a graph from a delayed call it walks every list, tuple, dict and dataclass
in the call's arguments, looking for dask collections to depend on. A task whose arguments
hold a plan of hundreds of small objects (an ingest chunk's segments and digest plans, a fit
block's layers) pays for that walk in the client, before any task runs: about 15 ms per task
for a 300-tensor model in ingest, about 0.75 ms per fit block (77 blocks: 0.091 s against
0.033 s packed; a billion float32 parameters at T = 100 make some 6,000 blocks).
:class:`Packed` holds such arguments as one opaque object (they must hold no dask
collection); :func:`call_packed` unpacks them in the task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Packed", "call_packed"]


class Packed:
    """Arguments of a task, kept as they are by dask (no collection may be among them)."""

    __slots__ = ("args",)

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        return (Packed, (self.args,))


def call_packed(fn: Callable[..., Any], packed: Packed, *rest: Any) -> Any:
    """``fn(*packed.args, *rest)``: ``rest`` holds what dask does resolve (other tasks'
    results, shared arguments given as delayed objects)."""
    return fn(*packed.args, *rest)

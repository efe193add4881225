"""A Ctrl-C is never lost: Python ignores an exception raised inside ``__del__``, so a SIGINT
landing in a finalizer (a reader closing its file) would let the work run on and commit."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import pytest
from dask import delayed

from pipeline.runtime import RuntimeOptions, check_interrupted, interruptible, runner


class _InterruptedInFinalizer:
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs here and its raise is dropped
        for _ in range(1000):  # bytecodes, so that the handler runs inside this __del__
            pass


def _task(i: int, ran: list[int]) -> int:
    ran.append(i)
    if len(ran) == 1:  # the first task to run, whichever dask's order picks (keys are random)
        obj = _InterruptedInFinalizer()
        del obj
    return i


@pytest.mark.parametrize("mode", ["sync", "threads"])
def test_swallowed_ctrl_c_stops_the_computation(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)  # what Python does with it
    ran: list[int] = []
    tasks = [delayed(_task, pure=False)(i, ran) for i in range(40)]
    opts = RuntimeOptions(mode=mode, workers=1, progress=False)
    with interruptible(), runner(opts) as run, pytest.raises(KeyboardInterrupt):
        run.compute(tasks, "interrupt me")
    if mode == "sync" or dropped:  # (a thread's __del__ gets no signal: then it just stops)
        assert dropped and isinstance(dropped[0].exc_value, KeyboardInterrupt)
    # stopped at the end of the task that was interrupted, not run to completion
    assert len(ran) == 1 if mode == "sync" else len(ran) < 40
    check_interrupted()  # the flag is cleared on leaving interruptible()


def test_outside_interruptible_nothing_is_remembered() -> None:
    check_interrupted()
    with interruptible():
        check_interrupted()

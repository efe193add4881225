"""The CMD papers' claims, tested on MNIST-1D: one workflow, a verdict per claim.

``python -m workflows.reproduce`` trains the MNIST-1D workflow's models over several training
seeds, runs them through the real pipeline (``pipeline.ingest``, ``pipeline.fit``,
``pipeline.evaluate`` with the workflow's own evaluator, on a LocalCluster), runs Online,
Embedded and federated CMD, and judges nine claims of the papers (002: the CMD paper; 001:
Online and Embedded CMD) by one rule stated in :mod:`~workflows.reproduce.stats`. It writes
``OUT/report.md`` (a table of claims: measured numbers, 95% intervals, paired tests,
verdicts), ``OUT/results.json`` and the figures matching the papers' (``OUT/figures``).

Layout
------
:mod:`~workflows.reproduce.settings` (:class:`Settings`, the full and quick presets),
:mod:`~workflows.reproduce.stats` (intervals, paired tests, the verdict rule),
:mod:`~workflows.reproduce.runner` (training, the pipeline parts per seed, the cache),
:mod:`~workflows.reproduce.dmd` (whole-network and per-node DMD reconstructions),
:mod:`~workflows.reproduce.online` (claims 7-8), :mod:`~workflows.reproduce.federated`
(claim 9), :mod:`~workflows.reproduce.claims` (one function per claim),
:mod:`~workflows.reproduce.report` (Markdown, JSON, figures),
:mod:`~workflows.reproduce.cli` (the command line).

Examples
--------
The full run (5 training seeds, 100 epochs; about 32 CPU-minutes, mostly on one core:
35 minutes on an idle two-core machine, up to an hour on a busy one)::

    python -m workflows.reproduce --out runs/reproduce

The tiny run of the test suite (the numbers mean nothing; the structure and the verdict
logic are what it checks)::

    python -m workflows.reproduce --quick --threads --out /tmp/reproduce_quick
"""

from __future__ import annotations

from workflows.reproduce.claims import CLAIMS, ClaimResult, ClaimTest, evaluate_claims
from workflows.reproduce.cli import main, reproduce
from workflows.reproduce.settings import FULL, QUICK, Settings
from workflows.reproduce.stats import MARGIN, RULE, combine, summarise, verdict

__all__ = [
    "CLAIMS",
    "FULL",
    "MARGIN",
    "QUICK",
    "RULE",
    "ClaimResult",
    "ClaimTest",
    "Settings",
    "combine",
    "evaluate_claims",
    "main",
    "reproduce",
    "summarise",
    "verdict",
]

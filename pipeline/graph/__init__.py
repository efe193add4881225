"""Dask graph builders, one module per operation: they create tasks, never compute them.

:mod:`.ingest` (inspect and write chunks), :mod:`.fit` (the CMD pass and the sampling scan),
:mod:`.reconstruct`, :mod:`.stability`, :mod:`.online` (store-backed Online CMD) and
:mod:`.baselines` (Gram matrix, DMD and CMD error passes). Each ``build_*`` function returns
delayed tasks; the operations in :mod:`pipeline.ops` run them (``tests/graphs/test_graphs_lazy.py``
checks that building reads and computes nothing).
"""

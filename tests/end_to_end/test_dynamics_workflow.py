"""The run-comparison workflow on tiny runs (the real table is in docs/results.md)."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from references import assert_p_apart, exact_p_apart

from pipeline.errors import PipelineWarning
from pipeline.ops.compare import compare
from pipeline.runtime import RuntimeOptions, runner
from workflows.dynamics import EXPERIMENTS, run_experiment


def test_widths_experiment_tiny(tmp_path: Path) -> None:
    # the narrow MLP has fewer varying parameters than K = 1000: the fit says so (any other
    # warning still fails the test)
    with (runner(RuntimeOptions(mode="threads", progress=False)) as rt,
          pytest.warns(PipelineWarning, match="parameters vary over the window")):
        res = run_experiment(tmp_path, EXPERIMENTS["widths"], [0, 1], epochs=12, modes=3, delays=2,
                             shuffles=5, rt=rt)
    assert res["groups"] == ["w8", "w256"] and len(res["runs"]) == 4
    labels = ["w8", "w8", "w256", "w256"]  # the runs' order: group by group, seed by seed
    assert res["runs"] == ["w8-s0", "w8-s1", "w256-s0", "w256-s1"]
    n_perm = inspect.signature(compare).parameters["permutations"].default
    for source in ("refs", "pcs"):
        r = res[source]
        d = np.asarray(r["distances"])
        assert d.shape == (4, 4) and np.array_equal(d, d.T) and not d.diagonal().any()
        # the group means are those of the distance matrix
        assert r["within"]["w8"] == d[0, 1] and r["within"]["w256"] == d[2, 3]
        assert r["between_mean"] == np.mean([d[0, 2], d[0, 3], d[1, 2], d[1, 3]])
        # the permutation p against the exact p by enumeration: 2 + 2 runs have 6 relabellings
        # (3 splits), so the exact p is 1/3, 2/3 or 1, which a Monte Carlo p of n_perm
        # relabellings estimates to about 0.01
        exact = exact_p_apart(d, labels)
        assert exact[0] in (1 / 3, 2 / 3, 1.0) or exact[0] != exact[1], (source, exact)
        assert r["p_apart"] is not None
        assert_p_apart(r["p_apart"], exact, n_perm)

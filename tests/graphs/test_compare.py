"""``compare`` on stores (issue 8, part 1): Koopman spectra from the CMD references or from
the trajectory's principal components, distances, the time-shuffle control, and the
permutation test between groups of runs."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import SYNC, THREADS, planted_rows, rows_to_state_dicts, write_safetensors_run
from references import assert_p_apart, exact_p_apart

import pipeline
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.ops.compare import _permutation_p, compare

T = 30


def _profiles(kind: str) -> np.ndarray:
    t = np.linspace(0, 1, T)
    if kind == "decay":
        return np.stack([np.exp(-4 * t), np.exp(-9 * t), 1 / (1 + np.exp(-12 * (t - 0.3)))])
    return np.stack([np.sin(7 * t), np.cos(7 * t) * np.exp(-t), np.sin(15 * t) * t])


def _run(root: Path, kind: str, seed: int, rows: np.ndarray | None = None) -> str:
    rng = np.random.default_rng(seed)
    w = planted_rows(3000, _profiles(kind), rng, noise=1e-3).noisy if rows is None else rows
    sds = rows_to_state_dicts({"w": ((60, 50), torch.float32, w)})
    ck = write_safetensors_run(root / f"ck-{kind}-{seed}", sds)[0].parent
    store = str(root / f"{kind}-{seed}.zarr")
    pipeline.ingest([str(ck)], store, runtime=SYNC)
    pipeline.fit(store, "s", modes=3, samples=300, runtime=SYNC)
    return store


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cmp")
    rng = np.random.default_rng(0)
    base = planted_rows(3000, _profiles("decay"), rng, noise=1e-3).noisy
    # a conjugate copy: the same parameters permuted and sign-flipped (another parametrisation)
    perm = rng.permutation(base.shape[0])
    sign = rng.choice([-1.0, 1.0], size=base.shape[0])[:, None]
    out = {"a": _run(root, "decay", 0, base), "a_conj": _run(root, "decay", 99, base[perm] * sign)}
    for s in (1, 2, 3, 4):
        out[f"decay{s}"] = _run(root, "decay", s)
        out[f"osc{s}"] = _run(root, "osc", s)
    return out


def test_conjugate_copy_is_equivalent_and_other_dynamics_are_not(stores) -> None:
    res = compare(
        [(stores["a"], "s"), (stores["a_conj"], "s"), (stores["osc1"], "s")],
        source="pcs",
        d=4,
        delays=2,
        shuffles=30,
        runtime=THREADS,
    )
    d = np.asarray(res.distances)
    assert d[0, 1] < 1e-6  # same Gram up to rounding: same spectrum
    assert d[0, 2] > 100 * max(d[0, 1], 1e-9)
    pair01 = next(p for p in res.pairs if (p["i"], p["j"]) == (0, 1))
    assert pair01["p_close"] == 0.0 and pair01["normalised"] < 1e-3
    pair02 = next(p for p in res.pairs if (p["i"], p["j"]) == (0, 2))
    assert pair02["normalised"] > 0.1
    assert "1-Wasserstein" in res.table()


def test_refs_source_and_groups(stores) -> None:
    runs = [(stores[f"decay{s}"], "s") for s in (1, 2, 3, 4)] + [
        (stores[f"osc{s}"], "s") for s in (1, 2, 3, 4)
    ]
    res = compare(
        runs,
        source="refs",
        delays=2,
        shuffles=10,
        groups=["decay"] * 4 + ["osc"] * 4,
        permutations=1000,
        runtime=SYNC,
    )
    d = np.asarray(res.distances)
    grp = np.array([0] * 4 + [1] * 4)
    within = d[(grp[:, None] == grp[None, :]) & ~np.eye(8, dtype=bool)]
    between = d[grp[:, None] != grp[None, :]]
    assert within.max() < between.min()
    # 4 + 4 runs, separated: of the 70 relabellings only the observed one and its swap are
    # as far apart, so the exact p is 2/70, the smallest possible
    exact = exact_p_apart(d, res.groups or [])
    assert exact == (2 / 70, 2 / 70)
    assert res.p_apart is not None
    assert_p_apart(res.p_apart, exact, 1000)
    assert all(len(r["eigenvalues"]) > 0 for r in res.runs)


def _random_distances(rng: np.random.Generator, k: int) -> np.ndarray:
    x = rng.standard_normal((k, 3))
    return np.sqrt(((x[:, None] - x[None, :]) ** 2).sum(axis=-1))


@pytest.mark.parametrize(
    "groups", [["a"] * 3 + ["b"] * 3, ["a"] * 2 + ["b"] * 4, ["a", "b", "a", "b", "b", "a", "b"]]
)
def test_permutation_p_matches_exact_enumeration(groups: list[str]) -> None:
    """The permutation test against the exact p by enumeration, on distance matrices whose
    exact p is known: random points (several different p), two separated clusters (the
    smallest possible p) and identical runs (every relabelling ties: p = 1)."""
    n = 20_000
    rng = np.random.default_rng(7)
    labels = np.asarray(groups)
    seen = set()
    for _ in range(6):
        d = _random_distances(rng, len(groups))
        exact = exact_p_apart(d, groups)
        assert exact[0] == exact[1]  # no near-ties in random data
        seen.add(exact[0])
        assert_p_apart(_permutation_p(d, groups, n, np.random.default_rng(1)), exact, n)
    assert len(seen) >= 3  # the check is made at several different p
    # two clusters far apart: only the observed split and (equal sizes) its swap are as extreme
    x = rng.standard_normal((len(groups), 2)) * 0.01 + 10.0 * (labels == "b")[:, None]
    d = np.sqrt(((x[:, None] - x[None, :]) ** 2).sum(axis=-1))
    n_a = int((labels == "a").sum())
    n_splits = math.comb(len(groups), n_a)
    assert len(set(itertools.permutations(groups))) == n_splits
    smallest = (2 if 2 * n_a == len(groups) else 1) / n_splits
    assert exact_p_apart(d, groups) == (smallest, smallest)
    p = _permutation_p(d, groups, n, np.random.default_rng(2))
    assert_p_apart(p, (smallest, smallest), n)
    # identical runs: all distances equal (0 or not), every relabelling ties, p = 1 exactly
    for value in (0.0, 0.1):
        d = np.full((len(groups), len(groups)), value)
        np.fill_diagonal(d, 0.0)
        assert exact_p_apart(d, groups) == (1.0, 1.0)  # every statistic equals the observed
        assert _permutation_p(d, groups, 500, np.random.default_rng(3)) == 1.0


def test_errors_and_cli(stores) -> None:
    with pytest.raises(PipelineError, match="at least two"):
        compare([(stores["a"], "s")])
    with pytest.raises(PipelineError, match="group label"):
        compare([(stores["a"], "s"), (stores["osc1"], "s")], groups=["x"])
    r = CliRunner().invoke(
        main,
        [
            "compare",
            "--store",
            stores["a"],
            "--name",
            "s",
            "--with",
            f"{stores['osc1']}:s",
            "--with",
            f"{stores['a_conj']}:s",
            "--source",
            "pcs",
            "--shuffles",
            "5",
            "--threads",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "1-Wasserstein" in r.output and "p_close" in r.output
    r = CliRunner().invoke(
        main, ["compare", "--store", stores["a"], "--name", "s", "--with", "nocolon"]
    )
    assert r.exit_code != 0 and "STORE:NAME" in r.output


def test_saved_with_the_study_and_reported(stores, tmp_path: Path) -> None:
    """compare and stability results kept with a study appear in its report."""
    r = CliRunner().invoke(
        main,
        [
            "compare",
            "--store",
            stores["decay1"],
            "--name",
            "s",
            "--with",
            f"{stores['osc1']}:s",
            "--shuffles",
            "5",
            "--sync",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "saved with the first study" in r.output
    r = CliRunner().invoke(
        main,
        [
            "stability",
            "--store",
            stores["decay1"],
            "--name",
            "s",
            "--mode-windows",
            "10:10",
            "--modes",
            "3",
            "--sync",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "saved with study 's'" in r.output and "0:10 -> 10:20: overall" in r.output
    rep = pipeline.report(stores["decay1"], "s", out=tmp_path / "r.html")
    page = Path(rep.copy or "").read_text()
    assert "Dynamical equivalence of runs" in page and "SVD stability" in page
    assert "change mode between sliding windows" in page
    assert {"koopman_eigenvalues.png", "distances.png", "stability.png"} <= set(rep.figures)
    assert page.count("data:image/png;base64,") == len(rep.figures)

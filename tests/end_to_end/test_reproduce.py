"""The reproduction workflow (``python -m workflows.reproduce``): structure and verdict logic.

One ``--quick`` run (2 training seeds, 6 epochs, 300/200 sequences, every claim, the pipeline
on threads; about 35 s on two cores) is checked for structure: every claim present and judged,
every number finite, each test's per-seed values the paired differences of its arms, and each
verdict the one the stated rule gives on the reported per-seed values, recomputed here with
an independent implementation (numpy and a table of Student-t quantiles). The accuracy numbers
of a quick run mean nothing and are not checked. The rule itself is checked on synthetic
values with known verdicts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("mnist1d")

from workflows.reproduce import CLAIMS, MARGIN, QUICK, ClaimResult, ClaimTest, evaluate_claims, main
from workflows.reproduce.claims import layer_share
from workflows.reproduce.stats import t_interval

#: t(0.975, df) for df = 1..9 (printed tables), independent of scipy
T975 = {
    1: 12.706205,
    2: 4.302653,
    3: 3.182446,
    4: 2.776445,
    5: 2.570582,
    6: 2.446912,
    7: 2.364624,
    8: 2.306004,
    9: 2.262157,
}
VERDICTS = {"supported", "not supported", "contradicted"}


def _interval(values: list[float]) -> tuple[float, float, float]:
    x = np.asarray(values, dtype=np.float64)
    half = T975[x.size - 1] * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def _one_sided(lo: float, hi: float, theta: float) -> str:
    if lo > theta:
        return "supported"
    if hi < theta:
        return "contradicted"
    return "not supported"


def _rule(values: list[float], theta: float, band: bool) -> str:
    """The stated rule, written again: interval above θ, below θ, or neither; a band test
    ("nearly invariant") needs the interval inside (θ, -θ) and is contradicted outside it."""
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return "not supported"
    _, lo, hi = _interval(values)
    if not band:
        return _one_sided(lo, hi, theta)
    if lo > -theta or hi < theta:
        return "contradicted"
    return "supported" if theta < lo and hi < -theta else "not supported"


def _claim_rule(verdicts: list[str]) -> str:
    if "contradicted" in verdicts:
        return "contradicted"
    return "supported" if verdicts and set(verdicts) == {"supported"} else "not supported"


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("reproduce")
    assert main(["--quick", "--threads", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_quick_run_judges_every_claim_by_the_stated_rule(quick) -> None:
    out, res = quick
    claims = res["claims"]
    assert [c["id"] for c in claims] == [c.id for c in CLAIMS] == list(range(1, 10))
    seeds = res["settings"]["seeds"]
    assert res["margin"] == MARGIN and "SUPPORTED" in res["rule"]
    for c in claims:
        assert c["verdict"] in VERDICTS, (c["id"], c["verdict"], c["reason"])
        assert c["tests"], c["id"]
        counted = []
        for t in c["tests"]:
            values = t["values"]
            assert len(values) == len(seeds) and all(math.isfinite(v) for v in values), t
            # the per-seed values are the paired differences of the arms (or the one arm)
            arms = list(t["arms"].values())
            expect = np.subtract(arms[0], arms[1]) if len(arms) == 2 else np.asarray(arms[0])
            np.testing.assert_allclose(values, expect, rtol=0, atol=1e-12)
            mean, lo, hi = _interval(values)
            assert t["mean"] == pytest.approx(mean, abs=1e-12)
            assert t["lo"] == pytest.approx(lo, abs=1e-6) and t["hi"] == pytest.approx(hi, abs=1e-6)
            # the threshold is one of the rule's, chosen by wording, not by the numbers
            assert t["threshold"] in (-MARGIN, 0.0, MARGIN, 0.5)
            assert t["verdict"] == _rule(values, t["threshold"], t["band"]), (c["id"], t["label"])
            if not t["supplementary"]:
                counted.append(t["verdict"])
        assert c["verdict"] == _claim_rule(counted), c["id"]
    # the report: one row per claim with its verdict, the rule, the figures it names
    text = (out / "report.md").read_text(encoding="utf-8")
    for c in claims:
        assert f"| {c['id']} |" in text and f"**{c['verdict']}**" in text
    assert "## The rule" in text
    assert set(res["figures"]) == {str(i) for i in range(1, 10)}
    for files in res["figures"].values():
        for f in files:
            assert (out / "figures" / f).stat().st_size > 0 and f"figures/{f}" in text


def test_quick_run_went_through_the_pipeline(quick) -> None:
    out, res = quick
    # a store per recorded run, evaluated by the mnist1d workflow's evaluator
    for setting in ("cnn", "cnn_augment", "resnet"):
        for seed in res["settings"]["seeds"]:
            run = out / "runs" / setting / f"seed{seed}"
            assert (run / "run" / "run.json").is_file() and (run / "store.zarr").is_dir()
    m = json.loads((out / "measurements.json").read_text(encoding="utf-8"))["measurements"]
    base = m["posthoc"]["cnn"]["base"]["0"]
    recorded = json.loads((out / "runs/cnn/seed0/run/run.json").read_text(encoding="utf-8"))
    # GD accuracies through pipeline.evaluate are the ones recorded while training
    assert base["gd"] == [e["test_accuracy"] for e in recorded["epochs"]]
    assert set(base["cmd_by_seed"]) == {str(s) for s in res["settings"]["sampling_seeds"]}


def test_render_rebuilds_the_same_verdicts(quick) -> None:
    out, res = quick
    assert main(["--render", "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [c["verdict"] for c in again["claims"]] == [c["verdict"] for c in res["claims"]]
    assert [t["values"] for c in again["claims"] for t in c["tests"]] == [
        t["values"] for c in res["claims"] for t in c["tests"]
    ]


# --------------------------------------------------------------------------- the rule alone
@pytest.mark.parametrize(
    ("values", "theta", "band", "verdict"),
    [
        ([0.02, 0.03, 0.025, 0.028, 0.022], -MARGIN, False, "supported"),
        ([-0.005, 0.0, -0.002, 0.001, -0.003], -MARGIN, False, "supported"),  # within margin
        ([-0.05, -0.04, -0.06, -0.045, -0.055], -MARGIN, False, "contradicted"),
        ([0.05, -0.05, 0.01, -0.03, 0.02], -MARGIN, False, "not supported"),  # too noisy
        ([0.001, 0.002, 0.0015], 0.0, False, "supported"),
        ([-0.001, -0.002, -0.0015], 0.0, False, "contradicted"),
        ([0.05, 0.06, 0.04], MARGIN, False, "supported"),  # "loses more than the margin"
        ([0.004, 0.006, 0.005], MARGIN, False, "contradicted"),  # loses less than it
        ([0.9, 0.8, 0.95], 0.5, False, "supported"),
        ([0.001, -0.002, 0.0, 0.001], -MARGIN, True, "supported"),  # nearly invariant
        ([0.05, 0.04, 0.045], -MARGIN, True, "contradicted"),  # clearly higher
        ([-0.05, -0.04, -0.045], -MARGIN, True, "contradicted"),  # clearly lower
        ([0.02, -0.01, 0.005], -MARGIN, True, "not supported"),
        ([0.02], -MARGIN, False, "not supported"),  # one seed: no interval
        ([0.02, float("nan")], -MARGIN, False, "not supported"),
    ],
)
def test_verdict_rule_on_synthetic_values(values, theta, band, verdict) -> None:
    t = ClaimTest("synthetic", values, theta, band=band)
    assert t.verdict == verdict
    if len(values) >= 2 and all(math.isfinite(v) for v in values):
        assert _rule(values, theta, band) == verdict  # the independent rule agrees


def test_claim_verdict_combines_its_counted_tests() -> None:
    good = ClaimTest("a", [0.02, 0.03, 0.025], -MARGIN)
    bad = ClaimTest("b", [-0.05, -0.04, -0.06], -MARGIN)
    noisy = ClaimTest("c", [0.05, -0.05, 0.01], -MARGIN)
    common = {"id": 0, "title": "t", "source": "s", "measured": "m", "seeds": [0, 1, 2]}
    assert ClaimResult(**common, tests=[good, good]).verdict == "supported"
    assert ClaimResult(**common, tests=[good, noisy]).verdict == "not supported"
    assert ClaimResult(**common, tests=[good, bad, noisy]).verdict == "contradicted"
    bad.supplementary = True
    assert ClaimResult(**common, tests=[good, bad]).verdict == "supported"
    assert ClaimResult(**common, reason="no data").verdict == "not run"


def test_missing_measurements_are_not_run_never_judged() -> None:
    res = evaluate_claims({}, QUICK)
    assert [c.verdict for c in res] == ["not run"] * len(CLAIMS)
    assert all(c.reason and "measurement" in c.reason and not c.tests for c in res)
    only = evaluate_claims({}, QUICK, {3})
    assert [c.reason for c in only if c.id != 3] == ["not selected (--claims)"] * 8


def test_t_interval_matches_the_table() -> None:
    rng = np.random.default_rng(0)
    for n in range(2, 11):
        x = rng.normal(size=n)
        assert t_interval(x) == pytest.approx(_interval(list(x)), abs=1e-5)


def test_layer_share_counts_modules_not_tensors() -> None:
    # module a: weight + bias hold modes 0, 1, 2; module b holds modes 0, 1 -> mode 2 is not
    # in every layer; the last column (constant parameters) is left out
    share, everywhere, layers = layer_share(
        ["a.weight", "a.bias", "b.weight"], [[4, 0, 1, 9], [0, 2, 0, 9], [3, 3, 0, 9]]
    )
    assert (share, everywhere, layers) == (12 / 13, 2, 2)

"""The nine claims: what each measures, its tests, and its verdict by the one rule.

Owns :class:`ClaimTest` (per-seed values, a threshold, the arms compared) and
:class:`ClaimResult`, one function per claim turning the measurements of
:func:`workflows.reproduce.runner.measure` into a :class:`ClaimResult`, and
:func:`evaluate_claims` (every claim, "not run" with its reason where a measurement is
missing). The statistics and the rule are :mod:`workflows.reproduce.stats`; every threshold
here is ``-MARGIN``, ``0``, ``+MARGIN`` or ``0.5``, chosen by the claim's wording as
:data:`~workflows.reproduce.stats.RULE` states, never by its numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from workflows.reproduce.settings import Settings
from workflows.reproduce.stats import MARGIN, NOT_RUN, Summary, combine, summarise

__all__ = ["CLAIMS", "ClaimResult", "ClaimSpec", "ClaimTest", "Missing", "evaluate_claims"]


class Missing(LookupError):
    """A measurement a claim needs was not made (the claim is then "not run")."""


@dataclass
class ClaimTest:
    """One comparison of a claim over the training seeds.

    ``values`` holds d_s for each seed of ``seeds`` (in that order); ``arms`` the per-seed
    values of what is compared (for the tables); ``band``: "nearly invariant", the rule on
    both sides; ``supplementary``: shown, not counted in the claim's verdict.
    """

    label: str
    values: list[float]
    threshold: float
    arms: dict[str, list[float]] = field(default_factory=dict)
    band: bool = False
    supplementary: bool = False
    summary: Summary = field(init=False)

    def __post_init__(self) -> None:
        self.values = [float(v) for v in self.values]
        self.summary = summarise(self.values, self.threshold, band=self.band)

    @property
    def verdict(self) -> str:
        return self.summary.verdict

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "values": self.values,
            "threshold": self.threshold,
            "band": self.band,
            "supplementary": self.supplementary,
            "arms": {k: [float(v) for v in vs] for k, vs in self.arms.items()},
            "arm_means": {k: float(np.mean(vs)) for k, vs in self.arms.items()},
            **self.summary.to_dict(),
        }


@dataclass
class ClaimResult:
    """A claim's measured numbers, per-seed paired values (in its tests) and verdict."""

    id: int
    title: str
    source: str
    measured: str
    seeds: list[int]
    tests: list[ClaimTest] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None  # why it was not run
    verdict: str = field(init=False)

    def __post_init__(self) -> None:
        if self.reason is not None:
            self.verdict = NOT_RUN
        else:
            self.verdict = combine(t.verdict for t in self.tests if not t.supplementary)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "source": self.source,
            "measured": self.measured,
            "seeds": self.seeds,
            "verdict": self.verdict,
            "reason": self.reason,
            "numbers": self.numbers,
            "tests": [t.to_dict() for t in self.tests],
        }


# --------------------------------------------------------------------------- helpers
def _get(m: dict[str, Any], *keys: str) -> Any:
    cur: Any = m
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            raise Missing(f"no measurement {'/'.join(keys)} (its part was not run)")
        cur = cur[k]
    return cur


def _per_seed(s: Settings, fn: Callable[[str], float]) -> list[float]:
    return [float(fn(str(seed))) for seed in s.seeds]


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(np.asarray(xs, dtype=np.float64)))


def _final_cmd(base: dict[str, Any], s: Settings) -> float:
    """CMD's test accuracy at the last epoch, averaged over the sampling seeds."""
    return _mean([base["cmd_by_seed"][str(q)][-1] for q in s.sampling_seeds])


def _jitter(curve: Sequence[float], epochs: Sequence[int], start: float) -> float:
    """Mean |change| of the accuracy from one epoch to the next, over the epochs >= start."""
    c = np.asarray([a for a, e in zip(curve, epochs, strict=True) if e >= start])
    return float(np.mean(np.abs(np.diff(c)))) if c.size > 1 else math.nan


def _base(m: dict[str, Any], setting: str, seed: str) -> dict[str, Any]:
    return _get(m, "posthoc", setting, "base", seed)


def _gd_final(m: dict[str, Any], setting: str, seed: str) -> float:
    return float(_base(m, setting, seed)["gd"][-1])


def _cmd_final(m: dict[str, Any], s: Settings, setting: str, seed: str) -> float:
    return _final_cmd(_base(m, setting, seed), s)


def _dmd(m: dict[str, Any], setting: str, kind: str, r: int, key: str, seed: str) -> float:
    """The DMD accuracy at the last epoch (``key="acc"``) or the effective rank (``"rank"``)."""
    value = _get(m, "posthoc", setting, "dmd", seed, kind)[str(r)][key]
    return float(value[-1] if key == "acc" else value)


# --------------------------------------------------------------------------- the claims
def claim1(m: dict[str, Any], s: Settings) -> tuple[list[ClaimTest], dict[str, Any]]:
    """CMD's final accuracy is at least GD's, and its accuracy is more stable over epochs."""
    gd = _per_seed(s, lambda q: _base(m, "cnn", q)["gd"][-1])
    cmd = _per_seed(s, lambda q: _final_cmd(_base(m, "cnn", q), s))
    start = s.stability_from * s.epochs

    def jit(q: str, which: str) -> float:
        b = _base(m, "cnn", q)
        if which == "gd":
            return _jitter(b["gd"], b["epochs"], start)
        return _mean(
            [_jitter(b["cmd_by_seed"][str(k)], b["epochs"], start) for k in s.sampling_seeds]
        )

    jg = _per_seed(s, lambda q: jit(q, "gd"))
    jc = _per_seed(s, lambda q: jit(q, "cmd"))
    tests = [
        ClaimTest(
            "final accuracy: CMD − GD ≥ −MARGIN",
            [c - g for c, g in zip(cmd, gd, strict=True)],
            -MARGIN,
            {"CMD": cmd, "GD": gd},
        ),
        ClaimTest(
            f"epoch-to-epoch |Δ accuracy| over epochs ≥ {start:g}: GD − CMD > 0",
            [g - c for g, c in zip(jg, jc, strict=True)],
            0.0,
            {"GD": jg, "CMD": jc},
        ),
    ]
    return tests, {"stability_from_epoch": start}


def claim2(m: dict[str, Any], s: Settings) -> tuple[list[ClaimTest], dict[str, Any]]:
    """Accuracy nearly invariant to M; best at small M."""

    def acc(q: str, mm: int) -> float:
        by = _get(m, "posthoc", "cnn", "modes", q, "by_modes")[str(mm)]
        return _mean([by[str(k)] for k in s.sampling_seeds])

    ref = s.modes
    at = {mm: _per_seed(s, partial(acc, mm=mm)) for mm in s.sweep_modes}
    tests = [
        ClaimTest(
            f"M = {mm} vs M = {ref}: |Δ accuracy| < MARGIN",
            [a - b for a, b in zip(at[mm], at[ref], strict=True)],
            -MARGIN,
            {f"M={mm}": at[mm], f"M={ref}": at[ref]},
            band=True,
        )
        for mm in s.sweep_modes
        if mm != ref
    ]
    small = [mm for mm in s.sweep_modes if mm < ref]
    large = [mm for mm in s.sweep_modes if mm >= ref]
    if small:
        sm = [_mean([at[mm][i] for mm in small]) for i in range(len(s.seeds))]
        lg = [_mean([at[mm][i] for mm in large]) for i in range(len(s.seeds))]
        tests.append(
            ClaimTest(
                f"best at small M: mean over M ∈ {small} − mean over M ∈ {large} > 0",
                [a - b for a, b in zip(sm, lg, strict=True)],
                0.0,
                {f"M∈{small}": sm, f"M∈{large}": lg},
            )
        )
    found = {
        str(mm): _mean(
            [
                _mean(_get(m, "posthoc", "cnn", "modes", str(q), "n_modes_found")[str(mm)])
                for q in s.seeds
            ]
        )
        for mm in s.sweep_modes
    }
    return tests, {
        "accuracy_by_M": {str(k): _mean(v) for k, v in at.items()},
        "modes_found_by_M": found,
    }


def claim3(m: dict[str, Any], s: Settings) -> tuple[list[ClaimTest], dict[str, Any]]:
    """Robust to the sampled subset and to K."""
    gd = _per_seed(s, lambda q: _base(m, "cnn", q)["gd"][-1])
    worst = _per_seed(
        s, lambda q: min(_base(m, "cnn", q)["cmd_by_seed"][str(k)][-1] for k in s.sampling_seeds)
    )
    spread = _per_seed(
        s,
        lambda q: np.ptp([_base(m, "cnn", q)["cmd_by_seed"][str(k)][-1] for k in s.sampling_seeds]),
    )

    def acc(q: str, k: int) -> float:
        by = _get(m, "posthoc", "cnn", "samples", q, "by_samples")[str(k)]
        return _mean([by[str(x)] for x in s.sampling_seeds])

    at = {k: _per_seed(s, partial(acc, k=k)) for k in s.sweep_samples}
    ref = s.samples
    tests = [
        ClaimTest(
            f"worst of {len(s.sampling_seeds)} sampled subsets − GD ≥ −MARGIN",
            [w - g for w, g in zip(worst, gd, strict=True)],
            -MARGIN,
            {"worst subset": worst, "GD": gd},
        ),
    ]
    tests += [
        ClaimTest(
            f"K = {k} vs K = {ref}: Δ accuracy ≥ −MARGIN",
            [a - b for a, b in zip(at[k], at[ref], strict=True)],
            -MARGIN,
            {f"K={k}": at[k], f"K={ref}": at[ref]},
        )
        for k in s.sweep_samples
        if k != ref
    ]
    return tests, {
        "subset_range_mean": _mean(spread),
        "accuracy_by_K": {str(k): _mean(v) for k, v in at.items()},
    }


def claim4(m: dict[str, Any], s: Settings) -> tuple[list[ClaimTest], dict[str, Any]]:
    """Using only the later part of the history does as well or better."""
    full = _per_seed(s, lambda q: _final_cmd(_base(m, "cnn", q), s))
    tests, by = [], {"1.0": _mean(full)}
    for frac in s.history[1:]:

        def acc(q: str, frac: float = frac) -> float:
            h = _get(m, "posthoc", "cnn", "history", q, "by_history")[str(frac)]
            return _mean([h["acc"][str(k)] for k in s.sampling_seeds])

        part = _per_seed(s, acc)
        by[str(frac)] = _mean(part)
        tests.append(
            ClaimTest(
                f"last {frac:.0%} of the epochs (from epoch {s.history_start(frac)}) − all ≥ −MARGIN",
                [a - b for a, b in zip(part, full, strict=True)],
                -MARGIN,
                {f"{frac:.0%}": part, "100%": full},
            )
        )
    return tests, {"accuracy_by_history": by}


def claim5(m: dict[str, Any], s: Settings) -> tuple[list[ClaimTest], dict[str, Any]]:
    """DMD fails where CMD works: augmentation and skip connections."""
    tests: list[ClaimTest] = []
    numbers: dict[str, Any] = {}
    for setting, what in (
        ("cnn_augment", "CNN + augmentation"),
        ("resnet", "ResNet"),
        ("cnn", "CNN, no augmentation (control)"),
    ):
        control = setting == "cnn"
        gd = _per_seed(s, partial(_gd_final, m, setting))
        if not control:
            cmd = _per_seed(s, partial(_cmd_final, m, s, setting))
            tests.append(
                ClaimTest(
                    f"{what}: CMD − GD ≥ −MARGIN",
                    [c - g for c, g in zip(cmd, gd, strict=True)],
                    -MARGIN,
                    {"CMD": cmd, "GD": gd},
                )
            )
        for kind in ("full", "node"):
            for r in s.dmd_ranks:
                acc = _per_seed(s, partial(_dmd, m, setting, kind, r, "acc"))
                rank = _mean(_per_seed(s, partial(_dmd, m, setting, kind, r, "rank")))
                numbers[f"{setting}/{kind}/r{r}/effective_rank"] = rank
                name = "whole-network DMD" if kind == "full" else "per-node DMD"
                if control:  # the paper: DMD models plain GD on a simple network
                    tests.append(
                        ClaimTest(
                            f"{what}: {name} r = {r} − GD ≥ −MARGIN (DMD works here)",
                            [d - g for d, g in zip(acc, gd, strict=True)],
                            -MARGIN,
                            {"DMD": acc, "GD": gd},
                            supplementary=True,
                        )
                    )
                else:
                    tests.append(
                        ClaimTest(
                            f"{what}: {name} r = {r}: GD − DMD > +MARGIN (DMD loses accuracy)",
                            [g - d for g, d in zip(gd, acc, strict=True)],
                            MARGIN,
                            {"GD": gd, "DMD": acc},
                            supplementary=kind == "node",
                        )
                    )
    return tests, numbers


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def layer_share(layers: Sequence[str], counts: Sequence[Sequence[int]]) -> tuple[float, int, int]:
    """Share of the (non-constant) parameters whose mode has members in every layer.

    A layer is a module (its weight and bias together); ``counts`` is (tensors, modes + 1),
    the last column the constant or non-finite parameters (left out). Returns the share, the
    number of modes present in every layer, and the number of layers.

    >>> layer_share(["a.weight", "a.bias", "b.weight"], [[3, 0, 1], [0, 1, 0], [2, 2, 0]])
    (1.0, 2, 2)
    >>> layer_share(["a.weight", "b.weight"], [[3, 0, 0], [2, 2, 0]])
    (0.7142857142857143, 1, 2)
    """
    c = np.asarray(counts, dtype=np.int64)[:, :-1]
    modules = sorted({_module(n) for n in layers})
    by = np.zeros((len(modules), c.shape[1]), dtype=np.int64)
    for n, row in zip(layers, c, strict=True):
        by[modules.index(_module(n))] += row
    everywhere = (by > 0).all(axis=0)
    total = int(by.sum())
    return (
        float(by[:, everywhere].sum() / total) if total else math.nan,
        int(everywhere.sum()),
        len(modules),
    )


def claim6(m: dict[str, Any], s: Settings) -> tuple[list[ClaimTest], dict[str, Any]]:
    """Modes are spread over all layers."""
    res = {
        str(q): layer_share(
            _base(m, "cnn", str(q))["layers"], _base(m, "cnn", str(q))["layer_mode_counts"]
        )
        for q in s.seeds
    }
    share = [res[str(q)][0] for q in s.seeds]
    n_modes = [_base(m, "cnn", str(q))["n_modes"] for q in s.seeds]
    return [
        ClaimTest(
            "share of parameters in modes present in every layer > 0.5",
            share,
            0.5,
            {"share": share},
        )
    ], {
        "modes_in_every_layer_mean": _mean([res[str(q)][1] for q in s.seeds]),
        "modes_mean": _mean(n_modes),
        "layers": res[str(s.seeds[0])][2],
    }


def _online_final(m: dict[str, Any], s: Settings, method: str) -> list[float]:
    return _per_seed(s, lambda q: _get(m, "online", q, "curves", method)[-1])


def claim7(m: dict[str, Any], s: Settings) -> tuple[list[ClaimTest], dict[str, Any]]:
    """Online CMD at least matches the optimiser, is competitive with EMA and SWA."""
    oc = _online_final(m, s, "online_cmd")
    tests = []
    for method, name in (
        ("baseline", f"the optimiser ({s.optimizer})"),
        ("ema", "EMA"),
        ("swa", "SWA"),
    ):
        other = _online_final(m, s, method)
        tests.append(
            ClaimTest(
                f"Online CMD − {name} ≥ −MARGIN",
                [a - b for a, b in zip(oc, other, strict=True)],
                -MARGIN,
                {"Online CMD": oc, name: other},
            )
        )
    return tests, {
        f"final_{k}": _mean(_online_final(m, s, k))
        for k in ("baseline", "online_cmd", "ema", "swa")
    }


def claim8(m: dict[str, Any], s: Settings) -> tuple[list[ClaimTest], dict[str, Any]]:
    """Embedded CMD keeps accuracy while a growing share of parameters is embedded."""
    emb = _online_final(m, s, "embedded_cmd")
    base = _online_final(m, s, "baseline")
    share = _per_seed(s, lambda q: _get(m, "online", q, "embedded")[-1])
    return [
        ClaimTest(
            f"Embedded CMD − the optimiser ({s.optimizer}) ≥ −MARGIN",
            [a - b for a, b in zip(emb, base, strict=True)],
            -MARGIN,
            {"Embedded CMD": emb, "optimiser": base},
        ),
        ClaimTest("share of parameters embedded at the end > 0", share, 0.0, {"share": share}),
    ], {"embedded_share_final": _mean(share)}


def claim9(m: dict[str, Any], s: Settings) -> tuple[list[ClaimTest], dict[str, Any]]:
    """Federated learning with Embedded CMD saves communication at equal accuracy."""

    def final(q: str, method: str) -> float:
        return _get(m, "federated", q, method, "rounds")[-1]["test_acc"]

    cmd = _per_seed(s, lambda q: final(q, "cmd"))
    avg = _per_seed(s, lambda q: final(q, "fedavg"))
    saved = _per_seed(s, lambda q: 1.0 - _get(m, "federated", q, "bytes_ratio"))
    emb = _per_seed(s, lambda q: _get(m, "federated", q, "cmd", "rounds")[-1]["embedded_fraction"])
    return [
        ClaimTest(
            "final accuracy: FedAvg + Embedded CMD − FedAvg ≥ −MARGIN",
            [a - b for a, b in zip(cmd, avg, strict=True)],
            -MARGIN,
            {"FedAvg + CMD": cmd, "FedAvg": avg},
        ),
        ClaimTest(
            "share of the bytes saved (1 − bytes CMD / bytes FedAvg) > 0",
            saved,
            0.0,
            {"saved": saved},
        ),
    ], {"bytes_saved_mean": _mean(saved), "embedded_share_final": _mean(emb)}


@dataclass(frozen=True)
class ClaimSpec:
    """A claim: its words, where the papers make it, how it is measured here."""

    id: int
    title: str
    source: str
    measured: str
    fn: Callable[[dict[str, Any], Settings], tuple[list[ClaimTest], dict[str, Any]]]


CLAIMS: tuple[ClaimSpec, ...] = (
    ClaimSpec(
        1,
        "CMD's test accuracy at the end of training is at least GD's, and more stable "
        "across epochs",
        "002 §5, figs 5a, 6, 7, 8",
        "MNIST-1D CNN; CMD (M, K, averaged over the sampling seeds) and GD at the last "
        "epoch; stability: mean |accuracy change| between consecutive epochs in the "
        "second part of training",
        claim1,
    ),
    ClaimSpec(
        2,
        "Accuracy is nearly invariant to the number of modes M, best at small M",
        "002 fig 6a",
        "CMD accuracy at the last epoch for every M of the sweep (mean over sampling "
        "seeds), against the study's M",
        claim2,
    ),
    ClaimSpec(
        3,
        "Robust to the sampled subset and to K from 50 to 2000",
        "002 figs 10, 11",
        "worst sampling seed against GD; accuracy for every K against K of the study "
        "(mean over sampling seeds)",
        claim3,
    ),
    ClaimSpec(
        4,
        "Using only the later part of the history (100%, 90%, ..., 50% of the epochs) "
        "does as well or better",
        "002 fig 13",
        "CMD fitted on the last fraction of the epochs only, accuracy at the last epoch "
        "against the fit on all epochs (mean over sampling seeds)",
        claim4,
    ),
    ClaimSpec(
        5,
        "DMD fails where CMD works: with augmentation and with skip connections, "
        "DMD's reconstructed weights lose accuracy, CMD's do not",
        "002 §2, figs 5b, 5c, 22",
        "CNN with augmentation and ResNet (skip connections): exact DMD of the whole "
        "network (r capped at T − 1) reconstructed at the last epoch and scored by the "
        "workflow's evaluator, as CMD's weights are; per-node Koopman DMD and the "
        "un-augmented CNN are supplementary",
        claim5,
    ),
    ClaimSpec(
        6,
        "Modes are spread over all layers",
        "000 abstract; 002 fig 4b",
        "the study's modes on the CNN's layers (weight and bias of a module together)",
        claim6,
    ),
    ClaimSpec(
        7,
        "Online CMD at least matches the optimiser's weights and is competitive with EMA and SWA",
        "001 (tables)",
        "one training run scored three ways (weights, Online CMD, EMA) plus an SWA run, "
        "final-epoch test accuracy",
        claim7,
    ),
    ClaimSpec(
        8,
        "Embedded CMD keeps accuracy while a growing share of parameters is embedded",
        "001",
        "Embedded CMD run against the plain run of the same seed, final epoch",
        claim8,
    ),
    ClaimSpec(
        9,
        "Federated learning with Embedded CMD saves communication at equal accuracy",
        "001",
        "FedAvg against FedAvg with server-side Embedded CMD, same partitions and "
        "initial model; bytes of every message",
        claim9,
    ),
)


def evaluate_claims(
    measurements: dict[str, Any], settings: Settings, run: set[int] | None = None
) -> list[ClaimResult]:
    """Every claim of :data:`CLAIMS`: measured, or "not run" with its reason."""
    out = []
    for spec in CLAIMS:
        common: dict[str, Any] = {
            "id": spec.id,
            "title": spec.title,
            "source": spec.source,
            "measured": spec.measured,
            "seeds": list(settings.seeds),
        }
        if run is not None and spec.id not in run:
            out.append(ClaimResult(**common, reason="not selected (--claims)"))
            continue
        try:
            tests, numbers = spec.fn(measurements, settings)
        except Missing as e:
            out.append(ClaimResult(**common, reason=str(e)))
            continue
        out.append(ClaimResult(**common, tests=tests, numbers=numbers))
    return out

"""The comparison workflow end to end on a tiny run (the real sizes are in docs/results.md).

What it reports is checked against an independent recomputation from the recorded run: every
epoch's weights of run A are recorded (Online CMD is swapped for a subclass that records what
it is given), then

- Online CMD's ``(a, b)`` after every post-warm-up epoch equal a batch least-squares refit
  (``numpy.linalg.lstsq``) over all the epochs so far, with the same modes and references;
- the reported Online CMD loss is the loss of those refitted weights ``a r(t) + b``, and the
  reported SGD loss that of the recorded weights;
- the memory figures are exact; the overhead is only checked for consistency (never timed).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.online import OnlineCMD
from workflows import online_compare
from workflows.digits import evaluate, load_digits_split

EPOCHS = 8
WARMUP = 3
SWA_START = 6  # round(0.75 * EPOCHS)


class _Recording(OnlineCMD):
    """OnlineCMD that records, at every update, the weights it is given and its (a, b)."""

    runs: ClassVar[list[_Recording]] = []

    def __init__(self, model: nn.Module, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.probe = copy.deepcopy(model)
        self.weights: list[np.ndarray] = []
        self.fits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        _Recording.runs.append(self)

    def update(self, model: nn.Module | None = None) -> None:
        m = model if model is not None else self.model
        flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()]).numpy()
        self.weights.append(flat.astype(np.float64))
        super().update(model)
        if self.ready:
            self.fits[self.epoch] = self.coefficients()


def _lstsq_refit(
    h: np.ndarray, ref_index: np.ndarray, mode: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each row of ``h`` (N, T) against [its mode's reference, 1], by numpy's lstsq."""
    a = np.empty(h.shape[0])
    b = np.empty(h.shape[0])
    for m, ref in enumerate(ref_index):
        rows = np.flatnonzero(mode == m)
        design = np.stack([h[ref], np.ones(h.shape[1])], axis=1)  # (T, 2)
        coef, *_ = np.linalg.lstsq(design, h[rows].T, rcond=None)
        a[rows], b[rows] = coef
    a[ref_index], b[ref_index] = 1.0, 0.0
    return a, b


def _loss_acc(probe: nn.Module, flat: np.ndarray, x, y) -> tuple[float, float]:
    vec = torch.from_numpy(flat.astype(np.float32))
    torch.nn.utils.vector_to_parameters(vec, probe.parameters())
    return evaluate(probe, x, y)


def test_online_compare_tiny(tmp_path: Path, capsys, monkeypatch) -> None:
    _Recording.runs = []
    monkeypatch.setattr(online_compare, "OnlineCMD", _Recording)
    out = tmp_path / "oc"
    rc = online_compare.main(
        ["--model", "mlp", "--epochs", str(EPOCHS), "--seeds", "0,1", "--warmup", str(WARMUP),
         "--modes", "3", "--samples", "200", "--embed-every", "2", "--embed-fraction", "0.3",
         "--out", str(out)]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [s["seed"] for s in res["seeds"]] == [0, 1]
    assert len(_Recording.runs) == 2  # run A of each seed
    for s, run in zip(res["seeds"], _Recording.runs, strict=True):
        c = s["curves"]
        assert set(c) == set(online_compare.METHODS)
        assert all(len(c[m]) == EPOCHS for m in c)
        # SGD, Online CMD and EMA share one trajectory: during the warm-up Online CMD is SGD
        for e in range(WARMUP - 1):
            assert c["online_cmd"][e]["accuracy"] == c["sgd"][e]["accuracy"]
        # SWA is plain SGD until it starts (epoch 6 of 8)
        k = SWA_START - 1
        assert [r["accuracy"] for r in c["swa"][:k]] == [r["accuracy"] for r in c["sgd"][:k]]

        # -- Online CMD against an independent refit of the recorded run
        _, _, xt, yt = load_digits_split(s["seed"])
        h = np.stack(run.weights, axis=1)  # (N, epochs)
        assert h.shape == (s["n_params"], EPOCHS)
        assert run.ref_index is not None and run.fit is not None
        ref_index, mode = run.ref_index, run.fit.mode.astype(np.int64)
        assert s["online_cmd"]["n_modes"] == ref_index.size
        moved_away = 0.0
        for e in range(1, EPOCHS + 1):
            sgd_loss, _ = _loss_acc(run.probe, h[:, e - 1], xt, yt)
            assert c["sgd"][e - 1]["loss"] == pytest.approx(sgd_loss, rel=1e-12, abs=0)
            if e < WARMUP:
                continue
            win = h[:, :e]
            want_a, want_b = _lstsq_refit(win, ref_index, mode)
            a, b = run.fits[e]
            scale = np.abs(win).max(axis=1) + 1e-30
            r_span = np.ptp(win[ref_index], axis=1)[mode]
            assert np.all(np.abs(b - want_b) <= 1e-9 * scale), e
            assert np.all(np.abs(a - want_a) * r_span <= 1e-9 * scale), e
            cmd_w = want_a * win[ref_index, -1][mode] + want_b
            moved_away = max(moved_away, float(np.abs(cmd_w - win[:, -1]).max()))
            loss, acc = _loss_acc(run.probe, cmd_w, xt, yt)
            assert c["online_cmd"][e - 1]["loss"] == pytest.approx(loss, rel=1e-5), e
            # accuracy: an argmax, so 1-ulp weight differences may flip a near-tie sample
            assert abs(c["online_cmd"][e - 1]["accuracy"] - acc) <= 2 / len(yt) + 1e-12, e
        assert moved_away > 1e-3  # the CMD weights are not the SGD weights: the check has teeth

        # -- exact memory figures; the overhead only for consistency (no timing assertion)
        n = s["n_params"]
        oc = s["online_cmd"]
        assert oc["state_bytes"] == 18 * n  # two float64 sums, uint8 mode, uint8 flags
        assert oc["checkpoints_bytes"] == 4 * n * (EPOCHS + 1)
        assert oc["warmup_history_bytes"] == 4 * n * WARMUP
        assert oc["update_seconds_per_epoch"] > 0 and oc["train_seconds_per_epoch"] > 0
        assert oc["overhead_fraction"] == pytest.approx(
            oc["update_seconds_per_epoch"] / oc["train_seconds_per_epoch"], rel=1e-9
        )

        # -- Embedded CMD: grows only at the checks (epochs 5, 7), from 0
        emb = [r["embedded"] for r in c["embedded_cmd"]]
        assert emb[:WARMUP] == [0.0] * WARMUP
        for e in range(WARMUP + 1, EPOCHS + 1):
            if (e - WARMUP) % 2 == 0:
                assert emb[e - 1] > emb[e - 2], e
            else:
                assert emb[e - 1] == emb[e - 2], e
        assert emb[-1] > 0.4
    table = (out / "table.md").read_text()
    for name in ("SGD (baseline)", "Online CMD", "EMA", "SWA", "Embedded CMD"):
        assert f"| {name} |" in table
    assert "Embedded CMD:" in capsys.readouterr().out

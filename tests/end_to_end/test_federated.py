"""The federated simulation: FedAvg against FedAvg with Embedded CMD (workflows.federated).

A tiny configuration (3 clients, 10 rounds, warm-up 3, embedding every 2 rounds, a small
MLP) checks the byte accounting, the embedding invariants on the clients and the server,
the outputs, and the data partitions.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch

from workflows.digits import load_digits_split
from workflows.federated import (
    Download,
    EmbedUpdate,
    FedConfig,
    Federation,
    get_flat,
    main,
    partition,
    run_experiment,
)
from workflows.federated.messages import _decode_new, _encode_new

TINY = FedConfig(
    clients=3, rounds=10, warmup=3, embed_every=2, embed_fraction=0.3, hidden=16, modes=4,
    samples=200, lr=0.1,
)
N_ROUNDS_WARM = TINY.warmup + TINY.embed_every  # the first embedding is decided here


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is as fast, and not slowed by a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("fed")
    return out, run_experiment(TINY, [0, 1], out)


def _rounds(result, seed_pos, method):
    return result["runs"][seed_pos][method]["rounds"]


def test_bytes(experiment) -> None:
    _, result = experiment
    n = result["n_params"]
    k = TINY.clients
    for pos in range(2):
        fed = _rounds(result, pos, "fedavg")
        cmd = _rounds(result, pos, "cmd")
        assert all(r["bytes"] == 2 * k * 4 * n for r in fed)
        assert all(r["embedded_fraction"] == 0 for r in fed)
        first_msg = next(i for i, r in enumerate(cmd) if r["bytes_embed_msg"] > 0)
        # decided at the end of round warmup + embed_every, sent with the next download
        assert first_msg == N_ROUNDS_WARM
        for i in range(first_msg):
            assert cmd[i]["bytes"] == fed[i]["bytes"]
            # the same computation until the server embeds (at the end of round first_msg)
            if i < first_msg - 1:
                assert cmd[i]["test_loss"] == fed[i]["test_loss"]
                assert cmd[i]["train_loss"] == fed[i]["train_loss"]
        # the round carrying the first message: the recurring traffic is already lower
        r = cmd[first_msg]
        assert r["bytes"] - r["bytes_embed_msg"] < fed[first_msg]["bytes"]
        assert r["bytes_up"] == k * 4 * (n - cmd[first_msg - 1]["n_embedded"])
        for i in range(first_msg + 1, len(cmd)):
            assert cmd[i]["bytes"] < fed[i]["bytes"], i
        assert cmd[-1]["cum_bytes"] < fed[-1]["cum_bytes"]
        assert cmd[-1]["cum_bytes"] == sum(x["bytes"] for x in cmd)
        fr = [x["embedded_fraction"] for x in cmd]
        assert all(b >= a for a, b in itertools.pairwise(fr)) and fr[-1] > 0
        assert fr[: N_ROUNDS_WARM - 1] == [0.0] * (N_ROUNDS_WARM - 1)
        for m in ("fedavg", "cmd"):
            assert result["runs"][pos][m]["rounds"][-1]["test_acc"] > 0.5  # chance: 0.1
    s = result["summary"]
    assert s["bytes_ratio_cmd_over_fedavg"]["mean"] < 1


def test_outputs(experiment) -> None:
    out, result = experiment
    for name in ("results.json", "table.md", "federated.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "federated.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == result["summary"]
    assert len(saved["runs"][0]["cmd"]["rounds"]) == TINY.rounds
    table = (out / "table.md").read_text()
    assert "| FedAvg |" in table and "Embedded CMD" in table and " ± " in table


def test_embedded_parameters_follow_the_references() -> None:
    """On the clients after local training and on the server after aggregation, embedded
    parameters are float32(a r + b) of the live references; references are never embedded;
    each client rebuilds the global model bit for bit from the message (checked inside)."""
    fed = Federation(TINY, 0, "cmd")
    cmd = fed.cmd
    assert cmd is not None
    seen = {"client": 0, "server": 0}

    def want(flat: np.ndarray, e: np.ndarray) -> np.ndarray:
        assert cmd.fit is not None and cmd.ref_index is not None
        r = flat[cmd.ref_index].astype(np.float64)
        return (cmd.a_frozen[e] * r[cmd.fit.mode[e]] + cmd.b_frozen[e]).astype(np.float32)

    def check(f: Federation) -> None:
        known = f._sent_embedded
        if not known.any():
            return
        e = np.flatnonzero(known)
        refs = []
        for c in f.clients:
            assert np.array_equal(c.embedded, known)
            assert np.array_equal(c.ref_index, cmd.ref_index)
            flat = get_flat(c.model)
            assert np.array_equal(flat[e], want(flat, e))
            refs.append(flat[cmd.ref_index])
        # the clients' references moved apart during local training: a real test
        assert not np.array_equal(refs[0], refs[1])
        seen["client"] += 1

    for _ in range(TINY.rounds):
        fed.run_round(check)
        assert cmd.ref_index is None or not cmd.embedded[cmd.ref_index].any()
        if cmd.embedded.any():
            flat = get_flat(fed.model)
            e = np.flatnonzero(cmd.embedded)
            assert np.array_equal(flat[e], want(flat, e))
            seen["server"] += 1
    assert seen["client"] >= 4 and seen["server"] >= 5
    # not uploading embedded parameters loses nothing but rounding: the server's a r + b from
    # the averaged references is the average of the clients' a r_k + b to a few float32 ulp
    diffs = [r["embedded_vs_full_average_max_abs"] for r in fed.history]
    assert max(diffs) < 1e-6 and sum(d > 0 for d in diffs) >= 3
    assert 0 <= fed.ab_rounding_max_abs < 1e-5


def test_float64_ab_costs_more_but_is_the_same_protocol() -> None:
    cfg32 = TINY
    cfg64 = dataclasses.replace(cfg32, ab_dtype="float64")
    f32, f64 = Federation(cfg32, 0, "cmd"), Federation(cfg64, 0, "cmd")
    r32 = [f32.run_round() for _ in range(7)]
    r64 = [f64.run_round() for _ in range(7)]
    i = N_ROUNDS_WARM
    n_new = r32[i - 1]["n_newly_embedded"]
    assert n_new == r64[i - 1]["n_newly_embedded"] > 0
    # 4 more bytes for a and for b per newly embedded parameter, per client
    assert r64[i]["bytes_embed_msg"] - r32[i]["bytes_embed_msg"] == TINY.clients * 8 * n_new
    assert f64.ab_rounding_max_abs == 0.0


def test_which_parameters_encoding_roundtrip() -> None:
    rng = np.random.default_rng(0)
    free = np.sort(rng.choice(5000, 3000, replace=False))
    for k in (3, 1500):  # few: an index list is smaller; many: the bit mask
        new = np.sort(rng.choice(free, k, replace=False))
        mask, index = _encode_new(free, new, 5000)
        assert (mask is None) != (index is None)
        assert (index is not None) == (k == 3)
        if index is not None:
            assert index.dtype == np.uint16
        assert np.array_equal(_decode_new(free, mask, index), new)
    upd = EmbedUpdate(mask=None, index=np.zeros(2, np.uint16), a=np.zeros(2, np.float32),
                      b=np.zeros(2, np.float32), mode=np.zeros(2, np.uint8))
    assert Download(values=np.zeros(10, np.float32), embed=upd).nbytes == 40 + 4 + 8 + 8 + 2


def test_partitions() -> None:
    y = load_digits_split(0)[1].numpy()
    iid = partition(y, 5, alpha=None, seed=0)
    non = partition(y, 5, alpha=0.3, seed=0, min_size=10)
    for parts in (iid, non):
        allidx = np.concatenate(parts)
        assert allidx.size == y.size and np.array_equal(np.sort(allidx), np.arange(y.size))
        assert all(p.size >= 10 for p in parts)
    assert max(p.size for p in iid) - min(p.size for p in iid) <= 1

    def max_tv(parts) -> float:
        h = np.stack([np.bincount(y[p], minlength=10) / p.size for p in parts])
        return max(0.5 * np.abs(a - b).sum() for a, b in itertools.combinations(h, 2))

    assert max_tv(iid) < 0.15 < 0.4 < max_tv(non)
    # seeded: the same split again, another seed another split
    assert all(np.array_equal(a, b) for a, b in zip(non, partition(y, 5, alpha=0.3, seed=0), strict=True))
    assert not np.array_equal(non[0], partition(y, 5, alpha=0.3, seed=1)[0])


def test_cli_non_iid(tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    rc = main([
        "--out", str(out), "--clients", "3", "--rounds", "6", "--seeds", "0", "--alpha", "0.5",
        "--warmup", "3", "--embed-every", "2", "--embed-fraction", "0.2", "--hidden", "8",
        "--modes", "3", "--samples", "100", "--quiet", "--threads", "2",
    ])
    assert rc == 0 and torch.get_num_threads() == 1  # main restores the thread count
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["alpha"] == 0.5 and res["seeds"] == [0]
    h = np.array(res["runs"][0]["label_histograms"])
    assert h.sum() == sum(res["runs"][0]["partition_sizes"])
    assert "bytes vs FedAvg" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--iid", "--alpha", "0.5"])

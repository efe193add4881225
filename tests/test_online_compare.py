"""The comparison workflow end to end on a tiny run (the real sizes are in the README)."""

from __future__ import annotations

import json
from pathlib import Path

from workflows import online_compare


def test_online_compare_tiny(tmp_path: Path, capsys) -> None:
    out = tmp_path / "oc"
    rc = online_compare.main(
        ["--model", "mlp", "--epochs", "12", "--seeds", "0,1", "--warmup", "4", "--modes", "3",
         "--samples", "200", "--embed-every", "2", "--embed-fraction", "0.2", "--out", str(out)]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [s["seed"] for s in res["seeds"]] == [0, 1]
    for s in res["seeds"]:
        c = s["curves"]
        assert set(c) == set(online_compare.METHODS)
        assert all(len(c[m]) == 12 for m in c)
        # SGD, Online CMD and EMA share one trajectory: during the warm-up Online CMD is SGD
        for e in range(3):
            assert c["online_cmd"][e]["accuracy"] == c["sgd"][e]["accuracy"]
        # SWA is plain SGD until it starts (epoch 9 of 12)
        assert [r["accuracy"] for r in c["swa"][:8]] == [r["accuracy"] for r in c["sgd"][:8]]
        emb = [r["embedded"] for r in c["embedded_cmd"]]
        assert emb[3] == 0.0 and emb[-1] > 0.5
        assert s["online_cmd"]["state_bytes"] < s["online_cmd"]["checkpoints_bytes"]
        assert 0 < s["online_cmd"]["overhead_fraction"] < 10
    table = (out / "table.md").read_text()
    for name in ("SGD (baseline)", "Online CMD", "EMA", "SWA", "Embedded CMD"):
        assert f"| {name} |" in table
    assert "Embedded CMD:" in capsys.readouterr().out

"""A federated experiment: both methods over several seeds, and its results file.

Owns :func:`run_seed` (same data, partitions and initial model for both methods),
:func:`summarise` (means and standard deviations over seeds) and :func:`run_experiment`
(writes ``results.json``, ``table.md`` and ``federated.png``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workflows.digits import N_CLASSES, evaluate, load_digits_split
from workflows.federated.config import FLOAT_BYTES, METHODS, FedConfig
from workflows.federated.data import partition
from workflows.federated.messages import _uint_for
from workflows.federated.report import format_table, plot
from workflows.federated.server import Federation

__all__ = ["run_experiment", "run_seed", "summarise"]


def run_seed(
    config: FedConfig, seed: int, on_round: Callable[[str, dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Both methods on one seed (same data, partitions and initial model)."""
    data = load_digits_split(seed)
    y = data[1].numpy()
    parts = partition(
        y, config.clients, alpha=config.alpha, seed=seed, min_size=config.min_client_size
    )
    out: dict[str, Any] = {
        "seed": seed,
        "partition_sizes": [int(p.size) for p in parts],
        "label_histograms": [np.bincount(y[p], minlength=N_CLASSES).tolist() for p in parts],
    }
    for method in METHODS:
        fed = Federation(config, seed, method, data=data, parts=parts)
        init_loss, init_acc = evaluate(fed.model, fed.x_test, fed.y_test)
        t0 = time.perf_counter()
        log: Callable[[dict[str, Any]], None] | None = None
        if on_round is not None:

            def log(rec: dict[str, Any], m: str = method) -> None:
                on_round(m, rec)

        fed.run(log)
        res: dict[str, Any] = {
            "initial": {"test_loss": init_loss, "test_acc": init_acc},
            "rounds": fed.history,
            "seconds": time.perf_counter() - t0,
        }
        if fed.cmd is not None:
            res["n_modes"] = fed.cmd.n_modes
            res["ab_rounding_max_abs"] = fed.ab_rounding_max_abs
            res["embedded_vs_full_average_max_abs"] = max(
                r["embedded_vs_full_average_max_abs"] for r in fed.history
            )
        out[method] = res
        out["n_params"] = fed.n_params
    return out


def _mean_std(xs: Sequence[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Over seeds: final and best accuracy, total bytes, bytes ratio cmd/fedavg (mean, std
    with ddof=1)."""
    out: dict[str, Any] = {}
    for m in METHODS:
        out[m] = {
            "final_acc": _mean_std([r[m]["rounds"][-1]["test_acc"] for r in runs]),
            "best_acc": _mean_std([max(x["test_acc"] for x in r[m]["rounds"]) for r in runs]),
            "final_loss": _mean_std([r[m]["rounds"][-1]["test_loss"] for r in runs]),
            "total_bytes": _mean_std([r[m]["rounds"][-1]["cum_bytes"] for r in runs]),
            "final_embedded_fraction": _mean_std(
                [r[m]["rounds"][-1]["embedded_fraction"] for r in runs]
            ),
        }
    out["bytes_ratio_cmd_over_fedavg"] = _mean_std(
        [r["cmd"]["rounds"][-1]["cum_bytes"] / r["fedavg"]["rounds"][-1]["cum_bytes"] for r in runs]
    )
    return out


def run_experiment(
    config: FedConfig,
    seeds: Sequence[int],
    out: Path | str,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """All seeds, both methods; writes ``results.json``, ``table.md`` and ``federated.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = []
    for seed in seeds:

        def on_round(m: str, rec: dict[str, Any], seed: int = seed) -> None:
            if log is not None:
                log(
                    f"seed {seed} {m:6s} round {rec['round']:3d}  acc {rec['test_acc']:.4f}  "
                    f"loss {rec['test_loss']:.4f}  MB {rec['bytes'] * 1e-6:.4f}  "
                    f"cum MB {rec['cum_bytes'] * 1e-6:.3f}  embedded {rec['embedded_fraction']:.3f}"
                )

        runs.append(run_seed(config, seed, on_round))
    n_params = runs[0]["n_params"]
    k = config.clients
    result: dict[str, Any] = {
        "workflow": "federated",
        "config": asdict(config),
        "seeds": list(seeds),
        "n_params": n_params,
        "wire": {
            "parameters": "float32",
            "a_b": config.ab_dtype,
            "mode": str(_uint_for(max(config.modes - 1, 0))),
            "which": "bit mask over non-embedded positions or "
            f"{_uint_for(n_params - 1)} indices, whichever is smaller",
            "ref_index": str(_uint_for(n_params - 1)) + ", once",
            "fedavg_bytes_per_round": 2 * k * FLOAT_BYTES * n_params,
        },
        "summary": summarise(runs),
        "runs": runs,
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    table = format_table(result)
    (out / "table.md").write_text(table, encoding="utf-8")
    plot(result, out / "federated.png")
    return result

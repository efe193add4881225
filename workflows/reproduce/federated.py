"""Federated learning with Embedded CMD on MNIST-1D (claim 9; 001's federated experiment).

The simulation of :mod:`workflows.federated` (FedAvg against FedAvg with server-side
Embedded CMD, every byte of every message counted), run on the MNIST-1D training set with
the CNN of the other claims instead of the digits: :class:`workflows.federated.Federation`
with ``data``, ``parts`` and ``model_factory``. Both methods share the seed's partitions and
initial model.
"""

from __future__ import annotations

from typing import Any

from workflows.federated import METHODS, FedConfig, Federation, partition
from workflows.mnist1d import TrainConfig, build_model, evaluate
from workflows.mnist1d.data import load_mnist1d_split

__all__ = ["fed_config", "run_federated_seed"]


def fed_config(fed: dict[str, Any]) -> FedConfig:
    """The :class:`~workflows.federated.FedConfig` of the settings' ``fed`` table (its other
    fields keep the federated workflow's defaults)."""
    return FedConfig(**fed)


def run_federated_seed(config: FedConfig, train: TrainConfig) -> dict[str, Any]:
    """Both methods on one seed (``train.seed``): per method, every round's record (test
    accuracy, bytes, embedded fraction), as :func:`workflows.federated.run_seed` returns
    them."""
    seed = train.seed
    data = load_mnist1d_split(train.n_train, train.n_test, train.data_seed)
    parts = partition(
        data[1].numpy(),
        config.clients,
        alpha=config.alpha,
        seed=seed,
        min_size=config.min_client_size,
    )
    out: dict[str, Any] = {"seed": seed, "partition_sizes": [int(p.size) for p in parts]}
    for method in METHODS:
        fed = Federation(
            config, seed, method, data=data, parts=parts, model_factory=lambda: build_model(train)
        )
        init_loss, init_acc = evaluate(fed.model, fed.x_test, fed.y_test)
        fed.run()
        out[method] = {
            "initial": {"test_loss": init_loss, "test_acc": init_acc},
            "rounds": fed.history,
        }
        out["n_params"] = fed.n_params
    out["bytes_ratio"] = (
        out["cmd"]["rounds"][-1]["cum_bytes"] / out["fedavg"]["rounds"][-1]["cum_bytes"]
    )
    return out

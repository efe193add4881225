"""Command line of the federated workflow: ``python -m workflows.federated --out DIR``.

Owns the options (one per :class:`~workflows.federated.config.FedConfig` field, built by
:mod:`workflows.cli_args`, plus seeds, threads and logging) and the torch thread setting
during a run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from workflows.cli_args import Option, add_config_arguments, config_from_args
from workflows.federated.config import FedConfig
from workflows.federated.experiment import run_experiment
from workflows.federated.report import format_table

__all__ = ["CLI_OPTIONS", "main"]


#: Command-line help of the :class:`FedConfig` fields (``min_client_size`` is not an option).
CLI_OPTIONS: dict[str, Option] = {"alpha": Option(help="non-IID Dirichlet(alpha) split")}
_SERVER_AND_CLIENT_FIELDS = (
    "lr",
    "momentum",
    "batch_size",
    "warmup",
    "embed_every",
    "embed_fraction",
    "modes",
    "samples",
    "ab_dtype",
)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"seeds must be integers: {text!r}") from exc
    if not seeds:
        raise argparse.ArgumentTypeError("no seeds")
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workflows.federated --out DIR [options]``."""
    p = argparse.ArgumentParser(
        prog="python -m workflows.federated",
        description="Simulated federated learning on the digits: FedAvg against FedAvg with "
        "Embedded CMD (embedded parameters are not communicated).",
    )
    p.add_argument("--out", required=True, type=Path)
    add_config_arguments(p, FedConfig, only=("clients", "rounds", "local_epochs"))
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma separated (0,1,2)")
    add_config_arguments(p, FedConfig, only=("model", "hidden"))
    split = p.add_mutually_exclusive_group()
    split.add_argument("--iid", action="store_true", help="IID split (the default)")
    add_config_arguments(split, FedConfig, options=CLI_OPTIONS, only=("alpha",))
    add_config_arguments(p, FedConfig, only=_SERVER_AND_CLIENT_FIELDS)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads while running (default 1: these models are too small to "
        "gain from more, and spinning threads are slow on a busy machine); restored on exit",
    )
    p.add_argument("--quiet", action="store_true", help="no per-round log")
    args = p.parse_args(argv)
    config = config_from_args(p, FedConfig, args)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = run_experiment(
            config,
            args.seeds,
            args.out,
            log=None if args.quiet else (lambda s: print(s, flush=True)),
        )
    finally:
        torch.set_num_threads(previous)
    print(format_table(result).split("\n\nPer round")[0], flush=True)
    print(
        f"done in {result['seconds']:.1f} s; wrote {args.out}/results.json, table.md, federated.png"
    )
    return 0

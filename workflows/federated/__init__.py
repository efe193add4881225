"""Federated learning on the digits data: FedAvg against FedAvg with Embedded CMD.

Tests the claim of ALGORITHM.md ("Embedded CMD"): *in federated learning this cuts
communication: embedded parameters need no transfer, only the references and the rest do*.

Simulation
----------
K clients each hold a disjoint part of the digits training set (:func:`partition`: an IID
split, or a non-IID split of every class over the clients with Dirichlet(alpha) proportions;
both seeded). One global model lives on the server. Every round, every client downloads the
global model, trains ``local_epochs`` epochs of SGD with momentum on its own data (a fresh
optimiser every round: clients are stateless, nothing about optimiser state is ever sent),
and uploads its weights; the server averages them weighted by partition size (float64 sum,
rounded once to float32). Both methods run the same code with the same seeds: same initial
model, same partitions, same mini-batch order per (seed, round, client).

- **fedavg**: every round each client downloads and uploads all N float32 parameters:
  ``2 x K x 4 x N`` bytes per round.
- **cmd**: the server runs :class:`pipeline.online.EmbeddedCMD` on the *global* model, one
  update per round (a round is CMD's "epoch"): ``warmup`` rounds recorded, then the modes,
  the references and every parameter's mode are fixed; every ``embed_every`` rounds the
  ``embed_fraction`` of the not-yet-embedded parameters whose fit moved least are embedded,
  their ``(a, b)`` frozen. Embedded parameters are never sent again: a client downloads
  only the non-embedded parameters (the M references are non-embedded parameters, so they
  are in that vector, counted once) and uploads only the non-embedded parameters. The
  download of the round after an embedding also carries, once, what a client needs to
  follow the newly embedded parameters (:class:`EmbedUpdate`): which parameters (a bit mask
  over the client's non-embedded positions, or their indices in the smallest unsigned
  type, whichever is smaller), their ``a`` and ``b`` (float32 by default, ``--ab-dtype``),
  their mode (the smallest unsigned type that holds M-1: uint8 for M <= 256), and with the
  first embedding only, the positions of the M references (smallest unsigned type for N).
  On a client, a :class:`Client` keeps its embedded parameters on ``a * r + b``: their
  gradients are masked, their momentum zeroed, and after every optimiser step they are
  recomputed from the client's *live* reference values. The server, after averaging the
  non-embedded parameters, recomputes its embedded parameters from the averaged references.

Bytes are the sizes of the numpy arrays actually handed from server to client and back
(every message is built, "sent" and decoded: a client rebuilds its whole model from what it
received). A broadcast is counted once per client; no protocol overhead, no compression.
Per round the records hold: the global model's test loss and accuracy after aggregation,
the bytes of that round (down, up, and the one-time embedding part) and cumulated, and the
embedded fraction at the end of the round (an embedding decided in round t takes effect on
the clients with the download of round t + 1).

What is exact, and what is not
------------------------------
1. *Aggregation loses nothing.* On every client, after its last step, every embedded
   parameter is ``a * r_k + b`` (r_k its own references); FedAvg's weights sum to one, so
   ``sum_k p_k (a r_k + b) = a (sum_k p_k r_k) + b``: averaging the clients' embedded
   parameters and recomputing them from the averaged references give the same global model
   in exact arithmetic. In floating point they differ only by the float32 rounding of each
   client's ``a r_k + b`` before the average (a few ulp); the server's value is the single
   rounding of ``a r + b`` from the averaged (float32) references. So not uploading
   embedded parameters changes nothing beyond rounding; the approximation is the embedding
   itself (those parameters are confined to ``a r + b`` during local training), the same
   approximation as centralised Embedded CMD.
2. *Clients and server agree bit for bit.* Both evaluate ``a * r + b`` in float64 from the
   same float32 references and the same ``(a, b)`` and round to float32. With
   ``--ab-dtype float32`` the server rounds its frozen ``a, b`` (``EmbeddedCMD.a_frozen``,
   ``b_frozen``) to float32 right after each embedding, so it uses exactly the values it
   sends; the largest change this makes to an embedded weight is recorded
   (``ab_rounding_max_abs``). Every download is checked: the model a client rebuilds from
   the message is bitwise the server's global model (else the run stops).
3. *The fit is the global trajectory's.* ``(a, b)`` are the exact least-squares fit of each
   parameter against its reference over the global models of rounds ``[warmup, t]``
   (:class:`pipeline.kernels.online.RunningFit`); the server has these models anyway, so
   fitting costs no communication. Clients never see the fit, only the frozen ``(a, b)``.
   With non-IID clients a client's local drift need not follow the global correlations;
   its embedded parameters follow them regardless (by construction).
4. *What is not counted or simulated*: client sampling, stragglers, secure aggregation,
   compression/quantisation of the float32 payload, message headers.
5. During the warm-up and until the first embedding, the two methods are the same
   computation: accuracy and bytes coincide exactly. The round that carries the first
   embedding message can cost more than a FedAvg round (``a, b``, mode and which-mask for
   each newly embedded parameter weigh more than the 8 bytes it saves per client that
   round); from then on every round is cheaper.

Determinism: every random choice derives from the seed (numpy ``SeedSequence`` and torch
generators); results are identical for the same torch build and thread count (the CLI runs
torch on one intra-op thread unless ``--threads`` says otherwise, and restores it after).

Layout
------
:mod:`~workflows.federated.config` (:class:`FedConfig`, the methods, the model),
:mod:`~workflows.federated.data` (seeds, client partitions),
:mod:`~workflows.federated.messages` (what travels, its encoding and size),
:mod:`~workflows.federated.weights` (models as flat float32 vectors),
:mod:`~workflows.federated.client` (:class:`Client`), :mod:`~workflows.federated.server`
(:class:`Federation`: rounds, aggregation, server-side CMD),
:mod:`~workflows.federated.experiment` (seeds, both methods, ``results.json``),
:mod:`~workflows.federated.report` (tables and figure), :mod:`~workflows.federated.cli`
(``python -m workflows.federated``). Everything public is re-exported here.

Example (the default run: 5 clients, 40 rounds, MLP, IID, 3 seeds)::

    python -m workflows.federated --out runs/federated
    python -m workflows.federated --out runs/federated_noniid --alpha 0.5
"""

from __future__ import annotations

from workflows.federated.cli import main
from workflows.federated.client import Client
from workflows.federated.config import FLOAT_BYTES, METHODS, FedConfig, Method
from workflows.federated.data import partition
from workflows.federated.experiment import run_experiment, run_seed, summarise
from workflows.federated.messages import Download, EmbedUpdate
from workflows.federated.report import format_table, plot
from workflows.federated.server import Federation
from workflows.federated.weights import get_flat, set_flat

__all__ = [
    "FLOAT_BYTES",
    "METHODS",
    "Client",
    "Download",
    "EmbedUpdate",
    "FedConfig",
    "Federation",
    "Method",
    "format_table",
    "get_flat",
    "main",
    "partition",
    "plot",
    "run_experiment",
    "run_seed",
    "set_flat",
    "summarise",
]

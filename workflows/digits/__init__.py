"""Deterministic training-run recorder on the scikit-learn 8x8 digits data set.

Trains a small CNN or MLP with SGD on :func:`sklearn.datasets.load_digits` (1797 real
8x8 handwritten digit images, bundled with scikit-learn, so no network access is needed)
and saves the model's ``state_dict`` after every epoch. The resulting trajectory of
checkpoints is the input of the correlation-mode decomposition tools in :mod:`pipeline`.

Everything is seeded: two runs with the same :class:`TrainConfig` on the same machine
(same torch build, same number of intra-op threads) write byte-identical checkpoint files.

Layout
------
:mod:`~workflows.digits.config` (:class:`TrainConfig`, :data:`N_CLASSES`),
:mod:`~workflows.digits.data` (loading, the split, the random-shift augmentation),
:mod:`~workflows.digits.model` (:class:`SimpleCNN`, :class:`MLP`, :func:`build_model`),
:mod:`~workflows.digits.evaluation` (test metrics, :func:`evaluator`),
:mod:`~workflows.digits.train` (the recorded training), :mod:`~workflows.digits.cli`
(``python -m workflows.digits``). Everything public is re-exported here; the
``cmd_pipeline.workflows`` entry point ``digits`` is ``workflows.digits:evaluator``.

Examples
--------
Record a 20-epoch CNN run, one ``.pt`` file per epoch plus ``run.json``::

    python -m workflows.digits --out runs/cnn0 --model cnn --epochs 20 --seed 0 --fmt pt
"""

from __future__ import annotations

from workflows.digits.cli import main
from workflows.digits.config import N_CLASSES, TrainConfig
from workflows.digits.data import load_digits_split, random_shift
from workflows.digits.evaluation import evaluate, evaluator
from workflows.digits.model import MLP, SimpleCNN, build_model
from workflows.digits.train import train_and_record

__all__ = [
    "MLP",
    "N_CLASSES",
    "SimpleCNN",
    "TrainConfig",
    "build_model",
    "evaluate",
    "evaluator",
    "load_digits_split",
    "main",
    "random_shift",
    "train_and_record",
]

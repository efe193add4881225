"""Deterministic training-run recorder on MNIST-1D, generated offline.

Trains the MNIST-1D paper's small 1D CNN, a small 1D ResNet or an MLP on MNIST-1D
(Greydanus and Kobak, 2024: ten 1D digit templates, padded, scaled, sheared, translated
and noised into 40-long sequences by ``mnist1d.data.make_dataset``, here generated
locally, never downloaded) and saves the model's ``state_dict`` after every epoch. The
data set was built to separate methods on small CPUs where MNIST-like digits saturate:
the CNN reaches about 90% test accuracy, the MLP about 60-70%, with visible overfitting.
The trajectory of checkpoints is the input of the correlation-mode decomposition tools
in :mod:`pipeline`.

Everything is seeded: two runs with the same :class:`TrainConfig` on the same machine
(same torch build, same number of intra-op threads) write byte-identical checkpoint files.

Layout
------
:mod:`~workflows.mnist1d.config` (:class:`TrainConfig`, :data:`N_CLASSES`, :data:`SEQ_LEN`),
:mod:`~workflows.mnist1d.data` (generation and cache, the split, the augmentation),
:mod:`~workflows.mnist1d.model` (:class:`ConvNet1D`, :class:`ResNet1D`, :class:`MLP`,
:func:`build_model`), :mod:`~workflows.mnist1d.evaluation` (test metrics,
:func:`evaluator`), :mod:`~workflows.mnist1d.train` (the recorded training),
:mod:`~workflows.mnist1d.cli` (``python -m workflows.mnist1d``). Everything public is
re-exported here; the ``cmd_pipeline.workflows`` entry point ``mnist1d`` is
``workflows.mnist1d:evaluator``.

Examples
--------
Record a 100-epoch CNN run, one ``.pt`` file per epoch plus ``run.json``::

    python -m workflows.mnist1d --out runs/m1d_cnn0 --model cnn --epochs 100 --seed 0
"""

from __future__ import annotations

from workflows.mnist1d.cli import main
from workflows.mnist1d.config import N_CLASSES, SEQ_LEN, TrainConfig
from workflows.mnist1d.data import augment, generate_mnist1d, load_mnist1d_split
from workflows.mnist1d.evaluation import evaluate, evaluator
from workflows.mnist1d.model import MLP, ConvNet1D, ResNet1D, build_model
from workflows.mnist1d.train import build_optimizer, train_and_record

__all__ = [
    "MLP",
    "N_CLASSES",
    "SEQ_LEN",
    "ConvNet1D",
    "ResNet1D",
    "TrainConfig",
    "augment",
    "build_model",
    "build_optimizer",
    "evaluate",
    "evaluator",
    "generate_mnist1d",
    "load_mnist1d_split",
    "main",
    "train_and_record",
]

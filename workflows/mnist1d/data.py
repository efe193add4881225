"""The MNIST-1D data of the mnist1d workflow.

Owns generating the data set offline with ``mnist1d``'s own ``make_dataset`` (never its
download path), caching the generated arrays in memory per size and seed
(:func:`load_mnist1d_split`), and the on-the-fly augmentation of training sequences
(:func:`augment`).
"""

from __future__ import annotations

import functools
import random
import threading

import numpy as np
import torch
from torch import Tensor

from workflows.mnist1d.config import N_CLASSES

__all__ = ["augment", "generate_mnist1d", "load_mnist1d_split"]

#: ``make_dataset`` seeds (and so changes) the global ``random`` and ``numpy.random``
#: state; one generation at a time, the caller's state restored afterwards.
_GLOBAL_RNG_LOCK = threading.Lock()


@functools.lru_cache(maxsize=8)
def generate_mnist1d(n_samples: int, data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n_samples`` MNIST-1D sequences with ``mnist1d.data.make_dataset``.

    Parameters
    ----------
    n_samples : int
        Number of sequences, a positive multiple of 10 (the same number per class).
    data_seed : int
        The ``seed`` of ``mnist1d``'s dataset arguments (42 gives the standard data set).

    Returns
    -------
    x : numpy.ndarray
        ``(n_samples, 40)`` float32 sequences, standardised over the whole set (as
        ``make_dataset`` does), in ``make_dataset``'s shuffled order, read-only.
    y : numpy.ndarray
        ``(n_samples,)`` int64 labels in ``0..9``, read-only.

    Notes
    -----
    Every other argument is ``mnist1d.data.get_dataset_args()``'s default. The result is
    cached in memory (a few recent sizes and seeds): generating the standard 5000
    sequences takes about 2 s. The global ``random`` and ``numpy.random`` states, which
    ``make_dataset`` reseeds, are restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    if n_samples < N_CLASSES or n_samples % N_CLASSES:
        raise ValueError(f"n_samples must be a positive multiple of {N_CLASSES}, got {n_samples}")
    args = get_dataset_args()
    args.num_samples = n_samples
    args.seed = data_seed
    with _GLOBAL_RNG_LOCK:
        # the legacy global state is the one make_dataset draws from
        py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
        try:
            dataset = make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002
    x = np.concatenate([dataset["x"], dataset["x_test"]]).astype(np.float32)
    y = np.concatenate([dataset["y"], dataset["y_test"]]).astype(np.int64)
    if x.shape != (n_samples, args.final_seq_length) or y.shape != (n_samples,):
        raise RuntimeError(f"mnist1d.make_dataset returned {x.shape} and {y.shape}")
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def load_mnist1d_split(
    n_train: int = 4000, n_test: int = 1000, data_seed: int = 42
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The MNIST-1D training and test sets, generated offline.

    Parameters
    ----------
    n_train, n_test : int, default 4000 and 1000
        Sizes of the two sets; ``n_train + n_test`` sequences are generated (a multiple
        of 10) and the first ``n_train`` of ``make_dataset``'s shuffled order train.
    data_seed : int, default 42
        Seed of the generation; the defaults give the standard MNIST-1D split (the first
        4000 of 5000 sequences train, the last 1000 test).

    Returns
    -------
    X_train : Tensor
        ``(n_train, 1, 40)`` float32 sequences (one channel).
    y_train : Tensor
        ``(n_train,)`` int64 labels in ``0..9``.
    X_test : Tensor
        ``(n_test, 1, 40)`` float32 sequences.
    y_test : Tensor
        ``(n_test,)`` int64 labels.

    Notes
    -----
    The sets depend on ``(n_train + n_test, data_seed)`` only; the tensors are fresh
    copies of the cached arrays of :func:`generate_mnist1d`.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    x, y = generate_mnist1d(n_train + n_test, data_seed)
    xs = torch.tensor(x).unsqueeze(1)
    ys = torch.tensor(y)
    return xs[:n_train].clone(), ys[:n_train].clone(), xs[n_train:].clone(), ys[n_train:].clone()


def augment(
    x: Tensor,
    generator: torch.Generator,
    *,
    max_shift: int,
    offset_std: float,
    slope_std: float,
    noise_std: float,
) -> Tensor:
    """MNIST-1D's own augmentation: re-drawn offset and trend, circular shift, noise.

    As the augmentation of the MNIST-1D repository's self-supervised learning notebook,
    vectorised and drawn from ``generator``: each sequence loses its own mean and
    least-squares linear trend, is shifted circularly (as ``mnist1d.transform.translate``,
    which also builds the data set) by a random ``0..max_shift - 1`` positions, and gets
    a random trend and offset back; then optional i.i.d. Gaussian noise (as
    ``mnist1d.transform.iid_noise_like``). A run's settings, and their defaults, are the
    augmentation fields of :class:`~workflows.mnist1d.config.TrainConfig`.

    Parameters
    ----------
    x : Tensor
        ``(batch, ..., length)`` sequences (the last axis is the position).
    generator : torch.Generator
        Source of every random draw; the result is a deterministic function of its state.
    max_shift : int
        Shifts are drawn uniformly from ``0..max_shift - 1`` (``x[..., i]`` moves to
        ``i + shift`` modulo the length, as ``numpy.roll``).
    offset_std : float
        Standard deviation of the new offset.
    slope_std : float
        Standard deviation of the new slope (per position, centred on the middle).
    noise_std : float
        Standard deviation of the added noise (no draw when 0).

    Returns
    -------
    Tensor
        Augmented sequences, same shape and dtype as ``x``.

    Examples
    --------
    >>> x = torch.arange(8.0).reshape(2, 1, 4)
    >>> out = augment(x, torch.Generator().manual_seed(0), max_shift=1, offset_std=0.0,
    ...               slope_std=0.0, noise_std=0.0)
    >>> out.abs().max().item() < 1e-6  # the pure ramps lose their mean and their trend
    True
    """
    if max_shift < 1:
        raise ValueError(f"max_shift must be >= 1, got {max_shift}")
    b, length = x.shape[0], x.shape[-1]
    per_sample = (b,) + (1,) * (x.dim() - 1)
    t = torch.arange(length, dtype=x.dtype) - (length - 1) / 2
    centred = x - x.mean(dim=-1, keepdim=True)
    slope = (centred * t).sum(dim=-1, keepdim=True) / (t * t).sum()
    flat = centred - slope * t
    shifts = torch.randint(0, max_shift, (b,), generator=generator).view(per_sample)
    index = (torch.arange(length) - shifts) % length
    out = torch.gather(flat, -1, index.expand_as(flat))
    new_slope = torch.randn(per_sample, generator=generator, dtype=x.dtype) * slope_std
    new_offset = torch.randn(per_sample, generator=generator, dtype=x.dtype) * offset_std
    out = out + new_slope * t + new_offset
    if noise_std > 0:
        out = out + torch.randn(x.shape, generator=generator, dtype=x.dtype) * noise_std
    return out

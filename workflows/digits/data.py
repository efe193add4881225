"""The scikit-learn 8x8 digits data of the digits workflow.

Owns loading the 1797 bundled images, their seeded stratified train/test split
(:func:`load_digits_split`) and the random-shift augmentation (:func:`random_shift`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["load_digits_split", "random_shift"]


def load_digits_split(
    seed: int, test_fraction: float = 0.25
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Load the scikit-learn digits data and split it into train and test sets.

    Parameters
    ----------
    seed : int
        Random state of the stratified split.
    test_fraction : float, default 0.25
        Fraction of the 1797 samples that goes to the test set, in ``(0, 1)``.

    Returns
    -------
    X_train : Tensor
        ``(n_train, 1, 8, 8)`` float32 images with pixel values in ``[0, 1]``.
    y_train : Tensor
        ``(n_train,)`` int64 labels in ``0..9``.
    X_test : Tensor
        ``(n_test, 1, 8, 8)`` float32 images with pixel values in ``[0, 1]``.
    y_test : Tensor
        ``(n_test,)`` int64 labels in ``0..9``.

    Notes
    -----
    The split is stratified by label and depends only on ``seed`` and
    ``test_fraction``. Note the return order: (X, y) of the train set, then of the
    test set (not scikit-learn's ``X_train, X_test, y_train, y_test``).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    digits = load_digits()
    # Raw pixel intensities are integers in 0..16.
    images = (np.asarray(digits.data, dtype=np.float64) / 16.0).astype(np.float32)
    images = images.reshape(-1, 1, 8, 8)
    labels = np.asarray(digits.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return (
        torch.from_numpy(np.ascontiguousarray(x_tr)),
        torch.from_numpy(np.ascontiguousarray(y_tr)),
        torch.from_numpy(np.ascontiguousarray(x_te)),
        torch.from_numpy(np.ascontiguousarray(y_te)),
    )


def random_shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Shift each image by a random integer offset, filling with zeros (no wrap-around).

    Parameters
    ----------
    x : Tensor
        ``(batch, channels, height, width)`` images.
    generator : torch.Generator
        Source of the offsets; the result is a deterministic function of its state.
    max_shift : int, default 1
        Offsets are drawn uniformly from ``-max_shift..max_shift`` independently for
        rows and columns of every image.

    Returns
    -------
    Tensor
        Shifted images, same shape and dtype as ``x``.
    """
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    rows = offsets[:, 0:1] + torch.arange(h)  # (b, h)
    cols = offsets[:, 1:2] + torch.arange(w)  # (b, w)
    batch_idx = torch.arange(b)[:, None, None]
    # Advanced indices separated by a slice: the result is laid out (b, h, w, c).
    out = padded[batch_idx, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()

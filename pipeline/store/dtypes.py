"""The trajectory's storage dtypes, and the ``bfloat16`` Zarr data type.

A trajectory is stored in the smallest floating dtype that holds every stored tensor exactly:
``bfloat16`` or ``float16`` when every stored tensor has that dtype, else ``float32`` (float64
tensors are rounded to float32, as before). Kernels upcast to float64 in any case.

zarr-python 3.1 has no ``bfloat16``: it is registered here as the ``bfloat16`` data type of the
zarr-extensions specification (https://github.com/zarr-developers/zarr-extensions, little-endian
bytes, fill value as a JSON float or ``"NaN"``), with NumPy's scalar type from ``ml_dtypes``.
Importing :mod:`pipeline.store` registers it; any other zarr-python process reads a bf16
trajectory after ``import pipeline.store`` (or :func:`register_bfloat16`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "STORE_DTYPES",
    "bfloat16",
    "narrow",
    "numpy_dtype",
    "register_bfloat16",
    "smallest_exact_dtype",
]

#: dtypes a trajectory can be stored in (``--store-dtype``)
STORE_DTYPES = ("float32", "float16", "bfloat16")

try:
    import ml_dtypes

    bfloat16: Any = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    bfloat16 = None


def numpy_dtype(store_dtype: str) -> np.dtype[Any]:
    """The NumPy dtype of a trajectory stored as ``store_dtype``."""
    if store_dtype == "bfloat16":
        if bfloat16 is None:  # pragma: no cover
            raise ImportError("a bfloat16 trajectory needs the ml_dtypes package")
        return bfloat16
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store dtype must be one of {STORE_DTYPES}, got {store_dtype!r}")
    return np.dtype(store_dtype)


def narrow(values: np.ndarray, store_dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``values`` that were widened from ``store_dtype`` back to it, bit for bit (NaN
    payloads included: a cast would quiet signalling NaNs and warn).

    bfloat16 is the upper half of a float32: the bits shifted right by 16.

    >>> import ml_dtypes
    >>> x = np.array([0x7FBF, 0x3F80, 0xFF80], dtype=np.uint16)
    >>> wide = (x.astype(np.uint32) << 16).view(np.float32)
    >>> narrow(wide, "bfloat16").view(np.uint16).tolist() == x.tolist()
    True
    """
    dt = numpy_dtype(store_dtype)
    if out is None:
        out = np.empty(values.shape, dtype=dt)
    if values.dtype == dt:
        np.copyto(out, values)
    elif store_dtype == "bfloat16":
        np.right_shift(values.view(np.uint32), 16, out=out.view(np.uint16), casting="unsafe")
    else:
        with np.errstate(invalid="ignore", over="ignore"):
            np.copyto(out, values, casting="unsafe")
    return out


def smallest_exact_dtype(dtypes: list[str] | tuple[str, ...]) -> str:
    """The smallest store dtype holding every one of ``dtypes`` (the stored tensors') exactly.

    >>> smallest_exact_dtype(["bfloat16", "bfloat16"]), smallest_exact_dtype(["float16"])
    ('bfloat16', 'float16')
    >>> smallest_exact_dtype(["bfloat16", "float16"]), smallest_exact_dtype([])
    ('float32', 'float32')
    """
    kinds = set(dtypes)
    if len(kinds) == 1 and kinds <= {"bfloat16", "float16"}:
        return kinds.pop()
    return "float32"


_REGISTERED = False


def register_bfloat16() -> None:
    """Register the ``bfloat16`` data type with zarr-python (idempotent)."""
    global _REGISTERED
    if _REGISTERED or bfloat16 is None:
        return
    from zarr.core.dtype import data_type_registry
    from zarr.core.dtype.common import DataTypeValidationError
    from zarr.core.dtype.npy.float import BaseFloat

    bf_cls = type(bfloat16)

    @dataclass(frozen=True, kw_only=True)
    class BFloat16(BaseFloat):
        """zarr-extensions ``bfloat16``: 1 sign, 8 exponent and 7 mantissa bits."""

        dtype_cls = bf_cls
        _zarr_v3_name: ClassVar[str] = "bfloat16"
        _zarr_v2_names: ClassVar[tuple[str, ...]] = ("bfloat16",)

        @property
        def item_size(self) -> int:
            return 2

        @classmethod
        def from_native_dtype(cls, dtype: Any) -> BFloat16:
            if isinstance(dtype, bf_cls):
                return cls(endianness="little")
            raise DataTypeValidationError(f"Invalid data type: {dtype}. Expected bfloat16")

        def to_native_dtype(self) -> Any:
            return bfloat16

    if "bfloat16" not in data_type_registry.contents:
        data_type_registry.register("bfloat16", BFloat16)
    _REGISTERED = True

"""Shared pieces of the benchmark scripts (they live in :mod:`pipeline.bench.common`)."""

from pipeline.bench.common import PeakRSS

__all__ = ["PeakRSS"]

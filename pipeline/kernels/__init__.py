"""Per-block and small-matrix math: arrays in, arrays out. No dask, no I/O; numpy or cupy by
input type.

:mod:`.cmd` (the CMD fit of a block, Pearson), :mod:`.cluster` (complete linkage, references,
tie rules), :mod:`.sampling` (stratified draws), :mod:`.reconstruct`, :mod:`.online` (exact
running least squares), :mod:`.svd` (truncated and randomised SVD, polar factor),
:mod:`.baselines` (Gram, POD, DMD), :mod:`.koopman` (Koopman spectra).
"""

"""Per-chunk math: arrays in, arrays out. No dask, no I/O; numpy or cupy by input type."""

"""Defaults, in one place.

The package's defaults and limits: functions take explicit arguments whose defaults come
from this module.
"""

from __future__ import annotations

__all__ = [
    "BASELINE_BLOCK_BYTES",
    "BENCH_EPOCHS",
    "BENCH_SECTIONS",
    "CODECS",
    "COMPARE_DELAYS",
    "COMPARE_PERMUTATIONS",
    "COMPARE_SHUFFLES",
    "COMPARE_SOURCE",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_CODEC",
    "DEFAULT_FLOAT_BUFFERS",
    "DEFAULT_NONFINITE",
    "DEFAULT_SAMPLES",
    "DEFAULT_STORE_DTYPE",
    "DEFAULT_TIME_CHUNK",
    "DRAW_ROUNDS",
    "EMBED_EVERY",
    "EMBED_FRACTION",
    "FIT_BLOCK_BYTES",
    "FIT_KERNEL",
    "FIT_KERNEL_ENV",
    "INGEST_TASK_BYTES",
    "INLINE_TENSOR_MAX_ELEMENTS",
    "KNOWN_BUFFER_SUFFIXES",
    "MIN_EPOCHS",
    "NONFINITE_POLICIES",
    "ONLINE_MODES",
    "ONLINE_WARMUP",
    "READ_BLOCK_BYTES",
    "SCALE_EPOCHS",
    "STABILITY_MAX_EXACT",
    "STABILITY_MODES",
    "STABILITY_RANK",
    "STABILITY_THRESHOLD",
    "STORE_DTYPE_CHOICES",
    "SWEEP_EPOCHS",
    "SWEEP_MODES",
    "SWEEP_SEEDS",
]

#: Target size of one trajectory chunk. 4-16 MB chunks read fastest from the page cache with
#: zarr-python 3.1 (ECOSYSTEM.md: 3-3.5 GB/s against 1.1-1.5 GB/s for 50-200 MB chunks).
DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024

#: Epochs per chunk along the time axis. 1 means every epoch is its own column of chunks, so
#: appending epochs only ever creates new chunks.
DEFAULT_TIME_CHUNK = 1

#: Codec of the trajectory: "none" (raw little-endian float32, fastest) or "lz4"
#: (Blosc lz4 with byte shuffle, ~1.2x smaller on float32 weights).
#: the codecs a trajectory can use
CODECS = ("none", "lz4")
DEFAULT_CODEC = "none"

#: Epochs of the synthetic language model of ``cmd-pipeline bench --scale N``.
SCALE_EPOCHS = 12

#: The trajectory's dtype: "auto" (the smallest of float32/float16/bfloat16 that holds every
#: stored tensor exactly: bf16 and fp16 runs are stored at 2 bytes a value, anything else as
#: float32), or one of them (refused when it cannot hold a stored tensor exactly).
STORE_DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
DEFAULT_STORE_DTYPE = "auto"

#: Whether floating-point buffers (BatchNorm running statistics, ...) go into the trajectory.
DEFAULT_FLOAT_BUFFERS = True

#: What ingest does with NaN/Inf: "keep" stores them verbatim and counts them,
#: "error" refuses the checkpoint.
NONFINITE_POLICIES = ("keep", "error")
DEFAULT_NONFINITE = "keep"

#: Tensors left out of the trajectory (integer buffers) are kept inline in the epoch metadata
#: when they have at most this many elements; larger ones are read back from the source files.
INLINE_TENSOR_MAX_ELEMENTS = 65536

#: Name suffixes of state_dict entries that are buffers, not trainable parameters.
KNOWN_BUFFER_SUFFIXES = (
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "position_ids",
    "token_type_ids",
    "inv_freq",
    "attn.bias",
    "attn.masked_bias",
)

#: Bytes of trajectory chunks one ingest task writes (consecutive chunks of one epoch; at
#: least one chunk): with 8 MiB chunks, 4 per task. Each task costs the scheduler and the
#: worker about 2 ms whatever it does; a 70B-parameter run of 100 epochs is 1.75 million
#: 8 MiB chunks.
INGEST_TASK_BYTES = 32 * 1024 * 1024

#: Block size of sequential reads (hashing).
READ_BLOCK_BYTES = 8 * 1024 * 1024

#: K, the number of sampled parameters (the paper uses 1000; about 30 x M suffices).
DEFAULT_SAMPLES = 1000

#: Target size of one fit task's float32 block (rows x window epochs); the kernel's per-row
#: float64 results add about 100 bytes per row. 64 MiB rather than 16: per-task costs (the
#: scheduler, six result writes) are spread over 4 times the rows; measured with
#: ``benchmarks/bench_fit.py --n 1e7 --epochs 100 --block-rows 32768,131072,262144``: fit
#: 4.60 s, 3.41 s, 3.35 s (medians of 3, one run).
FIT_BLOCK_BYTES = 64 * 1024 * 1024

#: Target size of one task's float32 block in the baselines' passes (Gram, error sums): each
#: also holds its float64 copy and products.
BASELINE_BLOCK_BYTES = 16 * 1024 * 1024

#: Rounds of redrawing when sampled parameters turn out constant or non-finite over the
#: window; when they still fall short of K, one pass finds every varying parameter.
DRAW_ROUNDS = 20

#: The shortest window CMD accepts: over 2 epochs every varying profile is a line, and
#: every pair correlates perfectly.
MIN_EPOCHS = 3

#: SVD-basis stability: the stability above which a basis counts as settled (OIALR's rule)
STABILITY_THRESHOLD = 0.9
#: layers with more elements get a randomised SVD
STABILITY_MAX_EXACT = 4_000_000
#: rank of the randomised SVD when none is given
STABILITY_RANK = 64
#: M of the sliding-window fits of ``stability --mode-windows``
STABILITY_MODES = 10

#: ``evaluate``'s sweep: numbers of modes, sampling seeds, and the epochs each fit is
#: evaluated at ("last", "all" or a comma list)
SWEEP_MODES = (1, 2, 5, 10, 20)
SWEEP_SEEDS = (0, 1, 2)
SWEEP_EPOCHS = "last"

#: ``compare``: coordinates ("refs": the studies' reference profiles; "pcs": principal
#: components), Hankel delays, time-shuffle controls per pair, permutations of the group test
COMPARE_SOURCE = "refs"
COMPARE_DELAYS = 2
COMPARE_SHUFFLES = 100
COMPARE_PERMUTATIONS = 2000

#: ``cmd-pipeline bench``: T of its stores, and its sections
BENCH_EPOCHS = 50
BENCH_SECTIONS = ("throughput", "numerics", "growth", "beyond-ram", "baselines")

#: Online and Embedded CMD: warm-up epochs (the post-hoc fit that fixes the modes) and modes
ONLINE_WARMUP = 20
ONLINE_MODES = 10
#: Embedded CMD: embed every this many epochs after the warm-up, this share of the
#: parameters still trained each time
EMBED_EVERY = 10
EMBED_FRACTION = 0.1

#: The fit's CPU kernel: "auto" (the fused numba kernel when numba imports, else numpy),
#: "numba" or "numpy" (:func:`pipeline.kernels.cmd.fit_block`, also the CuPy kernel). The
#: environment variable ``CMD_PIPELINE_FIT_KERNEL`` overrides it (workers inherit it).
FIT_KERNEL = "auto"
FIT_KERNEL_ENV = "CMD_PIPELINE_FIT_KERNEL"


"""The ``cmd-pipeline`` command line. Each subcommand is a thin wrapper of a function in
:mod:`pipeline.ops`; errors become a one-line message and a non-zero exit code."""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

import click

from pipeline._version import __version__
from pipeline.config import (
    BENCH_EPOCHS,
    BENCH_SECTIONS,
    CODECS,
    COMPARE_DELAYS,
    COMPARE_SHUFFLES,
    COMPARE_SOURCE,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CODEC,
    DEFAULT_FLOAT_BUFFERS,
    DEFAULT_NONFINITE,
    DEFAULT_SAMPLES,
    DEFAULT_STORE_DTYPE,
    DEFAULT_TIME_CHUNK,
    INGEST_TASK_BYTES,
    NONFINITE_POLICIES,
    SCALE_EPOCHS,
    STABILITY_MAX_EXACT,
    STABILITY_MODES,
    STABILITY_RANK,
    STABILITY_THRESHOLD,
    STORE_DTYPE_CHOICES,
    SWEEP_EPOCHS,
    SWEEP_MODES,
    SWEEP_SEEDS,
)
from pipeline.errors import PipelineError

__all__ = ["main"]

F = Callable[..., Any]


#: the commands whose computation runs on the GPU with --gpu (the CMD fit kernel, on CuPy)
GPU_COMMANDS = ("fit", "evaluate")

_GPU_HELP = (
    "Run the CMD fit kernel on the GPU (CuPy; needs the gpu extra): a dask-cuda "
    "LocalCUDACluster, one worker per GPU (--workers N: the first N GPUs), or the GPU workers "
    "of --scheduler; in this process with --threads/--sync. Only fit and evaluate (its sweep's "
    "fits) compute on the GPU; everything else stays on the CPU."
)
_NO_GPU_HELP = (
    "Refused: this command computes on the CPU only; only fit and evaluate compute on the GPU."
)


def _runtime_options(gpu: bool) -> Callable[[F], F]:
    """Options shared by every command that computes; ``gpu``: whether its computation runs
    on the GPU with ``--gpu`` (otherwise the flag is refused, and its help says so)."""

    def decorate(f: F) -> F:
        opts = [
            click.option(
                "--scheduler",
                metavar="ADDRESS",
                envvar="CMD_PIPELINE_SCHEDULER",
                help="Submit to an existing Dask scheduler (tcp://host:8786 or tls://...). "
                "Env: CMD_PIPELINE_SCHEDULER; dask config: cmd-pipeline.scheduler.",
            ),
            click.option(
                "--workers",
                type=click.IntRange(min=1),
                default=None,
                help="Worker processes of the embedded LocalCluster [default: one per core]; "
                "GPUs with --gpu [default: all]; threads with --threads. Refused with --sync "
                "or a scheduler.",
            ),
            click.option(
                "--memory-limit",
                default=None,
                help="Memory limit per worker of the embedded LocalCluster (e.g. 4GB) "
                "[default: auto]. Refused with --threads, --sync or a scheduler.",
            ),
            click.option(
                "--threads",
                "mode",
                flag_value="threads",
                help="Run on a local thread pool (debugging).",
            ),
            click.option(
                "--sync",
                "mode",
                flag_value="sync",
                help="Run in this process, one task at a time (debugging).",
            ),
            click.option("--gpu", is_flag=True, help=_GPU_HELP if gpu else _NO_GPU_HELP),
            click.option(
                "--performance-report",
                metavar="FILE",
                default=None,
                help="Save Dask's HTML performance report of the command to FILE.",
            ),
            click.option(
                "--tls-ca-file",
                metavar="PEM",
                default=None,
                help="CA certificate for a tls:// scheduler [default: dask config].",
            ),
            click.option(
                "--tls-cert", metavar="PEM", default=None, help="Client certificate (TLS)."
            ),
            click.option(
                "--tls-key", metavar="PEM", default=None, help="Client private key (TLS)."
            ),
            click.option("--no-progress", is_flag=True, help="Hide progress bars."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f

    return decorate


def _make_runtime(kw: dict[str, Any]) -> Any:
    """The runtime options of the current command, checked before anything starts: options
    that would have no effect are refused rather than ignored."""
    from pipeline.errors import InputError
    from pipeline.runtime import RuntimeOptions

    command = click.get_current_context().info_name
    gpu = bool(kw.pop("gpu"))
    if gpu and command not in GPU_COMMANDS:
        raise InputError(
            f"--gpu: {command} does not compute on the GPU (only fit and evaluate do, with "
            "the CMD fit kernel); run it without --gpu"
        )
    memory_limit = kw.pop("memory_limit")
    opts = RuntimeOptions(
        mode=kw.pop("mode") or "local",
        scheduler=kw.pop("scheduler"),
        workers=kw.pop("workers"),
        memory_limit=memory_limit or "auto",
        progress=not kw.pop("no_progress"),
        gpu=gpu,
        performance_report=kw.pop("performance_report"),
        tls_ca_file=kw.pop("tls_ca_file"),
        tls_cert=kw.pop("tls_cert"),
        tls_key=kw.pop("tls_key"),
    )
    address = opts.address
    for flag, given, sizes in (
        ("--workers", opts.workers is not None, ("local", "threads")),
        ("--memory-limit", memory_limit is not None, ("local",)),
    ):
        if not given:
            continue
        if address:
            raise InputError(
                f"{flag} has no effect with a scheduler ({address}): its workers run the "
                f"tasks; leave out {flag}, or --scheduler (and CMD_PIPELINE_SCHEDULER) for the "
                "embedded cluster"
            )
        if opts.mode not in sizes:
            raise InputError(
                f"{flag} has no effect with --{opts.mode}: it sizes the embedded cluster"
                f"{' or the thread pool of --threads' if 'threads' in sizes else ''}; "
                f"leave out {flag} or --{opts.mode}"
            )
    return opts


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text.strip())


def _verbosity() -> int:
    ctx = click.get_current_context(silent=True)
    return int(ctx.find_root().params.get("verbose") or 0) if ctx is not None else 0


def _current_flags() -> dict[str, str]:
    ctx = click.get_current_context(silent=True)
    return flag_names(ctx.command) if ctx is not None else {}


def flag_names(command: click.Command) -> dict[str, str]:
    """The command's options by parameter name: the click name and the name its long flag
    spells (``run_dir`` and ``run`` -> ``--run``; ``epoch_spec`` and ``epochs`` -> ``--epochs``)."""
    out: dict[str, str] = {}
    for p in command.params:
        longs = [o for o in getattr(p, "opts", []) if o.startswith("--")]
        if not isinstance(p, click.Option) or not longs:
            continue
        if p.name:
            out[p.name] = longs[0]
        for o in longs:
            out.setdefault(o[2:].replace("-", "_"), longs[0])
    return out


_PARAM = re.compile(r"\b([a-z][a-z0-9_]*)=(True|'[^']*'|\"[^\"]*\"|[^\s,;)]+)|`([a-z][a-z0-9_]*)`")


def as_flags(message: str, flags: dict[str, str]) -> str:
    """A library message speaks of parameters (``force=True``, ``epochs='0:5'``, or a name in
    backquotes); the CLI says the flags of the running command instead (``--force``,
    ``--epochs 0:5``, ``--epochs``). Names that are not the command's options stay as they are.

    >>> as_flags("pass force=True to rebuild", {"force": "--force"})
    'pass --force to rebuild'
    >>> as_flags("give a.pt b.pt epochs='0,1'; seed=3 stays", {"epochs": "--epochs"})
    'give a.pt b.pt --epochs 0,1; seed=3 stays'
    >>> as_flags("leave out `epochs`", {"epochs": "--epochs"})
    'leave out --epochs'
    """

    def sub(m: re.Match[str]) -> str:
        if m.group(3) is not None:
            return flags.get(m.group(3), m.group(0))
        flag = flags.get(m.group(1))
        if flag is None:
            return m.group(0)
        value = m.group(2)
        return flag if value == "True" else f"{flag} {value.strip(chr(39) + chr(34))}"

    return _PARAM.sub(sub, message)


def _handle_errors(f: F) -> F:
    """Errors become one line on stderr (``error: ...``) and the documented exit code.

    An exception that is not a :class:`PipelineError` is a bug or input that escaped the
    checks: it is reported in one line too (exit code 1), and ``-vv`` shows its traceback.
    """

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipeline.runtime import interruptible

        try:
            with interruptible():  # a Ctrl-C is never lost (see pipeline.runtime.interruptible)
                return f(*args, **kwargs)
        except PipelineError as e:
            click.echo(f"error: {_one_line(as_flags(str(e), _current_flags()))}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo(
                "interrupted: finished chunks are kept; re-run the same command to resume", err=True
            )
            sys.exit(130)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            if _verbosity() >= 2:
                raise
            click.echo(
                f"error: unexpected {type(e).__name__}: {_one_line(str(e))} (a bug, or input "
                "that escaped the checks; -vv shows the traceback)",
                err=True,
            )
            sys.exit(1)

    return wrapper


_STORAGE_HELP = (
    "fsspec options for the remote URLs (s3://, gs://, ...) of the store and the inputs, as "
    "a JSON object: credentials, endpoint_url, client_kwargs, anon... They reach the Dask "
    "workers and are never printed or stored. Env: CMD_PIPELINE_STORAGE_OPTIONS (keeps "
    "secrets off the command line)."
)


def _storage_options(f: F) -> F:
    """``--storage-options JSON``: applied to the protocols of the remote URLs among the
    command's arguments (its store, inputs, other runs) while it runs."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipeline.store import remote

        opts = remote.parse_options(
            kwargs.pop("storage_options", None), "--storage-options (or CMD_PIPELINE_STORAGE_OPTIONS)"
        )
        urls: list[str] = []
        for v in kwargs.values():
            for x in v if isinstance(v, tuple | list) else (v,):
                if isinstance(x, str) and "://" in x:
                    urls.append(x)
        with remote.storage_options(opts, urls):
            return f(*args, **kwargs)

    option = click.option(
        "--storage-options",
        metavar="JSON",
        envvar="CMD_PIPELINE_STORAGE_OPTIONS",
        default=None,
        help=_STORAGE_HELP,
    )
    return option(wrapper)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cmd-pipeline")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Correlation Mode Decomposition of neural-network training trajectories, out of core.

    Checkpoints are ingested into a Zarr store (N parameters x T epochs); studies run on it.
    Only fit and evaluate (its sweep's fits) compute on the GPU (--gpu); the other commands
    refuse --gpu.
    """
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose + 1, 2),
        format="%(message)s",
        stream=sys.stderr,
    )
    if verbose < 2:
        # dask's own INFO chatter (workers starting, plugins, closing) only with -vv; set
        # before distributed is imported, which configures its loggers from this
        import dask

        levels = {"distributed": "warning"}
        if verbose == 0:
            # the client's "Couldn't gather ... rescheduling" while a lost worker's tasks are
            # retried is expected here: failures that matter reach the user as one error line
            levels["distributed.client"] = "error"
        dask.config.set({"logging": levels})
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level.upper())


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--store", "-s", required=True, help="Store path or fsspec URL (created if missing).")
@click.option(
    "--epochs",
    "epoch_spec",
    metavar="SPEC",
    help="Epoch numbers of the inputs in order: START:END[:STEP] or a comma list "
    "[default: parsed from file names].",
)
@click.option(
    "--include", multiple=True, metavar="GLOB", help="Only tensors whose names match (repeatable)."
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="GLOB",
    help="Leave out tensors whose names match (repeatable).",
)
@click.option(
    "--buffer",
    "buffer_patterns",
    multiple=True,
    metavar="GLOB",
    help="Names to treat as buffers, besides the known ones (running_mean, ...).",
)
@click.option(
    "--float-buffers/--no-float-buffers",
    default=None,
    help="Store floating-point buffers (BatchNorm running statistics) "
    f"[default: {'store' if DEFAULT_FLOAT_BUFFERS else 'leave out'} them].",
)
@click.option(
    "--nonfinite",
    type=click.Choice(list(NONFINITE_POLICIES)),
    default=None,
    help="NaN/Inf: keep them verbatim and count them, or refuse the checkpoint "
    f"[default: {DEFAULT_NONFINITE}].",
)
@click.option(
    "--chunk-rows",
    type=click.IntRange(min=1),
    default=None,
    help=f"Rows per chunk [default: {DEFAULT_CHUNK_BYTES // 2**20} MiB chunks].",
)
@click.option(
    "--time-chunk",
    type=click.IntRange(min=1),
    default=None,
    help=f"Epochs per chunk [default: {DEFAULT_TIME_CHUNK}; 1: appends never rewrite a chunk].",
)
@click.option(
    "--codec",
    type=click.Choice(list(CODECS)),
    default=None,
    help=f"Chunk codec [default: {DEFAULT_CODEC}].",
)
@click.option(
    "--store-dtype",
    type=click.Choice(list(STORE_DTYPE_CHOICES)),
    default=None,
    help=(
        f"Trajectory dtype [default: {DEFAULT_STORE_DTYPE}: the smallest that holds every "
        "stored tensor exactly, e.g. bfloat16 for a bf16 run]."
    ),
)
@click.option(
    "--strip-prefix",
    metavar="PREFIX",
    default=None,
    help="Remove PREFIX from the tensor names that start with it: 'model.' of a Lightning "
    "module, 'module.' of DDP or DeepSpeed [default: the store's, else none; '' for none].",
)
@click.option(
    "--force",
    is_flag=True,
    help="Rebuild the trajectory when inputs or settings differ from the store's.",
)
@click.option(
    "--chunks-per-task",
    type=click.IntRange(min=1),
    default=None,
    help="Chunks one task writes (consecutive rows of one epoch) [default: "
    f"{INGEST_TASK_BYTES // 2**20} MiB per task]. Any value gives the same store.",
)
@_runtime_options(gpu=False)
@_handle_errors
@_storage_options
def ingest(inputs: tuple[str, ...], store: str, epoch_spec: str | None, **kw: Any) -> None:
    """Transpose per-epoch checkpoints (INPUT: files, directories, globs) into the store.

    Checkpoints: .pt/.pth/.bin/.ckpt (torch.save, e.g. Lightning) and .safetensors files;
    Hugging Face checkpoint-N/ folders (one model file or shards with their index); DeepSpeed
    global_stepN/ folders; PyTorch Distributed Checkpoint folders (.metadata + *.distcp).
    Re-running the same command resumes an interrupted ingest; new epochs are appended.
    """
    from pipeline.ops.ingest import ingest as run_ingest
    from pipeline.plan import parse_epoch_spec

    runtime = _make_runtime(kw)
    try:
        epochs = parse_epoch_spec(epoch_spec) if epoch_spec else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--epochs") from None
    result = run_ingest(inputs, store, epochs=epochs, runtime=runtime, **kw)
    click.echo(result.summary())


@main.command()
@click.option("--store", "-s", required=True, help="Store path or fsspec URL.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_handle_errors
@_storage_options
def info(store: str, as_json: bool) -> None:
    """Print N, T, epochs, tensors, chunking, analyses and size on disk."""
    from pipeline.ops.info import format_info
    from pipeline.ops.info import info as get_info

    d = get_info(store)
    click.echo(json.dumps(d, indent=2) if as_json else format_info(d))


@main.command()
@click.option("--store", "-s", required=True, help="Store path or fsspec URL.")
@_handle_errors
@_storage_options
def upgrade(store: str) -> None:
    """Migrate a store written by an earlier release to the current schema, in place.

    Only metadata is rewritten (chunks and studies are kept byte for byte); older stores are
    readable without it, but ingest refuses to write to them until they are upgraded.
    """
    from pipeline.store.trajectory import upgrade as run_upgrade

    old, new = run_upgrade(store)
    if old == new:
        click.echo(f"{store}: already at store schema version {new}")
    else:
        click.echo(f"{store}: upgraded from store schema version {old} to {new}")


@main.command()
@click.option("--store", "-s", required=True, help="Store path or fsspec URL.")
@click.option("--epoch", type=int, required=True, help="Epoch number to export.")
@click.option(
    "--out",
    "-o",
    default=None,
    type=click.Path(dir_okay=False),
    help="Output file: .safetensors (streamed), .pt/.pth, or .ckpt (a copy of the Lightning "
    "checkpoint --like with the weights replaced).",
)
@click.option(
    "--hf-folder",
    default=None,
    type=click.Path(),
    help="Write a Hugging Face model folder instead of --out: config, tokenizer and other "
    "files from --like, the weights as sharded safetensors.",
)
@click.option(
    "--like",
    default=None,
    metavar="PATH",
    help="The model to shape the output like: a Hugging Face folder (--hf-folder; default: "
    "the epoch's checkpoint folder) or a Lightning .ckpt (--out X.ckpt).",
)
@click.option(
    "--analysis",
    default=None,
    metavar="NAME",
    help="Export this CMD analysis's reconstruction instead.",
)
@click.option(
    "--max-shard-size",
    default=None,
    metavar="SIZE",
    help="Largest safetensors shard of --hf-folder, e.g. 500MB, 5GB, 2GiB (default 5GB).",
)
@click.option("--force", is_flag=True, help="Replace a non-empty --hf-folder.")
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse, instead of keeping from --like or leaving out, tensors only one side has.",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@_handle_errors
@_storage_options
def export(
    store: str,
    epoch: int,
    out: str | None,
    hf_folder: str | None,
    like: str | None,
    analysis: str | None,
    max_shard_size: str | None,
    force: bool,
    strict: bool,
    no_progress: bool,
) -> None:
    """Write one epoch as a state_dict with the original names, shapes and dtypes, or as the
    user's model format (--hf-folder, or --out X.ckpt with --like)."""
    if (out is None) == (hf_folder is None):
        raise click.UsageError("give exactly one of --out FILE and --hf-folder DIR")
    if hf_folder is not None:
        from pipeline.ops.export_like import DEFAULT_MAX_SHARD_SIZE, export_hf

        result = export_hf(
            store,
            epoch,
            hf_folder,
            like=like,
            analysis=analysis,
            max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE,
            force=force,
            strict=strict,
            progress=not no_progress,
        )
        click.echo(result.text())
        return
    if max_shard_size is not None or force:
        raise click.UsageError("--max-shard-size and --force go with --hf-folder")
    ckpt = out is not None and out.lower().endswith(".ckpt")
    if ckpt and like is None:
        raise click.UsageError("--out X.ckpt needs --like CKPT, the Lightning checkpoint to copy")
    if like is not None and not ckpt:
        raise click.UsageError("--like goes with --hf-folder DIR or --out X.ckpt")
    if ckpt:
        from pipeline.ops.export_like import export_ckpt

        result = export_ckpt(
            store,
            epoch,
            str(out),
            like=str(like),
            analysis=analysis,
            strict=strict,
            progress=not no_progress,
        )
        click.echo(result.text())
        return
    if strict:
        raise click.UsageError("--strict goes with --like")
    from pipeline.ops.export import export as run_export

    path = run_export(store, epoch, str(out), analysis=analysis, progress=not no_progress)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--store", "-s", required=True, help="Store path or fsspec URL.")
@click.option("--name", "-n", required=True, help="Name of the study (analyses/NAME in the store).")
@click.option(
    "--modes",
    "-m",
    type=click.IntRange(min=1),
    default=None,
    help="Cut into at most M modes (exactly one of --modes/--threshold).",
)
@click.option(
    "--threshold",
    "-t",
    type=click.FloatRange(0, 1),
    default=None,
    help="Cut at in-cluster distance t (distance = 1 - |corr|).",
)
@click.option(
    "--samples",
    "-k",
    type=click.IntRange(min=2),
    default=DEFAULT_SAMPLES,
    show_default=True,
    help="K, the number of sampled parameters.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling.")
@click.option(
    "--epochs",
    "window",
    metavar="START:END[:STEP]",
    default=None,
    help="Window over the stored epoch numbers (END exclusive) and sub-sampling step "
    "[default: all epochs].",
)
@click.option(
    "--block-rows",
    type=click.IntRange(min=1),
    default=None,
    help="Rows per task [default: 64 MiB float32 blocks].",
)
@click.option(
    "--diagnostics",
    is_flag=True,
    help="Also store each parameter's correlation with its reference and its residual "
    "(float32 corr and residual: 8 more bytes per parameter; the summaries have them anyway).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing study of this name with another configuration.",
)
@_runtime_options(gpu=True)
@_handle_errors
@_storage_options
def fit(
    store: str,
    name: str,
    modes: int | None,
    threshold: float | None,
    samples: int,
    seed: int,
    window: str | None,
    block_rows: int | None,
    diagnostics: bool,
    force: bool,
    **kw: Any,
) -> None:
    """Post-hoc CMD: sample, cluster into modes, then fit every parameter in one pass.

    Re-running the same study changes nothing; an interrupted one resumes.
    """
    from pipeline.ops.fit import fit as run_fit

    if (modes is None) == (threshold is None):
        raise click.UsageError("give exactly one of --modes or --threshold")
    result = run_fit(
        store,
        name,
        modes=modes,
        threshold=threshold,
        samples=samples,
        seed=seed,
        epochs=window,
        force=force,
        block_rows=block_rows,
        diagnostics=diagnostics,
        runtime=_make_runtime(kw),
    )
    click.echo(result.summary_text())


@main.command()
@click.option("--store", "-s", required=True, help="Store path or fsspec URL.")
@click.option("--name", "-n", required=True, help="The study to reconstruct.")
@_runtime_options(gpu=False)
@_handle_errors
@_storage_options
def reconstruct(store: str, name: str, **kw: Any) -> None:
    """Write analyses/NAME/reconstructed: a * r_mode(t) + b for every parameter (float32)."""
    from pipeline.ops.reconstruct import reconstruct as run_reconstruct

    click.echo(run_reconstruct(store, name, runtime=_make_runtime(kw)).summary())


def _int_list(value: str | None, param: str) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"comma-separated integers, got {value!r}", param_hint=param
        ) from None


@main.command()
@click.option("--store", "-s", required=True, help="Store path or fsspec URL.")
@click.option("--name", "-n", required=True, help="The study to evaluate.")
@click.option(
    "--workflow",
    "-w",
    default=None,
    help="digits, minilm or module:function (run folder -> state_dict -> (loss, accuracy)) "
    "[default: the workflow recorded in run.json].",
)
@click.option(
    "--run",
    "run_dir",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="The training run's folder with run.json [default: beside the ingested checkpoints].",
)
@click.option(
    "--sweep-modes",
    default=",".join(map(str, SWEEP_MODES)),
    show_default=True,
    metavar="M,M,...",
    help="Numbers of modes of the sweep ('' for no sweep).",
)
@click.option(
    "--sweep-seeds",
    default=",".join(map(str, SWEEP_SEEDS)),
    show_default=True,
    metavar="S,S,...",
    help="Sampling seeds of the sweep.",
)
@click.option(
    "--sweep-samples",
    default=None,
    metavar="K,K,...",
    help="Sample counts K of the sweep [default: the study's K].",
)
@click.option(
    "--sweep-epochs",
    default=SWEEP_EPOCHS,
    show_default=True,
    help="Epochs at which each sweep fit is evaluated: last, all, or a comma list.",
)
@click.option("--keep-sweep", is_flag=True, help="Keep the sweep's studies (NAME~mM-kK-sS).")
@_runtime_options(gpu=True)
@_handle_errors
@_storage_options
def evaluate(
    store: str,
    name: str,
    workflow: str | None,
    run_dir: str | None,
    sweep_modes: str,
    sweep_seeds: str,
    sweep_samples: str | None,
    sweep_epochs: str,
    keep_sweep: bool,
    **kw: Any,
) -> None:
    """Test loss and accuracy of the GD and the CMD weights at every epoch, and a sweep over M.

    Each model is loaded with strict=True into the workflow's real model. Results go into
    the study's attributes and analyses/NAME/report/ (evaluation.json, figures).
    """
    from pipeline.ops.evaluate import evaluate as run_evaluate

    result = run_evaluate(
        store,
        name,
        workflow=workflow,
        run_dir=run_dir,
        sweep_modes=_int_list(sweep_modes, "--sweep-modes"),
        sweep_seeds=_int_list(sweep_seeds, "--sweep-seeds") or [],
        sweep_samples=_int_list(sweep_samples, "--sweep-samples"),
        sweep_epochs=sweep_epochs,
        keep_sweep=keep_sweep,
        runtime=_make_runtime(kw),
    )
    click.echo(result.table())
    click.echo(f"results: {result.files['evaluation.json']}")


@main.command()
@click.option("--store", "-s", required=True, help="Store path or fsspec URL.")
@click.option("--name", "-n", required=True, help="The study to report on.")
@click.option(
    "--out",
    "-o",
    default=None,
    type=click.Path(),
    help="Also copy the page here: a .html file, or a folder (gets NAME.html).",
)
@_handle_errors
@_storage_options
def report(store: str, name: str, out: str | None) -> None:
    """Write the study's figures and a self-contained HTML report (analyses/NAME/report/)."""
    from pipeline.ops.report import report as run_report

    result = run_report(store, name, out=out)
    click.echo(result.summary())


@main.command()
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--quick", is_flag=True, help="Small sizes: a few minutes.")
@click.option(
    "--sizes",
    default=None,
    metavar="N,N,...",
    help="N of the growth sweep [quick: 1e5..3e6; full: 1e5..1e8].",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=2),
    default=BENCH_EPOCHS,
    show_default=True,
    help="T of the stores.",
)
@click.option(
    "--main-n",
    type=float,
    default=None,
    help="N of the throughput store and the baselines [quick 2e6, full 1e7].",
)
@click.option(
    "--beyond-ram",
    type=float,
    default=None,
    metavar="N",
    help="Also ingest and fit N x T (e.g. 1.5e8: 30 GB at T=50), larger than memory.",
)
@click.option(
    "--sections",
    default=",".join(BENCH_SECTIONS),
    show_default=True,
    help="Which sections to run (the hardware limits always run).",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the stores go [OUT/work].",
)
@click.option("--keep", is_flag=True, help="Keep the stores.")
@click.option(
    "--scale",
    type=float,
    default=None,
    metavar="N",
    help=(
        "Instead of the suite: a synthetic bf16 language model of about N parameters (e.g. 1e9) "
        "through ingest, fit, export, info and report, with wall time, bytes, throughput and "
        "peak RSS per step (OUT/scale.md)."
    ),
)
@click.option(
    "--scale-epochs",
    type=click.IntRange(min=3),
    default=SCALE_EPOCHS,
    show_default=True,
    help="T of the --scale run.",
)
@_runtime_options(gpu=False)
@_handle_errors
def bench(
    out: str,
    quick: bool,
    sizes: str | None,
    epochs: int,
    main_n: float | None,
    beyond_ram: float | None,
    sections: str,
    workdir: str | None,
    keep: bool,
    scale: float | None,
    scale_epochs: int,
    **kw: Any,
) -> None:
    """Benchmark suite: OUT/results.md, OUT/results.json and plots (ratios within one run).

    With --scale N, the scale run instead: OUT/scale.md and OUT/scale.json.
    """
    from pathlib import Path

    from pipeline.bench.suite import BenchOptions, run_bench

    if scale is not None:
        from pipeline.bench.scale import run_scale

        run_scale(
            scale,
            Path(out),
            epochs=scale_epochs,
            workdir=Path(workdir) if workdir else None,
            keep=keep,
            runtime=_make_runtime(kw),
        )
        click.echo((Path(out) / "scale.md").read_text())
        return

    size_list = None
    if sizes:
        try:
            size_list = [int(float(v)) for v in sizes.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(
                f"comma-separated numbers, got {sizes!r}", param_hint="--sizes"
            ) from None
    opts = BenchOptions(
        out=Path(out),
        quick=quick,
        sizes=size_list,
        epochs=epochs,
        main_n=int(main_n) if main_n else None,
        beyond_ram=int(beyond_ram) if beyond_ram else None,
        workdir=Path(workdir) if workdir else None,
        keep=keep,
        runtime=_make_runtime(kw),
        sections=tuple(x.strip() for x in sections.split(",") if x.strip()),
    )
    known = set(BENCH_SECTIONS)
    if unknown := set(opts.sections) - known:
        raise click.BadParameter(
            f"unknown section(s) {sorted(unknown)}; known: {sorted(known)}", param_hint="--sections"
        )
    run_bench(opts)
    click.echo((Path(out) / "results.md").read_text())


@main.command()
@click.option("--store", "-s", required=True, help="Store of the first run.")
@click.option("--name", "-n", required=True, help="Its study.")
@click.option(
    "--with",
    "others",
    multiple=True,
    required=True,
    metavar="STORE:NAME",
    help="Another run's store and study (repeatable; NAME after the last colon).",
)
@click.option(
    "--source",
    type=click.Choice(["refs", "pcs"]),
    default=COMPARE_SOURCE,
    show_default=True,
    help="Coordinates: the study's reference profiles, or the trajectory's top principal components.",
)
@click.option(
    "--pcs", "d", type=click.IntRange(min=1), default=None, help="Principal components [M]."
)
@click.option(
    "--delays",
    type=click.IntRange(min=1),
    default=COMPARE_DELAYS,
    show_default=True,
    help="Time delays (Hankel).",
)
@click.option(
    "--shuffles",
    type=click.IntRange(min=1),
    default=COMPARE_SHUFFLES,
    show_default=True,
    help="Time-shuffle controls per pair.",
)
@click.option(
    "--group", "groups", multiple=True, help="A group label per run, in order (permutation test)."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--save/--no-save",
    default=True,
    show_default=True,
    help="Keep the result with the first study (report/compare.json, figures) for `report`.",
)
@_runtime_options(gpu=False)
@_handle_errors
@_storage_options
def compare(
    store: str,
    name: str,
    others: tuple[str, ...],
    source: str,
    d: int | None,
    delays: int,
    shuffles: int,
    groups: tuple[str, ...],
    seed: int,
    save: bool,
    **kw: Any,
) -> None:
    """Are training runs dynamically equivalent? Koopman spectra and their distances."""
    from pipeline.ops.compare import compare as run_compare

    runs = [(store, name)]
    for o in others:
        if ":" not in o:
            raise click.BadParameter(f"expected STORE:NAME, got {o!r}", param_hint="--with")
        st, nm = o.rsplit(":", 1)
        runs.append((st, nm))
    result = run_compare(
        runs,
        source=source,
        d=d,
        delays=delays,
        shuffles=shuffles,
        seed=seed,
        groups=list(groups) or None,
        runtime=_make_runtime(kw),
    )
    click.echo(result.table())
    if save:
        from pipeline.ops.compare import save_with_study

        files = save_with_study(result)
        click.echo(f"saved with the first study: {files['compare.json']}")


@main.command()
@click.option("--store", "-s", required=True, help="Store path or fsspec URL.")
@click.option(
    "--name",
    "-n",
    default=None,
    help="A study: use its window and keep the result with it (report/stability.json) for `report`.",
)
@click.option(
    "--epochs",
    "window",
    default=None,
    metavar="START:END[:STEP]",
    help="Window [the study's, or all].",
)
@click.option(
    "--threshold", type=click.FloatRange(0, 1), default=STABILITY_THRESHOLD, show_default=True
)
@click.option(
    "--max-exact",
    type=click.IntRange(min=1),
    default=STABILITY_MAX_EXACT,
    show_default=True,
    help="Layers with more elements get a randomised SVD.",
)
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    default=None,
    help=f"Rank of the randomised SVD [{STABILITY_RANK}].",
)
@click.option(
    "--stride",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Compare epochs this many window positions apart.",
)
@click.option(
    "--mode-windows",
    default=None,
    metavar="WIDTH:STEP",
    help="Also fit sliding windows (WIDTH epochs every STEP) and report how often each layer's "
    "parameters change mode between consecutive windows (needs --name; studies NAME~wK).",
)
@click.option(
    "--modes",
    "-m",
    type=click.IntRange(min=1),
    default=STABILITY_MODES,
    show_default=True,
    help="M of the window fits.",
)
@_runtime_options(gpu=False)
@_handle_errors
@_storage_options
def stability(
    store: str,
    name: str | None,
    window: str | None,
    threshold: float,
    max_exact: int,
    rank: int | None,
    stride: int,
    mode_windows: str | None,
    modes: int,
    **kw: Any,
) -> None:
    """When does each layer's orthogonal basis (Q = U V^T of its SVD) stop moving?"""
    from pipeline.ops.stability import stability_study

    runtime = _make_runtime(kw)
    windows = None
    if mode_windows is not None:
        if name is None:
            raise click.UsageError("--mode-windows needs --name")
        try:
            width, step = (int(v) for v in mode_windows.split(":"))
        except ValueError:
            raise click.BadParameter(
                "WIDTH:STEP, e.g. 20:10", param_hint="--mode-windows"
            ) from None
        windows = (width, step)
    result = stability_study(
        store,
        name=name,
        epochs=window,
        threshold=threshold,
        max_exact=max_exact,
        rank=rank,
        stride=stride,
        mode_windows=windows,
        modes=modes,
        runtime=runtime,
    )
    click.echo(result.summary())


if __name__ == "__main__":  # pragma: no cover
    main()

"""Command lines built from the workflows' configuration dataclasses.

This module owns the one way a workflow turns its frozen configuration dataclass
(``TrainConfig``, ``FedConfig``) into command-line options and back:

- :func:`add_config_arguments` adds one ``argparse`` option per dataclass field: the flag is
  the field name with dashes (``batch_size`` -> ``--batch-size``), the default is the field's
  default, the type comes from the field's annotation (``int``, ``float``, ``str``,
  ``X | None``, ``Literal[...]`` -> ``choices``, ``bool`` -> a switch), and the help text and
  any special form come from an :class:`Option` in a per-workflow dict.
- :func:`config_from_args` builds the dataclass back from the parsed namespace, turning the
  dataclass's own validation errors (``ValueError``) into ``parser.error`` (exit status 2).
- :func:`add_recording_arguments` adds, around those, the ``--out`` and ``--overwrite``
  options shared by the workflows that record a checkpoint trajectory, and
  :func:`run_recording_cli` is the whole command of such a workflow: parse, train with a
  progress line per epoch, print a summary; :func:`recording_main` makes of it the
  workflow's ``main(argv=None)``.

Nothing here knows about a particular workflow; the workflows keep their defaults in their
dataclasses only.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

__all__ = [
    "Option",
    "add_config_arguments",
    "add_recording_arguments",
    "config_from_args",
    "recording_main",
    "run_recording_cli",
]

C = TypeVar("C")


class _FieldDefault:
    """Marker of :attr:`Option.default`: use the dataclass field's default."""

    def __repr__(self) -> str:
        return "FIELD_DEFAULT"


_FIELD_DEFAULT = _FieldDefault()


@dataclass(frozen=True)
class Option:
    """How one configuration field appears on the command line.

    Parameters
    ----------
    help : str or None, default None
        Help text of the option.
    flag : str or None, default None
        The option string. Default: ``--`` and the field name with dashes; for a ``bool``
        field whose default is True, ``--no-`` and the field name (the switch turns it off).
    zero_is_none : bool, default False
        For an ``int | None`` field: the value 0 on the command line stands for None.
    default : object, optional
        Default on the command line, when it differs from the field's default.
    """

    help: str | None = None
    flag: str | None = None
    zero_is_none: bool = False
    default: Any = _FIELD_DEFAULT


class _ZeroIsNone(argparse.Action):
    """Store the (already converted) value, or None for 0."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, None if values == 0 else values)


def _base_type(hint: Any) -> Any:
    """``X`` for ``X | None`` (or ``Optional[X]``), else ``hint`` itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ActionsContainer,
    config_cls: type,
    *,
    options: Mapping[str, Option] | None = None,
    only: Sequence[str] | None = None,
    exclude: Iterable[str] = (),
) -> None:
    """Add one option per field of the dataclass ``config_cls`` to ``parser``.

    Parameters
    ----------
    parser : argparse.ArgumentParser or argument group
        Where the options go (a mutually exclusive group works too).
    config_cls : type
        A dataclass whose fields have defaults and are annotated ``int``, ``float``,
        ``str``, ``bool``, ``Literal[...]`` or one of these ``| None``.
    options : mapping of str to Option, optional
        Help text and special forms, by field name.
    only : sequence of str, optional
        Add these fields only, in this order (default: every field, in field order).
    exclude : iterable of str, default ()
        Fields left off the command line (they keep their dataclass default).

    Raises
    ------
    TypeError
        A field has no default or an annotation without a command-line form.

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Config:
    ...     batch_size: int = 32
    ...     fmt: Literal["pt", "safetensors"] = "pt"
    ...     record_initial: bool = True
    >>> parser = argparse.ArgumentParser()
    >>> add_config_arguments(parser, Config)
    >>> args = parser.parse_args(["--batch-size", "8", "--no-record-initial"])
    >>> config_from_args(parser, Config, args)
    Config(batch_size=8, fmt='pt', record_initial=False)
    """
    options = options or {}
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    unknown = set(options) - set(fields)
    if unknown:
        raise TypeError(f"options for unknown fields of {config_cls.__name__}: {sorted(unknown)}")
    hints = typing.get_type_hints(config_cls)
    skip = set(exclude)
    for name in only if only is not None else list(fields):
        if name in skip:
            continue
        field = fields[name]
        opt = options.get(name, Option())
        default = field.default if opt.default is _FIELD_DEFAULT else opt.default
        if default is dataclasses.MISSING:
            raise TypeError(f"field {name!r} of {config_cls.__name__} has no default")
        dashed = name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": name, "help": opt.help}
        hint = _base_type(hints[name])
        if hint is bool:
            kwargs["action"] = "store_false" if default else "store_true"
            kwargs["default"] = default
            flag = opt.flag or (f"--no-{dashed}" if default else f"--{dashed}")
        elif typing.get_origin(hint) is Literal:
            kwargs.update(choices=typing.get_args(hint), default=default)
            flag = opt.flag or f"--{dashed}"
        elif hint in (int, float, str):
            kwargs.update(type=hint, default=default)
            if opt.zero_is_none:
                kwargs["action"] = _ZeroIsNone
            flag = opt.flag or f"--{dashed}"
        else:
            raise TypeError(
                f"field {name!r} of {config_cls.__name__}: no command-line form for {hints[name]!r}"
            )
        parser.add_argument(flag, **kwargs)


def config_from_args(
    parser: argparse.ArgumentParser, config_cls: type[C], args: argparse.Namespace, **overrides: Any
) -> C:
    """Build ``config_cls`` from every one of its fields found in ``args``.

    Fields not in ``args`` keep their dataclass default; ``overrides`` replace values.
    A ``ValueError`` raised by the dataclass's validation becomes ``parser.error`` (usage
    message, exit status 2).
    """
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(config_cls)  # type: ignore[arg-type]
        if f.init and hasattr(args, f.name)
    }
    values.update(overrides)
    try:
        return config_cls(**values)
    except ValueError as exc:
        parser.error(str(exc))


def add_recording_arguments(
    parser: argparse.ArgumentParser,
    config_cls: type,
    *,
    options: Mapping[str, Option] | None = None,
) -> None:
    """Add the options of a recorded training run to ``parser``.

    ``--out DIR`` (required), then one option per field of ``config_cls``
    (:func:`add_config_arguments`), then ``--overwrite``.
    """
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    add_config_arguments(parser, config_cls, options=options)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace checkpoints already in --out"
    )


def run_recording_cli(
    parser: argparse.ArgumentParser,
    config_cls: type[C],
    train_and_record: Callable[..., dict[str, Any]],
    argv: Sequence[str] | None = None,
    *,
    options: Mapping[str, Option] | None = None,
    epoch_seconds: bool = False,
    sizes_unit: str | None = None,
) -> int:
    """Run the command line of a recording workflow; return the exit status (0).

    Adds :func:`add_recording_arguments` to ``parser``, parses ``argv`` (default:
    ``sys.argv[1:]``), builds ``config_cls`` and calls ``train_and_record(out, config,
    on_epoch=..., overwrite=...)``, printing one line per recorded epoch and a summary
    (``run.json``'s ``model_class``, ``n_params``, checkpoints, wall time and final test
    metrics). Checkpoints already in ``--out`` without ``--overwrite`` are a
    ``parser.error`` (exit status 2).

    Parameters
    ----------
    epoch_seconds : bool, default False
        Show on each epoch line the seconds since the previous line.
    sizes_unit : str, optional
        Show in the summary ``n_train`` and ``n_test`` of this unit (``"texts"``).
    """
    add_recording_arguments(parser, config_cls, options=options)
    args = parser.parse_args(argv)
    config = config_from_args(parser, config_cls, args)

    last = [time.perf_counter()]

    def log(rec: dict[str, Any]) -> None:
        now = time.perf_counter()
        timing = f"({now - last[0]:.1f} s) " if epoch_seconds else ""
        print(
            f"epoch {rec['epoch']:4d}  train_loss {rec['train_loss']:.4f}  "
            f"test_loss {rec['test_loss']:.4f}  test_acc {rec['test_accuracy']:.4f}  "
            f"{timing}-> {rec['checkpoint']}",
            flush=True,
        )
        last[0] = now

    t0 = time.perf_counter()
    try:
        result = train_and_record(args.out, config, on_epoch=log, overwrite=args.overwrite)
    except FileExistsError as exc:
        parser.error(str(exc))
    elapsed = time.perf_counter() - t0
    final = result["epochs"][-1] if result["epochs"] else None
    sizes = (
        f", {result['n_train']} train / {result['n_test']} test {sizes_unit}"
        if sizes_unit is not None
        else ""
    )
    summary = (
        f"done: {result['model_class']} ({result['n_params']} params{sizes}), "
        f"{len(result['checkpoints'])} checkpoints in {args.out}, {elapsed:.2f} s"
    )
    if final is not None:
        summary += (
            f", final test_acc {final['test_accuracy']:.4f} test_loss {final['test_loss']:.4f}"
        )
    print(summary, flush=True)
    return 0


class _Main(Protocol):
    """A command-line entry point ``main(argv=None) -> exit status``."""

    def __call__(self, argv: Sequence[str] | None = ...) -> int: ...


_MAIN_DOC = """Command-line entry point: ``{prog} --out DIR [options]``.

Parameters
----------
argv : sequence of str, optional
    Arguments (default: ``sys.argv[1:]``).

Returns
-------
int
    Exit status, 0 on success.
"""


def recording_main(
    *,
    prog: str,
    description: str,
    config_cls: type[C],
    train_and_record: Callable[..., dict[str, Any]],
    module: str,
    options: Mapping[str, Option] | None = None,
    epoch_seconds: bool = False,
    sizes_unit: str | None = None,
) -> _Main:
    """A recording workflow's command-line entry point ``main(argv=None)``.

    Parameters
    ----------
    prog : str
        The program's name in the usage (``"python -m workflows.digits"``).
    description : str
        The program's description in ``--help``.
    config_cls, train_and_record
        As for :func:`run_recording_cli`.
    module : str
        The ``__name__`` of the module that defines ``main``.
    options, epoch_seconds, sizes_unit
        As for :func:`run_recording_cli`.

    Returns
    -------
    callable
        ``main(argv=None) -> int``: a new ``argparse.ArgumentParser(prog=prog,
        description=description)`` handed to :func:`run_recording_cli` with ``argv``, with
        a full docstring.
    """

    def main(argv: Sequence[str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=description)
        return run_recording_cli(
            parser,
            config_cls,
            train_and_record,
            argv,
            options=options,
            epoch_seconds=epoch_seconds,
            sizes_unit=sizes_unit,
        )

    main.__module__ = module
    main.__qualname__ = main.__name__
    main.__doc__ = _MAIN_DOC.format(prog=prog)
    return main

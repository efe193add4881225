"""The documentation: README.md, docs/ and mkdocs.yml.

- the site builds with ``mkdocs build --strict`` (broken links and anchors, docstrings
  mkdocstrings cannot parse: every warning fails), with every CLI command and every public
  name in it;
- every fenced ``python`` block runs: page by page, in a fresh temporary folder, the blocks of
  a page in order in one namespace; a block preceded by ``<!-- not run: WHY -->`` is a pattern,
  not an example, and is left out;
- every ``cmd-pipeline`` command line shown names a real subcommand and real options;
- every relative link resolves, every repository path mentioned exists, and nothing refers to
  one machine's files;
- README.md stays a front door: short, and starting with ``make demo`` and ``make test``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

import pipeline
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
#: the pages whose Python examples run: the README and the documentation
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
#: every document: its links, paths and command lines are checked
DOCUMENTS = [*PAGES, ROOT / "docker" / "README.md", ROOT / "notebooks" / "README.md"]
README_MAX_LINES = 250

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
NOT_RUN = "<!-- not run:"
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")
#: a path inside the repository: it starts with one of its top-level folders
REPO_PATH = re.compile(
    r"(?<![\w/.~:-])((?:\.ci|benchmarks|docker|docs|notebooks|pipeline|tests|workflows)"
    r"/[\w./*<>-]*)"
)
#: the project's own documents are named in capitals (README.md, LICENSE, ...)
DOC_NAME = re.compile(r"(?<![\w/.-])([A-Z][A-Z_]+\.md|LICENSE)\b")
#: wording that only holds on one machine, and paths outside the repository
ONE_MACHINE = ("/work/", "../shared", "this machine", "these machines", "this VM", "device tool")


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _blocks(text: str, *langs: str) -> Iterator[tuple[int, str, bool]]:
    """(line number, code, runnable) of the fenced blocks in ``langs``."""
    for m in FENCE.finditer(text):
        if m.group(1) not in langs:
            continue
        before = text[: m.start()].rstrip().splitlines()
        runnable = not (before and before[-1].lstrip().startswith(NOT_RUN))
        yield text.count("\n", 0, m.start()) + 2, m.group(2), runnable


def _prose(text: str) -> str:
    """The text without its fenced blocks (commands in them are checked separately)."""
    return FENCE.sub("", text)


# -- the site ---------------------------------------------------------------------------------


def test_site_builds_strictly_with_every_command_and_public_name(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    config = ["--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)]
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", *config],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    cli = (site / "cli" / "index.html").read_text(encoding="utf-8")
    assert isinstance(main, click.Group)
    for name in main.commands:
        assert f"cmd-pipeline {name}" in cli, f"CLI reference lacks {name}"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    missing = [
        n for n in pipeline.__all__ if n != "__version__" and f'id="pipeline.{n}"' not in api
    ]
    assert not missing, f"API reference (docs/api.md) lacks {missing}"
    # nothing fetched when the page is viewed: no web fonts, no CDN
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "fonts.googleapis.com" not in index and "fonts.gstatic.com" not in index


# -- the Python examples ----------------------------------------------------------------------


def _pages_with_examples() -> list[Path]:
    return [p for p in PAGES if any(r for _, _, r in _blocks(p.read_text("utf-8"), "python"))]


@pytest.mark.parametrize("page", _pages_with_examples(), ids=_rel)
def test_python_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = page.read_text(encoding="utf-8")
    blocks = [(line, code) for line, code, runnable in _blocks(text, "python") if runnable]
    if "import torch" in text and importlib.util.find_spec("torch") is None:
        pytest.skip("the page's examples need torch")
    monkeypatch.chdir(tmp_path)
    # the examples show the API, not the kernel: the numpy kernel spares them the fused
    # kernel's first compilation (about 10 s; tests/unit/test_cmd_numba.py covers that kernel)
    monkeypatch.setenv("CMD_PIPELINE_FIT_KERNEL", "numpy")
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for line, code in blocks:
        # the page and line in tracebacks point at the block
        exec(compile(code, f"{_rel(page)}:{line}", "exec"), namespace)


# -- command lines ----------------------------------------------------------------------------


def _command_lines(text: str) -> Iterator[str]:
    for _, code, _ in _blocks(text, "bash", "sh", "console"):
        yield from code.replace("\\\n", " ").splitlines()
    for m in INLINE_CODE.finditer(_prose(text)):
        if re.match(r"(\S*/)?cmd-pipeline ", m.group(1)):
            yield m.group(1)


def _cmd_pipeline_calls(line: str) -> Iterator[list[str]]:
    """The argument lists given to ``cmd-pipeline`` on a shell line."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in a usage line: split on spaces
        tokens = line.split()
    segment: list[str] = []
    for tok in [*tokens, ";"]:
        if tok in {";", "&&", "||", "|"}:
            starts = [i for i, t in enumerate(segment) if t.rsplit("/", 1)[-1] == "cmd-pipeline"]
            if starts:
                yield segment[starts[0] + 1 :]
            segment = []
        else:
            segment.append(tok)


def _options(command: click.Command) -> set[str]:
    ctx = click.Context(command)
    names = set(command.get_help_option_names(ctx))
    for param in command.params:
        names.update(param.opts)
        names.update(param.secondary_opts)
    return names


@pytest.mark.parametrize("page", DOCUMENTS, ids=_rel)
def test_command_lines_name_real_commands_and_options(page: Path) -> None:
    bad = []
    for line in _command_lines(page.read_text(encoding="utf-8")):
        for args in _cmd_pipeline_calls(line):
            args = [a.strip("()[]") for a in args]
            group_opts = _options(main)
            while args and args[0] in group_opts:
                args = args[1:]
            if not args or not re.fullmatch(r"[a-z]+", args[0]):
                continue  # `cmd-pipeline --help`, `cmd-pipeline COMMAND`
            command = main.commands.get(args[0])
            if command is None:
                bad.append(f"{line!r}: no command {args[0]!r}")
                continue
            known = _options(command)
            for arg in args[1:]:
                opt = arg.split("=", 1)[0]
                if re.fullmatch(r"--?[a-zA-Z][\w-]*", opt) and opt not in known:
                    bad.append(f"{line!r}: {args[0]} has no option {opt}")
    assert not bad, "\n".join(bad)


# -- links and paths --------------------------------------------------------------------------


def _exists(path: str) -> bool:
    path = path.rstrip(".,;:")
    # placeholders (NAME, DIR, <name>) stand for any name
    pattern = re.sub(r"<[^>/]*>|\b[A-Z][A-Z_]+\b(?=[./]|$)", "*", path)
    if "*" in pattern:
        return any(ROOT.glob(pattern.rstrip("/")))
    return (ROOT / path).exists()


@pytest.mark.parametrize("page", DOCUMENTS, ids=_rel)
def test_links_and_paths_exist(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    bad = []
    for target in LINK.findall(_prose(text)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).resolve().exists():
            bad.append(f"link {target}")
    for path in REPO_PATH.findall(text):
        if not _exists(path):
            bad.append(f"path {path}")
    for name in DOC_NAME.findall(text):
        if not (ROOT / name).exists() and not any(ROOT.glob(f"[!.]*/{name}")):
            bad.append(f"document {name}")
    for words in ONE_MACHINE:
        if words in text:
            bad.append(f"wording tied to one machine: {words!r}")
    assert not bad, f"{_rel(page)}:\n" + "\n".join(bad)


# -- the README -------------------------------------------------------------------------------


def test_readme_is_a_short_front_door_starting_with_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    first = FENCE.search(text)
    assert first is not None
    assert text.count("\n", 0, first.start()) < 5, "the two commands come first"
    assert first.group(2).split() == ["make", "demo", "make", "test"]

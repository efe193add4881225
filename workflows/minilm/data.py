"""The docstring-topic data set of the MiniLM workflow.

Owns the labelled texts (first paragraphs of standard-library docstrings, see
:data:`TOPICS`), their deterministic capping and stratified train/test split, and their
tokenisation into an :class:`EncodedSplit`.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from workflows.minilm.pretrained import model_path, transformers_offline

if TYPE_CHECKING:
    from workflows.minilm.config import TrainConfig

__all__ = [
    "CLASS_NAMES",
    "MIN_DOC_CHARS",
    "N_CLASSES",
    "TOPICS",
    "EncodedSplit",
    "collect_docstrings",
    "encode_texts",
    "load_docstring_split",
    "prepare_data",
]

#: Topic name -> standard-library modules whose docstrings carry that label. The
#: pseudo-modules ``"str"`` and ``"bytes"`` stand for the built-in types.
TOPICS: dict[str, tuple[str, ...]] = {
    "files": (
        "os",
        "io",
        "os.path",
        "shutil",
        "pathlib",
        "glob",
        "tempfile",
        "filecmp",
        "fnmatch",
        "stat",
        "fileinput",
    ),
    "text": (
        "string",
        "textwrap",
        "difflib",
        "re",
        "unicodedata",
        "str",
        "bytes",
        "shlex",
        "html",
        "html.parser",
        "codecs",
        "locale",
        "gettext",
    ),
    "math": ("math", "cmath", "statistics", "fractions", "decimal", "random", "numbers"),
    "network": (
        "socket",
        "ssl",
        "http.client",
        "http.server",
        "http.cookies",
        "http.cookiejar",
        "urllib.request",
        "urllib.parse",
        "email.message",
        "email.utils",
        "email.headerregistry",
        "email.parser",
        "smtplib",
        "ftplib",
        "imaplib",
        "poplib",
        "ipaddress",
    ),
    "concurrency": (
        "threading",
        "multiprocessing",
        "multiprocessing.pool",
        "multiprocessing.managers",
        "asyncio",
        "concurrent.futures",
        "queue",
        "sched",
        "subprocess",
        "selectors",
    ),
    "formats": (
        "json",
        "csv",
        "pickle",
        "xml.etree.ElementTree",
        "xml.dom.minidom",
        "configparser",
        "zipfile",
        "tarfile",
        "gzip",
        "bz2",
        "lzma",
        "base64",
        "binascii",
        "plistlib",
    ),
}
#: Topic names in label order (label ``i`` is ``CLASS_NAMES[i]``).
CLASS_NAMES: tuple[str, ...] = tuple(TOPICS)
#: Number of classes.
N_CLASSES = len(CLASS_NAMES)
#: Shortest docstring paragraph (in characters, after whitespace normalisation) kept.
MIN_DOC_CHARS = 20
#: C modules whose objects count as defined in the listed module (besides ``_name``).
_MODULE_ALIASES = {"os": ("posix", "nt")}
_BUILTIN_TYPES: dict[str, type] = {"str": str, "bytes": bytes}
_SIGNATURE_RE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$", re.DOTALL)
_PARAGRAPH_RE = re.compile(r"\n\s*\n")


def _first_paragraph(doc: object) -> str | None:
    """First whitespace-normalised paragraph of ``doc`` that is not a bare signature."""
    if not isinstance(doc, str):
        return None
    for paragraph in _PARAGRAPH_RE.split(doc.strip()):
        text = " ".join(paragraph.split())
        if text and not _SIGNATURE_RE.match(text):
            return text
    return None


def _defined_in(obj: object, module_name: str) -> bool:
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str):
        return False
    return (
        owner == module_name
        or owner.startswith(module_name + ".")
        or owner.lstrip("_") == module_name.lstrip("_")
        or owner in _MODULE_ALIASES.get(module_name, ())
    )


def _module_docstrings(module_name: str) -> list[str]:
    """Raw docstrings of the public classes, functions and methods of one module."""
    if module_name in _BUILTIN_TYPES:
        members: list[tuple[str, Any]] = [(module_name, _BUILTIN_TYPES[module_name])]
    else:
        module = importlib.import_module(module_name)
        members = [
            (name, obj)
            for name, obj in sorted(vars(module).items())
            if (inspect.isclass(obj) or inspect.isroutine(obj))
            and _defined_in(obj, module.__name__)
        ]
    docs: list[str] = []
    for name, obj in members:
        if name.startswith("_"):
            continue
        docs.append(obj.__doc__)
        if inspect.isclass(obj):
            # Only attributes defined by the class itself (no inherited docstrings).
            for attr_name, attr in sorted(vars(obj).items()):
                if attr_name.startswith("_"):
                    continue
                func = getattr(attr, "__func__", attr)  # classmethod / staticmethod
                if inspect.isroutine(func) or isinstance(attr, property):
                    docs.append(func.__doc__)
    return docs


def collect_docstrings() -> dict[str, list[str]]:
    """Collect the labelled docstring texts of :data:`TOPICS`, before any capping.

    Returns
    -------
    dict of str to list of str
        Topic name -> sorted, deduplicated first paragraphs (whitespace-normalised,
        at least :data:`MIN_DOC_CHARS` characters). Texts that occur under more than
        one topic are removed from all of them.
    """
    per_topic: dict[str, set[str]] = {}
    for topic, modules in TOPICS.items():
        texts: set[str] = set()
        for module_name in modules:
            for doc in _module_docstrings(module_name):
                text = _first_paragraph(doc)
                if text is not None and len(text) >= MIN_DOC_CHARS:
                    texts.add(text)
        per_topic[topic] = texts
    seen: dict[str, int] = {}
    for texts in per_topic.values():
        for text in texts:
            seen[text] = seen.get(text, 0) + 1
    return {topic: sorted(t for t in texts if seen[t] == 1) for topic, texts in per_topic.items()}


def _stable_order(texts: Sequence[str]) -> list[str]:
    """Texts ordered by their SHA-256 (deterministic, seed-free, unrelated to content)."""
    return sorted(texts, key=lambda t: (hashlib.sha256(t.encode("utf-8")).hexdigest(), t))


def load_docstring_split(
    seed: int,
    test_fraction: float = 0.25,
    max_per_class: int | None = 300,
    limit: int | None = None,
) -> tuple[list[str], Tensor, list[str], Tensor]:
    """Build the docstring-topic data set and split it into train and test sets.

    Parameters
    ----------
    seed : int
        Random state of the stratified split and of the order within each set.
    test_fraction : float, default 0.25
        Fraction of every class that goes to the test set, in ``(0, 1)``.
    max_per_class : int or None, default 300
        Keep at most this many texts per class (those with the smallest SHA-256, so the
        choice does not depend on ``seed``); ``None`` keeps everything.
    limit : int or None, default None
        Cap on the total number of texts (train + test) before the split, taken
        round-robin over the classes so that they stay balanced; meant for quick tests.

    Returns
    -------
    texts_train : list of str
    y_train : Tensor
        ``(n_train,)`` int64 labels, indices into :data:`CLASS_NAMES`.
    texts_test : list of str
    y_test : Tensor
        ``(n_test,)`` int64 labels.

    Notes
    -----
    Every class contributes ``max(1, round(test_fraction * n_c))`` texts to the test
    set and at least one to the training set. For a given interpreter the result
    depends only on the arguments.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if max_per_class is not None and max_per_class < 2:
        raise ValueError(f"max_per_class must be >= 2 or None, got {max_per_class}")
    if limit is not None and limit < 2 * N_CLASSES:
        raise ValueError(f"limit must be >= {2 * N_CLASSES} or None, got {limit}")

    per_class = [_stable_order(texts) for texts in collect_docstrings().values()]
    if max_per_class is not None:
        per_class = [texts[:max_per_class] for texts in per_class]
    if limit is not None:
        taken = [0] * N_CLASSES
        total = 0
        while total < limit and any(taken[c] < len(per_class[c]) for c in range(N_CLASSES)):
            for c in range(N_CLASSES):
                if total < limit and taken[c] < len(per_class[c]):
                    taken[c] += 1
                    total += 1
        per_class = [texts[:n] for texts, n in zip(per_class, taken, strict=True)]

    rng = np.random.default_rng(seed)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for label, texts in enumerate(per_class):
        if len(texts) < 2:
            raise ValueError(f"class {CLASS_NAMES[label]!r} has fewer than 2 texts")
        order = rng.permutation(len(texts))
        n_test = min(len(texts) - 1, max(1, round(test_fraction * len(texts))))
        test.extend((texts[i], label) for i in order[:n_test])
        train.extend((texts[i], label) for i in order[n_test:])
    train = [train[i] for i in rng.permutation(len(train))]
    test = [test[i] for i in rng.permutation(len(test))]
    return (
        [t for t, _ in train],
        torch.tensor([y for _, y in train], dtype=torch.int64),
        [t for t, _ in test],
        torch.tensor([y for _, y in test], dtype=torch.int64),
    )


@dataclass(frozen=True)
class EncodedSplit:
    """Tokenised texts and their labels.

    Attributes
    ----------
    input_ids : Tensor
        ``(n, length)`` int64 token ids, right-padded with the pad id.
    attention_mask : Tensor
        ``(n, length)`` int64, 1 for real tokens and 0 for padding.
    labels : Tensor
        ``(n,)`` int64 class labels.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: Tensor | slice) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(input_ids, attention_mask, labels)`` of the rows ``idx``.

        The columns are trimmed to the longest sequence in the batch (padding beyond
        it is masked out anyway, so this only saves compute).
        """
        mask = self.attention_mask[idx]
        width = max(1, int(mask.sum(dim=1).max()))
        return self.input_ids[idx][:, :width], mask[:, :width], self.labels[idx]


def encode_texts(texts: Sequence[str], labels: Tensor, max_length: int) -> EncodedSplit:
    """Tokenise ``texts`` with the MiniLM (uncased WordPiece) tokenizer.

    Parameters
    ----------
    texts : sequence of str
    labels : Tensor
        ``(len(texts),)`` int64 labels.
    max_length : int
        Sequences (``[CLS] ... [SEP]`` included) are truncated to this many tokens.

    Returns
    -------
    EncodedSplit
        Padded to the longest sequence of the set (at most ``max_length``).
    """
    tokenizer = transformers_offline().AutoTokenizer.from_pretrained(
        str(model_path()), local_files_only=True
    )
    enc = tokenizer(
        list(texts),
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return EncodedSplit(
        input_ids=enc["input_ids"].to(torch.int64).contiguous(),
        attention_mask=enc["attention_mask"].to(torch.int64).contiguous(),
        labels=labels.to(torch.int64),
    )


def prepare_data(config: TrainConfig) -> tuple[EncodedSplit, EncodedSplit]:
    """The tokenised training and test sets of the run described by ``config``."""
    texts_tr, y_tr, texts_te, y_te = load_docstring_split(
        config.seed, max_per_class=config.max_per_class, limit=config.limit
    )
    return (
        encode_texts(texts_tr, y_tr, config.max_length),
        encode_texts(texts_te, y_te, config.max_length),
    )

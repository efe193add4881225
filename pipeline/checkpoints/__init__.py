"""Checkpoints in: finding them (:mod:`.discover`: files, Hugging Face, DeepSpeed and
Distributed Checkpoint folders), choosing their tensors (:mod:`.select`) and reading them
range by range (:mod:`.readers`, with :mod:`.distcp` and :mod:`.torchzip`: the only modules
that read checkpoint files), and what identifies a file's bytes (:mod:`.content`: zip
members, CRC checks, content digests).

Importing this package does not import torch: the readers import it when a PyTorch file
(.pt, .pth, .bin, .ckpt) is opened, and it is an optional extra (``cmd-pipeline[torch]``).
Distributed Checkpoint folders are read without it. (Writing checkpoints is
:mod:`pipeline.ops.export`'s; the training-loop hooks of :mod:`pipeline.online` use torch too.)
"""

"""Checkpoints in: finding them (:mod:`.discover`), choosing their tensors (:mod:`.select`) and
reading them range by range (:mod:`.readers`, the only module that reads checkpoint files).

Importing this package does not import torch: the readers import it when a ``.pt`` file is
opened. (Writing checkpoints is :mod:`pipeline.ops.export`'s; the training-loop hooks of
:mod:`pipeline.online` use torch too.)
"""

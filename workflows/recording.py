"""What every recorded training workflow shares: deterministic torch, checkpoint files, and
preparing an output folder without mixing two runs."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

__all__ = [
    "CHECKPOINT_SUFFIX",
    "checkpoint_path",
    "deterministic_torch",
    "prepare_out_dir",
    "save_checkpoint",
    "write_run_json",
]

#: checkpoint format -> file suffix
CHECKPOINT_SUFFIX = {"pt": ".pt", "safetensors": ".safetensors"}


@contextlib.contextmanager
def deterministic_torch() -> Iterator[None]:
    """Enable ``torch.use_deterministic_algorithms`` and restore the previous setting."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)


def checkpoint_path(out_dir: Path, epoch: int, fmt: str) -> Path:
    return out_dir / f"epoch_{epoch:04d}{CHECKPOINT_SUFFIX[fmt]}"


def save_checkpoint(model: nn.Module, path: Path, fmt: str) -> None:
    """The model's full ``state_dict`` as ``.pt`` or ``.safetensors``."""
    state = model.state_dict()
    if fmt == "pt":
        torch.save(state, path)
    else:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))


def prepare_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Create ``out_dir``; refuse (or, with ``overwrite``, delete) checkpoints already there,
    since a shorter run would otherwise leave a mixed trajectory behind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(p for suffix in CHECKPOINT_SUFFIX.values() for p in out.glob(f"epoch_*{suffix}"))
    if stale:
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds {len(stale)} checkpoint file(s) such as "
                f"{stale[0].name}; pass overwrite=True to replace them"
            )
        for path in stale:
            path.unlink()
    return out


def write_run_json(
    out: Path,
    workflow: str,
    config: Any,
    model: nn.Module,
    n_train: int,
    n_test: int,
    checkpoints: list[str],
    records: list[dict[str, Any]],
    *,
    evaluator: str | None = None,
) -> dict[str, Any]:
    """Write and return ``run.json``: what ``cmd-pipeline evaluate`` and the studies read.

    ``evaluator`` is the ``module:function`` that ``cmd-pipeline evaluate`` calls with the run
    folder to score state_dicts; default: ``workflows.<workflow>:evaluator``.
    """
    result: dict[str, Any] = {
        "workflow": workflow,
        "evaluator": evaluator or f"{__package__}.{workflow}:evaluator",
        "config": asdict(config),
        "model_class": type(model).__name__,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_train": n_train,
        "n_test": n_test,
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "checkpoints": checkpoints,
        "epochs": records,
    }
    (out / "run.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result

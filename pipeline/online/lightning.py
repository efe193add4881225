"""The Lightning hook of Online CMD (:func:`lightning_callback`); Lightning is imported on call."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.online.memory import OnlineCMD

__all__ = ["lightning_callback"]


def lightning_callback(cmd: OnlineCMD) -> Any:
    """A Lightning ``Callback`` that calls ``cmd.update(pl_module)`` at the end of every
    training epoch (``lightning`` or ``pytorch_lightning`` must be installed)."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as e:
            raise ImportError("lightning_callback needs lightning (pip install lightning)") from e

    class OnlineCMDCallback(Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            cmd.update(pl_module)

    return OnlineCMDCallback()

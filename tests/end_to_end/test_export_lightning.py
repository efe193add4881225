"""``export --out X.ckpt --like Y.ckpt``: a Lightning checkpoint written by a real
``pl.Trainer``, with its state_dict values replaced by an epoch of the store (prefix kept)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import SYNC, raw_bits
from safetensors.torch import save_file
from torch import nn

import pipeline
from pipeline.cli import main
from pipeline.errors import InputError

pl = pytest.importorskip("pytorch_lightning")

PREFIX = "model."


class Tiny(pl.LightningModule):
    """Linear, BatchNorm (float statistics and the int64 num_batches_tracked), Linear."""

    def __init__(self, hidden: int = 6) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(
            nn.Linear(3, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 2)
        )

    def training_step(self, batch: Any, _index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class SavePerEpoch(pl.Callback):
    """The module's weights, prefix stripped, as ``epoch_E.safetensors`` (0: before training)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _save(self, module: pl.LightningModule, epoch: int) -> None:
        sd = {k.removeprefix(PREFIX): v.detach().clone() for k, v in module.state_dict().items()}
        save_file(sd, str(self.root / f"epoch_{epoch:04d}.safetensors"))

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._save(module, 0)

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._save(module, trainer.current_epoch + 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Four epochs of Tiny (0-3) in a store with a study; the Trainer's last.ckpt."""
    root = tmp_path_factory.mktemp("lightning")
    run = root / "run"
    run.mkdir()
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3), torch.randint(0, 2, (32,)))
    trainer = pl.Trainer(
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        callbacks=[SavePerEpoch(run)],
        default_root_dir=str(root),
    )
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=8))
    ckpt = root / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    store = root / "s.zarr"
    pipeline.ingest([str(run)], str(store), runtime=SYNC)
    pipeline.fit(str(store), "m", modes=2, samples=20, runtime=SYNC)
    return {"root": root, "ckpt": ckpt, "store": store}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(raw_bits(a), raw_bits(b))


def test_stored_epoch_as_lightning_checkpoint(trained: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "e1.ckpt"
    assert pipeline.export(trained["store"], 1, out, like=trained["ckpt"]) == out
    like = torch.load(trained["ckpt"], weights_only=True)
    got = torch.load(out, weights_only=True)
    assert list(got) == list(like)
    for key in like:  # everything but the weights is the like checkpoint's
        if key != "state_dict":
            assert repr(got[key]) == repr(like[key]), key
    want = pipeline.state_dict(trained["store"], 1)
    assert list(got["state_dict"]) == list(like["state_dict"])  # names and order of like
    assert set(got["state_dict"]) == {PREFIX + k for k in want}
    for k, w in want.items():
        assert _same(got["state_dict"][PREFIX + k], w), k
    # epoch 1, not the last epoch the like checkpoint holds
    assert int(got["state_dict"]["model.1.num_batches_tracked"]) == 4
    assert int(like["state_dict"]["model.1.num_batches_tracked"]) == 12

    module = Tiny.load_from_checkpoint(out, weights_only=True)
    assert module.hparams["hidden"] == 6
    for k, v in module.state_dict().items():
        assert _same(v, want[k.removeprefix(PREFIX)]), k
    Tiny().load_state_dict(got["state_dict"], strict=True)


def test_reconstruction_through_the_cli(trained: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cmd.ckpt"
    result = CliRunner().invoke(
        main,
        [
            "export",
            "--store",
            str(trained["store"]),
            "--epoch",
            "2",
            "--analysis",
            "m",
            "--out",
            str(out),
            "--like",
            str(trained["ckpt"]),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "with the prefix 'model.'" in result.output
    got = torch.load(out, weights_only=True)["state_dict"]
    cmd = pipeline.state_dict(trained["store"], 2, analysis="m")
    gd = pipeline.state_dict(trained["store"], 2)
    assert all(_same(got[PREFIX + k], v) for k, v in cmd.items())
    assert any(not torch.equal(cmd[k], gd[k]) for k in cmd)
    Tiny.load_from_checkpoint(out, weights_only=True)


def test_names_kept_left_out_and_refused(trained: dict[str, Any], tmp_path: Path) -> None:
    store = trained["store"]
    like = torch.load(trained["ckpt"], weights_only=True)
    extra = tmp_path / "extra.ckpt"
    like["state_dict"]["model.extra"] = torch.arange(3)
    torch.save(like, extra)
    from pipeline.ops.export_like import export_ckpt

    res = export_ckpt(store, 3, tmp_path / "x.ckpt", like=extra)
    assert res.match.from_like == ("model.extra",) and not res.match.left_out
    assert torch.equal(
        torch.load(tmp_path / "x.ckpt")["state_dict"]["model.extra"], torch.arange(3)
    )
    with pytest.raises(
        InputError,
        match=r"strict=True and the tensors differ .* 1 tensor.* not record \('model.extra'\)",
    ):
        export_ckpt(store, 3, tmp_path / "y.ckpt", like=extra, strict=True)

    wrong = tmp_path / "wrong.ckpt"
    torch.save({"state_dict": {"model.0.weight": torch.zeros(9, 9)}}, wrong)
    with pytest.raises(InputError, match=r"'0.weight' has shape \[6, 3\] in the store"):
        export_ckpt(store, 3, tmp_path / "y.ckpt", like=wrong)
    no_sd = tmp_path / "no_sd.ckpt"
    torch.save({"epoch": 3}, no_sd)
    with pytest.raises(InputError, match="holds no 'state_dict'"):
        export_ckpt(store, 3, tmp_path / "y.ckpt", like=no_sd)
    not_zip = tmp_path / "w.ckpt"
    not_zip.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a zip-format PyTorch checkpoint"):
        export_ckpt(store, 3, tmp_path / "y.ckpt", like=not_zip)
    with pytest.raises(InputError, match="give that checkpoint with like=CKPT"):
        pipeline.export(store, 3, tmp_path / "y.ckpt")
    assert not list(tmp_path.glob("y.ckpt*"))

    cli = CliRunner()
    no_like = cli.invoke(
        main, ["export", "--store", str(store), "--epoch", "3", "--out", str(tmp_path / "y.ckpt")]
    )
    assert no_like.exit_code == 2 and "--out X.ckpt needs --like CKPT" in no_like.output
    bad = cli.invoke(
        main,
        [
            "export",
            "--store",
            str(store),
            "--epoch",
            "3",
            "--out",
            str(tmp_path / "y.ckpt"),
            "--like",
            str(wrong),
        ],
    )
    assert bad.exit_code == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "has shape" in lines[0]

"""Every checkpoint layout a training stack writes, ingested with the usual guarantees.

The files are written by the library that writes them in training: Lightning's Trainer
(``.ckpt``), transformers' ``save_pretrained`` (Hugging Face checkpoint folders, single and
sharded safetensors), huggingface_hub's ``save_torch_state_dict`` (``pytorch_model.bin``, alone
and sharded with its index: what transformers 4.x wrote; transformers 5 writes safetensors
only) and ``torch.distributed.checkpoint.save``. DeepSpeed does not install here: its folders
are written in its documented layout (``global_stepN/mp_rank_00_model_states.pt`` holding
``{"module": state_dict, ...}``, ``latest``, ZeRO-3's ``zero_pp_rank_*`` files).

Every stored value is compared bit for bit with what the library wrote (read back with
torch/safetensors, not with the pipeline's readers).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import SYNC, as_float32, read_trajectory, snapshot
from torch import nn

import pipeline
from pipeline.checkpoints.discover import discover
from pipeline.cli import main
from pipeline.ops.info import format_info
from pipeline.store.schema import IngestSettings
from pipeline.store.trajectory import TrajectoryStore


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _steps(model: nn.Module, n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n`` state dicts of ``model`` after deterministic "training" steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(n):
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.add_(torch.randn(t.shape, generator=g).to(t.dtype))
                else:
                    t.add_(1)
            out.append({k: v.clone() for k, v in model.state_dict().items()})
    return out


def _assert_holds(store: Path, sds: list[Mapping[str, torch.Tensor]], epochs: list[int]) -> None:
    """The store's tensors are the state dicts' (same names, shapes, dtypes), every stored
    value bit for bit, and the integer buffers verbatim."""
    meta = TrajectoryStore.open(store).require_meta()
    assert meta.epoch_numbers == epochs
    assert sorted(t.name for t in meta.tensors) == sorted(sds[0])
    traj = read_trajectory(store)
    for t in meta.tensors:
        assert (t.shape, t.dtype) == (tuple(sds[0][t.name].shape), str(sds[0][t.name].dtype)[6:])
        for j, sd in enumerate(sds):
            if t.stored:
                got = traj[t.offset : t.offset + t.size, j]
                assert np.array_equal(got.view(np.uint32), as_float32(sd[t.name]).view(np.uint32))
            else:
                inline = {i.name: i for i in meta.epochs[j].inline}[t.name]
                assert inline.to_bytes() == sd[t.name].contiguous().numpy().tobytes()


def _cli(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stderr.strip() if r.exit_code else r.output


def _assert_export(store: Path, epoch: int, out: Path, want: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import load_file

    pipeline.export(store, epoch, out)
    got = load_file(str(out))
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and torch.equal(got[k], w), k


# --------------------------------------------------------------------------- Lightning
def test_lightning_ckpt_with_strip_prefix(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = _model()

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _i: int) -> torch.Tensor:
            return nn.functional.mse_loss(self.model(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 2))
    ckpts = tmp_path / "ckpts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice (workers, logging) is not the point
        trainer = pl.Trainer(
            max_epochs=3,
            callbacks=[pl.callbacks.ModelCheckpoint(ckpts, save_top_k=-1, save_last=True)],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            default_root_dir=tmp_path,
        )
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == [
        "epoch=0-step=2.ckpt",
        "epoch=1-step=4.ckpt",
        "epoch=2-step=6.ckpt",
        "last.ckpt",
    ]
    sds = [
        {
            k.removeprefix("model."): v
            for k, v in torch.load(ckpts / n, weights_only=True)["state_dict"].items()
        }
        for n in names[:3]
    ]
    store = tmp_path / "s.zarr"
    # last.ckpt may repeat the last epoch: refused, with the way out
    code, err = _cli("ingest", ckpts, "--store", store, "--sync", "--no-progress")
    assert code == 2 and "'last'" in err and f"'{ckpts}/epoch=*-step=*.ckpt'" in err, err
    code, out = _cli(
        "ingest",
        f"{ckpts}/epoch=*-step=*.ckpt",
        "--store",
        store,
        "--sync",
        "--no-progress",
        "--strip-prefix",
        "model.",
    )
    assert code == 0, out
    _assert_holds(store, sds, [0, 1, 2])
    assert set(sds[0]) == set(_model().state_dict())  # loads into the bare model
    meta = TrajectoryStore.open(store).require_meta()
    assert meta.settings.strip_prefix == "model."
    assert "strip_prefix='model.'" in format_info(pipeline.info(store))
    # a re-run takes the store's prefix; another prefix is a changed setting
    assert pipeline.ingest([ckpts / names[2]], store, runtime=SYNC).already_present == [2]
    with pytest.raises(pipeline.ConfigMismatchError, match=r"strip_prefix: stored 'model\.'"):
        pipeline.ingest([ckpts / names[2]], store, strip_prefix="net.", runtime=SYNC)
    # export reads the tensors the trajectory leaves out from the .ckpt, by their new names
    kept = tmp_path / "kept.zarr"
    pipeline.ingest(
        [ckpts / n for n in names[:3]], kept, strip_prefix="model.", exclude=["2.*"], runtime=SYNC
    )
    _assert_export(kept, 1, tmp_path / "e1.safetensors", sds[1])
    # a prefix no name has is refused, naming the file
    with pytest.raises(
        pipeline.InputError, match=r"no tensor name starts with the prefix 'net\.'"
    ) as e:
        pipeline.ingest([ckpts / names[0]], tmp_path / "t.zarr", strip_prefix="net.", runtime=SYNC)
    assert e.value.path == str(ckpts / names[0])


def test_stores_without_strip_prefix_open_and_append(tmp_path: Path) -> None:
    """Stores written before the setting existed have no such key: none, and appends work."""
    from safetensors.torch import save_file

    sds = _steps(_model(), 3)
    root = tmp_path / "run"
    root.mkdir()
    for e, sd in enumerate(sds):
        save_file(sd, str(root / f"epoch_{e}.safetensors"))
    store = tmp_path / "s.zarr"
    pipeline.ingest([root / "epoch_0.safetensors"], store, runtime=SYNC)
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]["cmd_pipeline"]
    assert "strip_prefix" not in attrs["settings"]  # as a store of the previous release
    assert IngestSettings.from_dict(attrs["settings"]).strip_prefix is None
    res = pipeline.ingest([root], store, strip_prefix="", runtime=SYNC)  # "": none, as stored
    assert res.added == [1, 2]
    _assert_holds(store, sds, [0, 1, 2])
    s = IngestSettings(strip_prefix="module.")
    assert IngestSettings.from_dict(s.to_dict()) == s


# --------------------------------------------------------------------------- Hugging Face
def _trainer_files(d: Path) -> None:
    """The training state Trainer saves beside a checkpoint's model (never a model)."""
    torch.save({"state": {}, "param_groups": []}, d / "optimizer.pt")
    torch.save({"last_epoch": 1}, d / "scheduler.pt")
    torch.save({"python": 1}, d / "rng_state.pth")
    torch.save({"output_dir": str(d)}, d / "training_args.bin")
    (d / "trainer_state.json").write_text("{}")


def test_hf_trainer_output_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """checkpoint-N/ folders (one model.safetensors, or shards with their index) and the
    final model saved at the top of the output folder: the checkpoints are ingested."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    cfg = transformers.BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=8,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    out = tmp_path / "out"
    steps = [2, 4, 6]
    sds = []
    g = torch.Generator().manual_seed(0)
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        d = out / f"checkpoint-{step}"
        model.save_pretrained(d, max_shard_size="2KB" if step == 4 else "50GB")
        _trainer_files(d)
        sds.append({k: v.clone() for k, v in model.state_dict().items()})
    model.save_pretrained(out)  # trainer.save_model(): the final model at the top
    torch.save({"output_dir": str(out)}, out / "training_args.bin")
    assert (out / "checkpoint-4" / "model.safetensors.index.json").is_file()
    assert (out / "model.safetensors").is_file()
    # what the files hold, read with safetensors itself
    written = []
    for step in steps:
        d = out / f"checkpoint-{step}"
        files = sorted(d.glob("*.safetensors"))
        written.append({k: v for f in files for k, v in load_file(str(f)).items()})
    assert [sorted(w) for w in written] == [sorted(written[0])] * 3
    store = tmp_path / "s.zarr"
    with caplog.at_level(logging.INFO, logger="pipeline.checkpoints"):
        res = pipeline.ingest([out], store, runtime=SYNC)
    assert res.added == steps
    assert "not the final model saved beside them (model.safetensors)" in caplog.text
    _assert_holds(store, written, steps)
    meta = TrajectoryStore.open(store).require_meta()
    assert Path(meta.epochs[1].files[0].path).name == "model.safetensors.index.json"


def test_hf_bin_single_and_sharded(tmp_path: Path) -> None:
    """pytorch_model.bin, alone and sharded with pytorch_model.bin.index.json."""
    hub = pytest.importorskip("huggingface_hub")
    sds = _steps(_model(), 2)
    out = tmp_path / "out"
    for step, sd, shard in ((100, sds[0], "50GB"), (200, sds[1], 100)):
        d = out / f"checkpoint-{step}"
        d.mkdir(parents=True)
        hub.save_torch_state_dict(sd, d, safe_serialization=False, max_shard_size=shard)
        _trainer_files(d)
    assert sorted(p.name for p in (out / "checkpoint-100").glob("*.bin")) == [
        "pytorch_model.bin",
        "training_args.bin",
    ]
    assert (out / "checkpoint-200" / "pytorch_model.bin.index.json").is_file()
    written = [
        {
            k: v
            for f in sorted((out / f"checkpoint-{s}").glob("pytorch_model*.bin"))
            for k, v in torch.load(f, weights_only=True).items()
        }
        for s in (100, 200)
    ]
    store = tmp_path / "s.zarr"
    assert pipeline.ingest([out], store, runtime=SYNC).added == [100, 200]
    _assert_holds(store, written, [100, 200])
    # the index file given directly is its folder's checkpoint
    assert pipeline.ingest(
        [out / "checkpoint-200" / "pytorch_model.bin.index.json"], store, runtime=SYNC
    ).already_present == [200]


# --------------------------------------------------------------------------- DeepSpeed
def _deepspeed_save(
    save_dir: Path, step: int, sd: Mapping[str, torch.Tensor], zero3: bool = False
) -> None:
    """What ``engine.save_checkpoint(save_dir)`` writes (DeepSpeed's documented layout)."""
    tag = save_dir / f"global_step{step}"
    tag.mkdir(parents=True)
    state = {
        "module": None if zero3 else dict(sd),
        "buffer_names": [k for k in sd if "running" in k or "num_batches" in k],
        "optimizer": None,
        "param_shapes": [{k: v.shape for k, v in sd.items()}],
        "frozen_param_shapes": None,
        "shared_params": {},
        "frozen_param_fragments": None,
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": step,
        "global_samples": 8 * step,
        "dp_world_size": 1,
        "mp_world_size": 1,
        "ds_config": {"train_batch_size": 8, "bf16": {"enabled": True}},
        "ds_version": "0.16.4",
    }
    optim = {"optimizer_state_dict": {"zero_stage": 3 if zero3 else 2}, "ds_version": "0.16.4"}
    if zero3:
        torch.save(state, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        torch.save(optim, tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    else:
        torch.save(state, tag / "mp_rank_00_model_states.pt")
        torch.save(optim, tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (save_dir / "latest").write_text(f"global_step{step}")
    (save_dir / "zero_to_fp32.py").write_text("# DeepSpeed's recovery script\n")


def test_deepspeed_folders_and_zero3_refusal(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sds = _steps(_model().to(torch.bfloat16), 2)
    save_dir = tmp_path / "ds"
    for step, sd in zip((10, 20), sds, strict=True):
        _deepspeed_save(save_dir, step, sd)
    store = tmp_path / "s.zarr"
    assert pipeline.ingest([save_dir], store, runtime=SYNC).added == [10, 20]
    _assert_holds(store, sds, [10, 20])
    meta = TrajectoryStore.open(store).require_meta()
    assert meta.store_dtype == "bfloat16"
    assert Path(meta.epochs[0].files[0].path).name == "mp_rank_00_model_states.pt"
    # Lightning's DeepSpeed strategy: a .ckpt folder whose `latest` names its one tag
    lit = tmp_path / "lit" / "epoch=4-step=50.ckpt"
    _deepspeed_save(lit, 50, sds[1])
    (lit / "global_step50").rename(lit / "checkpoint")
    (lit / "latest").write_text("checkpoint")
    specs = discover([tmp_path / "lit"])
    assert [(s.epoch, s.format) for s in specs] == [(4, "deepspeed")]

    # ZeRO-3: the weights are partitioned; refused before anything is read or written
    z3 = tmp_path / "ds3"
    _deepspeed_save(z3, 30, sds[1], zero3=True)
    before = snapshot(store)
    with pytest.raises(pipeline.InputError, match=r"ZeRO-3.*zero_to_fp32") as err:
        pipeline.ingest([z3], store, runtime=SYNC)
    assert err.value.path == str(z3 / "global_step30")
    code, msg = _cli("ingest", z3 / "global_step30", "--store", store, "--sync", "--no-progress")
    assert code == 2 and msg.count("\n") == 0 and "zero_to_fp32" in msg, msg
    assert snapshot(store) == before
    # a Hugging Face checkpoint trained with ZeRO-3 holds the gathered model too: that is read
    hf = tmp_path / "hf" / "checkpoint-7"
    _deepspeed_save(hf, 7, sds[1], zero3=True)
    save_file(sds[1], str(hf / "model.safetensors"))
    assert [(s.epoch, s.format) for s in discover([hf])] == [(7, "safetensors")]


# --------------------------------------------------------------------------- DCP
def _split_planner(split: Mapping[str, int]) -> object:
    """A DefaultSavePlanner that saves the named tensors as two chunks along a dim, as ranks
    of an FSDP/TP job each save their shard (here in one process)."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    class Split(DefaultSavePlanner):
        def create_local_plan(self):  # type: ignore[no-untyped-def]
            plan = super().create_local_plan()
            items = []
            for wi in plan.items:
                dim = split.get(wi.index.fqn)
                if dim is None:
                    items.append(wi)
                    continue
                size = wi.tensor_data.size
                cut = size[dim] // 2
                for lo, hi in ((0, cut), (cut, size[dim])):
                    offs, sizes = [0] * len(size), list(size)
                    offs[dim], sizes[dim] = lo, hi - lo
                    chunk = ChunkStorageMetadata(torch.Size(offs), torch.Size(sizes))
                    data = TensorWriteData(chunk, wi.tensor_data.properties, size)
                    items.append(
                        WriteItem(
                            MetadataIndex(wi.index.fqn, chunk.offsets),
                            WriteItemType.SHARD,
                            tensor_data=data,
                        )
                    )
            self.plan = dataclasses.replace(plan, items=items)
            return self.plan

        def resolve_data(self, wi):  # type: ignore[no-untyped-def]
            dim = split.get(wi.index.fqn)
            if dim is None:
                return super().resolve_data(wi)
            c = wi.tensor_data.chunk
            return self.state_dict[wi.index.fqn].narrow(dim, c.offsets[dim], c.sizes[dim])

    return Split()


def test_distributed_checkpoint_folders(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    model = _model()
    sds = _steps(model, 3)
    for sd in sds:
        sd["1.weight"] = sd["1.weight"].to(torch.bfloat16)
        sd["0.weight"] = sd["0.weight"].t().contiguous().t()  # saved with transposed strides
    run = tmp_path / "run"
    for e, sd in enumerate(sds):
        state = {"model": sd, "optimizer": {"lr": torch.tensor(0.1)}, "step": 10 * e}
        planner = _split_planner({"model.2.weight": 1, "model.0.weight": 0}) if e else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            dcp.save(state, checkpoint_id=run / f"step-{10 * e}", planner=planner)
    # sharded as ranks save them: dim 0 and dim 1 chunks (and strides of a transpose)
    layout = FileSystemReader(run / "step-10").read_metadata().state_dict_metadata
    assert [
        len(layout[k].chunks) for k in ("model.0.weight", "model.2.weight", "model.0.bias")
    ] == [2, 2, 1]
    # what the library reads back
    back = []
    for e, sd in enumerate(sds):
        target = {"model": {k: torch.empty_like(v) for k, v in sd.items()}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(target, checkpoint_id=run / f"step-{10 * e}")
        back.append(target["model"])
        assert all(torch.equal(back[e][k], sd[k]) for k in sd)
    store = tmp_path / "s.zarr"
    res = pipeline.ingest([run], store, runtime=SYNC, chunk_rows=7, time_chunk=1)
    assert res.added == [0, 10, 20]
    _assert_holds(store, back, [0, 10, 20])  # the model's names: no "model." nor optimizer
    again = pipeline.ingest([run], store, runtime=SYNC)
    assert again.added == [] and again.already_present == [0, 10, 20]
    kept = tmp_path / "kept.zarr"  # left out of the trajectory: export reads the folder
    pipeline.ingest([run], kept, exclude=["0.*", "2.weight"], runtime=SYNC)
    _assert_export(kept, 10, tmp_path / "e10.safetensors", back[1])

    # a flipped bit in a tensor's bytes: the CRC check names the .distcp file; no change
    bad = run / "step-30"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": sds[2]}, checkpoint_id=bad)
    part = bad / "__0_0.distcp"
    raw = bytearray(part.read_bytes())
    at = raw.find(sds[2]["2.weight"].numpy().tobytes())  # the stored bytes of a tensor
    assert at > 0
    raw[at + 5] ^= 0x01
    part.write_bytes(bytes(raw))
    before = snapshot(store)
    with pytest.raises(pipeline.InputError, match="fails its CRC check") as err:
        pipeline.ingest([run], store, runtime=SYNC)
    assert err.value.path == str(part) and err.value.epoch == 30, err.value
    assert snapshot(store) == before
    # the folder given by its .metadata is the same checkpoint
    assert discover([run / "step-10" / ".metadata"])[0].epoch == 10


def test_a_folder_without_checkpoints_lists_the_layouts(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "notes.txt").write_text("")
    store = tmp_path / "s.zarr"
    code, msg = _cli("ingest", d, "--store", store, "--sync", "--no-progress")
    assert code == 2 and msg.count("\n") == 0 and str(d) in msg, msg
    for layout in (
        ".ckpt",
        "pytorch_model.bin",
        "index.json",
        "mp_rank_00_model_states.pt",
        ".distcp",
    ):
        assert layout in msg, layout
    assert not store.exists() or not (store / "trajectory").exists()


class _Pwned:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        import os

        return (os.system, (f"echo pwned > {self.marker}",))


def test_distributed_checkpoint_metadata_runs_no_code(tmp_path: Path) -> None:
    """``.metadata`` is a pickle that torch loads unrestricted: here only the checkpoint's own
    classes are read, as inert records."""
    import pickle

    import torch.distributed.checkpoint as dcp

    ckpt = tmp_path / "run" / "step-1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3)}, checkpoint_id=ckpt)
    marker = tmp_path / "PWNED"
    (ckpt / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": _Pwned(marker)}))
    store = tmp_path / "s.zarr"
    with pytest.raises(pipeline.InputError, match=r"refused.*global posix\.system") as err:
        pipeline.ingest([ckpt], store, runtime=SYNC)
    assert err.value.path == str(ckpt / ".metadata") and err.value.epoch == 1
    assert not marker.exists()
    assert not (store / "trajectory").exists()


def test_real_trainer_output_folder(tmp_path: Path) -> None:
    """The output folder of a real ``transformers.Trainer`` run (checkpoint-N/ with the
    model, optimizer, scheduler, RNG and trainer state, the final model saved at the top by
    ``save_model``): the checkpoints are ingested, bit for bit, and nothing else."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    cfg = transformers.BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=8, max_position_embeddings=8, num_labels=2,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, 20, (6,), generator=g), "labels": int(k % 2)}
        for k in range(8)
    ]
    out = tmp_path / "out"
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4,
        learning_rate=0.1, report_to=[], use_cpu=True, logging_strategy="no",
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(str(out))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "checkpoint-2" / "optimizer.pt").is_file()  # the real Trainer's extra files
    written = [load_file(str(out / f"checkpoint-{s}" / "model.safetensors")) for s in (2, 4)]
    store = tmp_path / "s.zarr"
    res = pipeline.ingest([out], store, runtime=SYNC)
    assert res.added == [2, 4]
    _assert_holds(store, written, [2, 4])
    paths = [f.path for e in TrajectoryStore.open(store).require_meta().epochs for f in e.files]
    assert [Path(p).name for p in paths] == ["model.safetensors"] * 2

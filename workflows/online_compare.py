"""Online CMD and Embedded CMD against SGD, EMA and SWA on the same runs, over seeds.

For each seed of a digits workflow (CNN or MLP, SGD with momentum, the same data split,
initialisation and batch order for every method):

- **run A** trains with plain SGD. Three models are evaluated on the test set after every
  epoch of that one trajectory: the SGD weights, the **Online CMD** weights
  (:class:`pipeline.online.OnlineCMD`, warm-up F epochs), and an **EMA** of the weights
  (``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``, updated every step).
  None of them changes the training, so they are compared on exactly the same run.
- **run B** is **SWA** (``AveragedModel`` + ``SWALR``): identical to run A until ``swa_start``,
  then the SWA learning-rate schedule and one average per epoch.
- **run C** is **Embedded CMD** (:class:`pipeline.online.EmbeddedCMD`): after the warm-up,
  every L epochs the P% of the remaining parameters whose fit moved least stop being trained
  and follow ``a r(t) + b``; the live model is evaluated.

Also measured: the time of ``OnlineCMD.update`` against the epoch's training time, and the
memory of Online CMD's state against keeping every epoch's checkpoint.

Writes ``OUT/results.json`` (per seed, per method, per epoch) and ``OUT/table.md`` (final and
best test accuracy, mean ± std over seeds)::

    python -m workflows.online_compare --model cnn --epochs 100 --seeds 0,1,2 --out runs/online_cnn
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn

from pipeline.online import EmbeddedCMD, OnlineCMD
from workflows.cli_args import Option, add_config_arguments, config_from_args
from workflows.digits import TrainConfig, build_model, evaluate, load_digits_split, random_shift

METHODS = ("sgd", "online_cmd", "ema", "swa", "embedded_cmd")


def _setup(cfg: TrainConfig) -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator, torch.Generator]:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    return model, opt, torch.Generator().manual_seed(cfg.seed), torch.Generator().manual_seed(cfg.seed + 1_000_003)


def _epoch(model, opt, x, y, cfg, shuffle, augment, after_step=None) -> float:
    model.train()
    order = torch.randperm(len(x), generator=shuffle)
    total = 0.0
    for s in range(0, len(x), cfg.batch_size):
        idx = order[s : s + cfg.batch_size]
        xb = random_shift(x[idx], augment) if cfg.augment else x[idx]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), y[idx])
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
        total += loss.item() * len(idx)
    return total / len(x)


def _acc(model: nn.Module, x, y) -> tuple[float, float]:
    return evaluate(model, x, y)


def run_a(cfg: TrainConfig, cmd_args: dict[str, Any], ema_decay: float) -> dict[str, Any]:
    """SGD, Online CMD and EMA on one trajectory."""
    x, y, xt, yt = load_digits_split(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        model, opt, shuffle, augment = _setup(cfg)
        cmd = OnlineCMD(model, **cmd_args)
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
        probe = build_model(cfg)
        out: dict[str, list[dict[str, float]]] = {"sgd": [], "online_cmd": [], "ema": []}
        t_train = t_update = 0.0
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            _epoch(model, opt, x, y, cfg, shuffle, augment, lambda: ema.update_parameters(model))
            t1 = time.perf_counter()
            cmd.update(model)
            t2 = time.perf_counter()
            t_train += t1 - t0
            t_update += t2 - t1
            loss, acc = _acc(model, xt, yt)
            out["sgd"].append({"epoch": epoch, "loss": loss, "accuracy": acc})
            probe.load_state_dict(cmd.current_state_dict(), strict=True)
            loss, acc = _acc(probe, xt, yt)
            out["online_cmd"].append({"epoch": epoch, "loss": loss, "accuracy": acc})
            loss, acc = _acc(ema.module, xt, yt)
            out["ema"].append({"epoch": epoch, "loss": loss, "accuracy": acc})
        n = cmd.n_params
        return {
            "curves": out,
            "n_params": n,
            "online_cmd": {
                "n_modes": cmd.n_modes,
                "update_seconds_per_epoch": t_update / cfg.epochs,
                "train_seconds_per_epoch": t_train / cfg.epochs,
                "overhead_fraction": t_update / t_train,
                "state_bytes": cmd.memory_bytes(),
                "checkpoints_bytes": 4 * n * (cfg.epochs + 1),
                "warmup_history_bytes": 4 * n * cmd.warmup,
            },
        }


def run_swa(cfg: TrainConfig, swa_start: int, swa_lr: float) -> list[dict[str, float]]:
    x, y, xt, yt = load_digits_split(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        model, opt, shuffle, augment = _setup(cfg)
        swa = AveragedModel(model)
        sched = SWALR(opt, swa_lr=swa_lr, anneal_epochs=5)
        curve = []
        for epoch in range(1, cfg.epochs + 1):
            _epoch(model, opt, x, y, cfg, shuffle, augment)
            if epoch >= swa_start:
                swa.update_parameters(model)
                sched.step()
                evaluated = swa.module
            else:
                evaluated = model
            loss, acc = _acc(evaluated, xt, yt)
            curve.append({"epoch": epoch, "loss": loss, "accuracy": acc})
        return curve


def run_embedded(cfg: TrainConfig, cmd_args: dict[str, Any], every: int, fraction: float) -> list[dict[str, float]]:
    x, y, xt, yt = load_digits_split(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        model, opt, shuffle, augment = _setup(cfg)
        cmd = EmbeddedCMD(model, opt, embed_every=every, embed_fraction=fraction, **cmd_args)
        curve = []
        for epoch in range(1, cfg.epochs + 1):
            _epoch(model, opt, x, y, cfg, shuffle, augment)
            cmd.update(model)
            loss, acc = _acc(model, xt, yt)
            curve.append({"epoch": epoch, "loss": loss, "accuracy": acc, "embedded": cmd.fraction_embedded})
        return curve


def _ms(v: list[float]) -> str:
    m = statistics.fmean(v)
    s = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{m:.4f} ± {s:.4f}"


def table(results: dict[str, Any]) -> str:
    seeds = results["seeds"]
    lines = [
        f"digits {results['config']['model']}, {results['config']['epochs']} epochs, "
        f"seeds {[s['seed'] for s in seeds]} (mean ± std); Online/Embedded CMD: warm-up "
        f"{results['cmd']['warmup']}, M={results['cmd']['modes']}, K={results['cmd']['samples']}",
        "",
        "| method | final test accuracy | best test accuracy |",
        "|---|---|---|",
    ]
    names = {"sgd": "SGD (baseline)", "online_cmd": "Online CMD", "ema": "EMA",
             "swa": "SWA", "embedded_cmd": "Embedded CMD"}
    for m in METHODS:
        finals = [s["curves"][m][-1]["accuracy"] for s in seeds]
        bests = [max(r["accuracy"] for r in s["curves"][m]) for s in seeds]
        lines.append(f"| {names[m]} | {_ms(finals)} | {_ms(bests)} |")
    emb = [s["curves"]["embedded_cmd"][-1]["embedded"] for s in seeds]
    oc = [s["online_cmd"] for s in seeds]
    lines += [
        "",
        f"Embedded CMD: {statistics.fmean(emb):.1%} of the parameters embedded at the end.",
        f"Online CMD: update {statistics.fmean(o['update_seconds_per_epoch'] for o in oc) * 1e3:.2f} ms "
        f"per epoch = {statistics.fmean(o['overhead_fraction'] for o in oc):.2%} of the epoch's "
        f"training time; state {oc[0]['state_bytes']:,} bytes against "
        f"{oc[0]['checkpoints_bytes']:,} bytes of checkpoints for every epoch "
        f"(warm-up history {oc[0]['warmup_history_bytes']:,} bytes, freed after the warm-up).",
    ]
    return "\n".join(lines)


#: The digits :class:`TrainConfig` fields on this command line differ from the workflow's
#: defaults in the number of epochs only.
TRAIN_OPTIONS: dict[str, Option] = {"epochs": Option(default=100)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workflows.online_compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap, TrainConfig, options=TRAIN_OPTIONS, only=("model", "epochs"))
    ap.add_argument("--seeds", default="0,1,2")
    add_config_arguments(ap, TrainConfig, only=("augment", "lr", "batch_size"))
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--ema-decay", type=float, default=0.99, help="per step")
    ap.add_argument("--swa-start", type=float, default=0.75, help="fraction of the epochs")
    ap.add_argument("--swa-lr", type=float, default=0.01)
    ap.add_argument("--embed-every", type=int, default=10)
    ap.add_argument("--embed-fraction", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=Path("runs/online_compare"))
    a = ap.parse_args(argv)
    cmd_args = {"warmup": a.warmup, "modes": a.modes, "samples": a.samples, "seed": 0}
    seeds_out = []
    t0 = time.perf_counter()
    for seed in [int(s) for s in a.seeds.split(",")]:
        cfg = config_from_args(ap, TrainConfig, a, seed=seed)
        res = run_a(cfg, cmd_args, a.ema_decay)
        res["curves"]["swa"] = run_swa(cfg, max(1, round(a.swa_start * a.epochs)), a.swa_lr)
        res["curves"]["embedded_cmd"] = run_embedded(cfg, cmd_args, a.embed_every, a.embed_fraction)
        res["seed"] = seed
        seeds_out.append(res)
        c = res["curves"]
        print(f"seed {seed}: " + "  ".join(f"{m} {c[m][-1]['accuracy']:.4f}" for m in METHODS), flush=True)
    results = {
        "config": {"model": a.model, "epochs": a.epochs, "augment": a.augment, "lr": a.lr,
                   "batch_size": a.batch_size, "ema_decay": a.ema_decay, "swa_start": a.swa_start,
                   "swa_lr": a.swa_lr, "embed_every": a.embed_every, "embed_fraction": a.embed_fraction},
        "cmd": cmd_args,
        "seeds": seeds_out,
        "seconds": time.perf_counter() - t0,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = table(results)
    (a.out / "table.md").write_text(text + "\n")
    print()
    print(text)
    print(f"\n({results['seconds']:.0f} s; {a.out / 'results.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

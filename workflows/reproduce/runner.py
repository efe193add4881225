"""The measurements behind the claims: training, the pipeline per seed, and a cache.

Owns what is run, in which order, and what is kept of it:

1. **training** (before any cluster starts, one thread): every recorded MNIST-1D run the
   selected claims need, over the training seeds, by :func:`workflows.study.record_seed`
   (a run already recorded with the same configuration is reused);
2. **online and federated** (pure torch): claims 7-8 (:mod:`.online`) and 9
   (:mod:`.federated`) per training seed;
3. **the pipeline** on one runtime (a LocalCluster by default): per recorded run,
   ``pipeline.ingest``, ``pipeline.fit`` and ``pipeline.evaluate`` with the run's own
   evaluator (``workflows.mnist1d:evaluator``), in *parts*: ``base`` (the study M, K over
   every sampling seed, every epoch; the modes' layers), ``modes`` (claim 2's sweep over M),
   ``samples`` (claim 3's sweep over K), ``history`` (claim 4's windows) and ``dmd`` (claim
   5: DMD reconstructions scored by the same evaluator).

Every part of every seed is written to ``OUT/cache/<unit>.json`` with the parameters it was
made with, and reused when they match: an interrupted run resumes, and the report can be
rendered again without computing anything.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from workflows.reproduce.settings import Settings

__all__ = ["Cache", "measure", "posthoc_part"]

Log = Callable[[str], None]

#: The post-hoc parts each claim needs, on which recorded runs.
PARTS: dict[int, list[tuple[str, str]]] = {
    1: [("cnn", "base")],
    2: [("cnn", "base"), ("cnn", "modes")],
    3: [("cnn", "base"), ("cnn", "samples")],
    4: [("cnn", "base"), ("cnn", "history")],
    5: [
        ("cnn", "base"),
        ("cnn", "dmd"),
        ("cnn_augment", "base"),
        ("cnn_augment", "dmd"),
        ("resnet", "base"),
        ("resnet", "dmd"),
    ],
    6: [("cnn", "base")],
}
#: The part order (base first: the other parts reuse its study).
PART_ORDER = ("base", "modes", "samples", "history", "dmd")
BASE = "base"


class Cache:
    """JSON files ``root/<unit>.json`` holding ``{"params", "data"}``; a unit is recomputed
    when its parameters differ."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, unit: str, params: dict[str, Any]) -> Any | None:
        path = self.root / f"{unit}.json"
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return saved["data"] if saved.get("params") == _plain(params) else None

    def put(self, unit: str, params: dict[str, Any], data: Any) -> None:
        path = self.root / f"{unit}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"params": _plain(params), "data": data}) + "\n", encoding="utf-8"
        )
        tmp.replace(path)

    def run(self, unit: str, params: dict[str, Any], fn: Callable[[], Any]) -> tuple[Any, bool]:
        """The cached data, or ``fn()`` (then cached); and whether it was cached."""
        data = self.get(unit, params)
        if data is not None:
            return data, True
        data = fn()
        self.put(unit, params, data)
        return data, False


def _plain(obj: Any) -> Any:
    """``obj`` as JSON gives it back (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj))


def _key(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_plain(params), sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- pipeline parts
def _quiet(rt: Any) -> Any:
    """The runner's options without the progress bar (``evaluate`` draws its bar from the
    ``runtime`` options even when it is given a runner)."""
    from dataclasses import replace

    return replace(rt.options, progress=False)


def _sweep_by_seed(ev: dict[str, Any], key: str) -> dict[str, dict[str, float]]:
    """``{str(value of key): {str(sampling seed): CMD accuracy at the last sweep epoch}}``."""
    out: dict[str, dict[str, float]] = {}
    for r in ev["sweep"]["runs"]:
        out.setdefault(str(r[key]), {})[str(r["seed"])] = float(r["results"][-1]["cmd_accuracy"])
    return out


def _part_base(store: Path, s: Settings, rt: Any) -> dict[str, Any]:
    import pipeline

    seeds = list(s.sampling_seeds)
    fitted = pipeline.fit(
        store, BASE, modes=s.modes, samples=s.samples, seed=seeds[0], force=True, run=rt
    )
    ev = pipeline.evaluate(
        store,
        BASE,
        sweep_modes=[s.modes],
        sweep_seeds=seeds,
        sweep_samples=[s.samples],
        sweep_epochs="all",
        run=rt,
        runtime=_quiet(rt),
        figures=False,  # only the numbers: the reproduction draws its own
    ).evaluation
    by_seed = {
        str(r["seed"]): [float(x["cmd_accuracy"]) for x in r["results"]]
        for r in ev["sweep"]["runs"]
    }
    data = pipeline.load_study_data(store, BASE)
    return {
        "epochs": [int(r["epoch"]) for r in ev["epochs"]],
        "gd": [float(r["gd_accuracy"]) for r in ev["epochs"]],
        "cmd": [float(r["cmd_accuracy"]) for r in ev["epochs"]],
        "cmd_by_seed": by_seed,
        "n_modes": int(fitted.n_modes),
        "n_samples": int(fitted.n_samples),
        "relative_error": ev.get("relative_error"),
        "layers": list(data.layer_names),
        "layer_mode_counts": np.asarray(data.layer_mode_counts).tolist(),
    }


def _part_modes(store: Path, s: Settings, rt: Any) -> dict[str, Any]:
    import pipeline

    ev = pipeline.evaluate(
        store,
        BASE,
        sweep_modes=list(s.sweep_modes),
        sweep_seeds=list(s.sampling_seeds),
        sweep_samples=[s.samples],
        run=rt,
        runtime=_quiet(rt),
        figures=False,  # only the numbers: the reproduction draws its own
    ).evaluation
    found: dict[str, list[int]] = {}
    for r in ev["sweep"]["runs"]:
        found.setdefault(str(r["modes_requested"]), []).append(int(r["n_modes"]))
    return {"by_modes": _sweep_by_seed(ev, "modes_requested"), "n_modes_found": found}


def _part_samples(store: Path, s: Settings, rt: Any) -> dict[str, Any]:
    import pipeline

    ev = pipeline.evaluate(
        store,
        BASE,
        sweep_modes=[s.modes],
        sweep_seeds=list(s.sampling_seeds),
        sweep_samples=list(s.sweep_samples),
        run=rt,
        runtime=_quiet(rt),
        figures=False,  # only the numbers: the reproduction draws its own
    ).evaluation
    return {"by_samples": _sweep_by_seed(ev, "samples")}


def _part_history(store: Path, s: Settings, rt: Any) -> dict[str, Any]:
    import pipeline

    out: dict[str, Any] = {}
    for frac in s.history[1:]:
        start = s.history_start(frac)
        name = f"history{round(frac * 100)}"
        pipeline.fit(
            store,
            name,
            modes=s.modes,
            samples=s.samples,
            seed=s.sampling_seeds[0],
            epochs=f"{start}:",
            force=True,
            run=rt,
        )
        ev = pipeline.evaluate(
            store,
            name,
            sweep_modes=[s.modes],
            sweep_seeds=list(s.sampling_seeds),
            sweep_samples=[s.samples],
            run=rt,
            runtime=_quiet(rt),
            figures=False,  # only the numbers: the reproduction draws its own
        ).evaluation
        out[str(frac)] = {
            "start": start,
            "final_epoch": int(ev["final"]["epoch"]),
            "acc": _sweep_by_seed(ev, "modes_requested")[str(s.modes)],
        }
    return {"by_history": out}


def _part_dmd(store: Path, run_dir: Path, s: Settings) -> dict[str, Any]:
    import torch

    import pipeline
    from workflows.mnist1d import evaluator
    from workflows.reproduce.dmd import full_dmd, node_dmd, node_groups

    st = pipeline.open_store(str(store))
    meta = st.require_meta()
    tensors = [(t.name, t.offset, tuple(t.shape)) for t in meta.stored_tensors()]
    w = np.asarray(pipeline.trajectory_dask(st).compute(), dtype=np.float64)
    epochs = [int(e) for e in meta.epoch_numbers]
    score = evaluator(run_dir)
    template = pipeline.state_dict(st, epochs[0])
    nodes = node_groups(tensors)

    def accuracies(rec: np.ndarray) -> list[float]:
        accs = []
        for col in range(rec.shape[1]):
            sd = dict(template)
            for name, offset, shape in tensors:
                size = int(np.prod(shape)) if shape else 1
                values = rec[offset : offset + size, col].astype(np.float32).reshape(shape)
                sd[name] = torch.from_numpy(values)
            accs.append(float(score(sd)[1]))
        return accs

    out: dict[str, Any] = {"epochs": epochs, "full": {}, "node": {}}
    for r in s.dmd_ranks:
        rec, eff = full_dmd(w, r)
        out["full"][str(r)] = {"rank": eff, "acc": accuracies(rec)}
        rec, mean_rank = node_dmd(w, nodes, r)
        out["node"][str(r)] = {"rank": mean_rank, "acc": accuracies(rec)}
    out["nodes"] = int(nodes.max()) + 1
    return out


def posthoc_part(
    part: str, store: Path, run_dir: Path, settings: Settings, rt: Any
) -> dict[str, Any]:
    """One part (see the module docstring) of one recorded run's store."""
    if part == "base":
        return _part_base(store, settings, rt)
    if part == "modes":
        return _part_modes(store, settings, rt)
    if part == "samples":
        return _part_samples(store, settings, rt)
    if part == "history":
        return _part_history(store, settings, rt)
    if part == "dmd":
        return _part_dmd(store, run_dir, settings)
    raise ValueError(f"unknown part {part!r}")


#: The settings each part depends on (besides the training run).
_PART_FIELDS: dict[str, tuple[str, ...]] = {
    "base": ("modes", "samples", "sampling_seeds"),
    "modes": ("modes", "samples", "sampling_seeds", "sweep_modes"),
    "samples": ("modes", "samples", "sampling_seeds", "sweep_samples"),
    "history": ("modes", "samples", "sampling_seeds", "history"),
    "dmd": ("dmd_ranks",),
}


# --------------------------------------------------------------------------- the whole run
def measure(
    settings: Settings,
    out: Path,
    claims: set[int],
    runtime: Any,
    log: Log = print,
) -> dict[str, Any]:
    """Run (or read from the cache) every measurement the ``claims`` need.

    Returns ``{"posthoc": {setting: {part: {seed: data}}}, "online": {seed: data},
    "federated": {seed: data}, "timings": {stage: seconds}, "cached": {stage: units}}``.
    """
    import torch

    from pipeline.runtime import runner
    from workflows.study import record_seed

    torch.set_num_threads(1)
    cache = Cache(out / "cache")
    timings: dict[str, float] = {}
    cached: dict[str, int] = {}
    wanted: list[tuple[str, str]] = []
    for c in sorted(claims):
        for sp in PARTS.get(c, []):
            if sp not in wanted:
                wanted.append(sp)
    wanted.sort(key=lambda sp: (sp[0], PART_ORDER.index(sp[1])))
    settings_used = sorted({sp[0] for sp in wanted})

    # 1. training, before any cluster
    t0 = time.perf_counter()
    runs: dict[tuple[str, int], Path] = {}
    for setting in settings_used:
        for seed in settings.seeds:
            train = asdict(settings.train_config(setting, seed))
            train.pop("seed")
            run_dir, _, _ = record_seed(
                {"workflow": "mnist1d", "train": train}, seed, out / "runs" / setting
            )
            runs[setting, seed] = run_dir
    timings["train"] = time.perf_counter() - t0

    result: dict[str, Any] = {"posthoc": {}, "online": {}, "federated": {}}

    # 2. online (claims 7, 8) and federated (claim 9): torch only
    if claims & {7, 8}:
        from workflows.reproduce.online import run_online_seed

        t0 = time.perf_counter()
        for seed in settings.seeds:
            cfg = settings.train_config("cnn", seed)
            args = {
                "warmup": settings.warmup,
                "modes": settings.modes,
                "samples": settings.samples,
                "embed_every": settings.embed_every,
                "embed_fraction": settings.embed_fraction,
                "ema_decay": settings.ema_decay,
                "swa_start": settings.swa_start,
            }
            params = {"train": asdict(cfg), **args}

            def go(cfg: Any = cfg, args: dict[str, Any] = args, seed: int = seed) -> Any:
                log(f"  online: seed {seed} (runs A, B, C)")
                return run_online_seed(cfg, **args)

            data, hit = cache.run(f"online-seed{seed}", params, go)
            cached["online"] = cached.get("online", 0) + hit
            result["online"][str(seed)] = data
        timings["online"] = time.perf_counter() - t0
    if 9 in claims:
        from workflows.reproduce.federated import fed_config, run_federated_seed

        t0 = time.perf_counter()
        config = fed_config(settings.fed)
        for seed in settings.seeds:
            cfg = settings.train_config("cnn", seed)
            params = {"train": asdict(cfg), "fed": asdict(config)}

            def go_fed(cfg: Any = cfg, seed: int = seed) -> Any:
                log(f"  federated: seed {seed} (FedAvg, FedAvg + Embedded CMD)")
                return run_federated_seed(config, cfg)

            data, hit = cache.run(f"federated-seed{seed}", params, go_fed)
            cached["federated"] = cached.get("federated", 0) + hit
            result["federated"][str(seed)] = data
        timings["federated"] = time.perf_counter() - t0

    # 3. the pipeline, on one runtime started only if a part is not cached
    if wanted:
        t0 = time.perf_counter()
        with _LazyRunner(runner, runtime) as rt:
            for setting, part in wanted:
                by_seed = result["posthoc"].setdefault(setting, {}).setdefault(part, {})
                for seed in settings.seeds:
                    run_dir = runs[setting, seed]
                    run_json = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
                    params = {
                        "run": _key(run_json["config"]),
                        "checkpoints": run_json["checkpoints"],
                        **{f: getattr(settings, f) for f in _PART_FIELDS[part]},
                    }
                    store = run_dir.parent / "store.zarr"

                    def go_part(
                        part: str = part,
                        store: Path = store,
                        run_dir: Path = run_dir,
                        setting: str = setting,
                        seed: int = seed,
                    ) -> Any:
                        import pipeline

                        log(f"  pipeline: {setting} seed {seed}: {part}")
                        r = rt.get()
                        pipeline.ingest([run_dir], store, run=r)
                        return posthoc_part(part, store, run_dir, settings, r)

                    data, hit = cache.run(f"posthoc-{setting}-seed{seed}-{part}", params, go_part)
                    cached["posthoc"] = cached.get("posthoc", 0) + hit
                    by_seed[str(seed)] = data
        timings["pipeline"] = time.perf_counter() - t0
    result["timings"] = timings
    result["cached"] = cached
    return result


class _LazyRunner:
    """A ``pipeline.runner`` started on first use (a fully cached run starts no cluster)."""

    def __init__(self, factory: Callable[[Any], Any], options: Any) -> None:
        self.factory, self.options = factory, options
        self.ctx: Any = None
        self.run: Any = None

    def __enter__(self) -> _LazyRunner:
        return self

    def get(self) -> Any:
        if self.run is None:
            self.ctx = self.factory(self.options)
            self.run = self.ctx.__enter__()
        return self.run

    def __exit__(self, *exc: object) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)

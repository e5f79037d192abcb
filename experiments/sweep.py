"""The sweep runner: every point of a scenario in virtual time, on a process pool or a Dask cluster.

A point is one (configuration, image, seed, method); the method is ``misc`` or a baseline codec. The
work comes in two kinds of task, both pure functions of their arguments (so results do not depend on
the number of workers or the order they finish in):

- prepare: encode one image once per encoder configuration (MISC), or once per (codec, budget) for a
  baseline (whose budget is the MISC file's size, so it waits for that encode), then decode every
  progressive stage once and measure its quality. Stage quality depends only on the pixel levels a
  stage holds, never on the link, so this table serves every point of that encoding.
- simulate: a chunk of points that share one prepared encoding; each runs ``experiments.simulate``
  on a fresh link with the point's seed, reading stage quality from the table.

Results are appended to ``points.jsonl`` (one line per point, flushed as it arrives), so a killed sweep
resumes where it stopped (``resume=True``); ``results.csv``, the CompressAI-style JSON files, the
summary and the figures are then assembled from that file in plan order, deterministically.

Output folder::

    scenario.toml         the scenario as run
    points.jsonl          raw results, one line per point (what --resume reads)
    results.csv           one row per reconstruction event, with every parameter of its point
    compressai/*.json     one file per configuration and method
    summary.json          counts, timings and the per-configuration figures
    learned/*.npz         InceptionV3 features of every stage and reference, when FID/KID are configured
    *.png                 figures (experiments/plots.py)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Imported here, not lazily: a forkserver pool preloads this module, so workers start warm.
import numpy as np

from miscnet.core.config import DecoderConfig
from miscnet.core.container import CODEC_NAMES, from_bytes, to_bytes
from miscnet.core.errors import BudgetError, MiscError
from miscnet.core.image_io import atomic_write_bytes
from miscnet.experiments import (
    jpeg_progressive,  # noqa: F401  (registers the baseline codec: workers decode it)
    learned_metrics,
)
from miscnet.experiments.learned_metrics import IMAGE_METRICS, LearnedMeter, LearnedWeights
from miscnet.experiments.metrics import QUALITY_METRICS, quality_report
from miscnet.experiments.records import first_pixel_events, stage_order
from miscnet.experiments.scenario import CONFIG_KEYS, Configuration, Point, ScenarioError, ScenarioSpec
from miscnet.experiments.simulate import Scenario as SimScenario
from miscnet.experiments.simulate import SimImage, simulate
from miscnet.receiver.classical import ClassicalDecoder
from miscnet.receiver.stages import stage_input

POINTS_FILE = "points.jsonl"
CHUNK_POINTS = 16  # points per simulate task: enough to hide the cost of a task, small enough to balance


# ---------------------------------------------------------------------------------------------- tasks

@dataclass
class Prepared:
    """One encoding, ready to simulate: the .misc bytes and the quality of every stage a receiver can make."""

    key: str
    method: str
    image: str
    width: int
    height: int
    data: bytes
    quality: dict[str, tuple[float | None, ...]]  # "semantic+map+pixel.0" -> QUALITY_METRICS' values, in order
    info: dict[str, Any]
    encode_s: float = 0.0
    decode_s: float = 0.0
    error: str | None = None
    fatal: bool = False  # not a property of the point (missing weights, a bad endpoint): stop the sweep
    # the configured learned metrics (experiments/learned_metrics.py): per stage {lpips, dists, clip_score},
    # and InceptionV3 features per stage and of the reference ("reference") for the set metrics FID/KID
    learned: dict[str, dict[str, float | None]] = field(default_factory=dict)
    features: dict[str, np.ndarray] | None = None


_DECODERS: dict[str, Any] = {}  # per process: a diffusion decoder loads its models once


def _decoder_for(config: DecoderConfig | None) -> Any:
    from miscnet.receiver.decoders import make_decoder

    config = config or DecoderConfig()
    key = "classical" if config.name == "classical" else repr(config)  # the classical decoder has no settings
    if key not in _DECODERS:
        _DECODERS[key] = make_decoder(config)
    return _DECODERS[key]


def stage_key(layers) -> str:
    return "+".join(layers)


def quality_table(encoded, reference: np.ndarray, decoder, metrics: tuple[str, ...] = ("psnr", "ms_ssim"),
                  extra: Callable[[np.ndarray], dict] | None = None, extra_out: dict | None = None
                  ) -> dict[str, tuple[float | None, ...]]:
    """Quality of every stage with pixels that a receiver can make from this encoding.

    Each value is a tuple of ``metrics`` in the order given (experiments/metrics.py quality_report; the
    default, (psnr, ms_ssim), is what the fleet reads; QUALITY_METRICS adds SSIMULACRA2 and FLIP).
    Blocks travel whole: the semantic and map layers together, each pixel level alone, and a pixel level
    counts only after the levels before it. So a stage is (with or without the semantic block) x (the
    first k pixel levels). The classical decoder paints pixels only, so it renders each k once.
    ``extra(image)``, when given, measures each rendered stage once more (the learned metrics); its
    answers go to ``extra_out`` under the same keys.
    """
    pixel = sorted((ly for ly in encoded.layers if ly.WhichOneof("params") == "pixel"), key=lambda ly: ly.level)
    other = [ly for ly in encoded.layers if ly.WhichOneof("params") != "pixel"]
    classical = isinstance(decoder, ClassicalDecoder)
    table: dict[str, tuple[float | None, ...]] = {}
    by_levels: dict[int, tuple[float | None, ...]] = {}
    extra_by_levels: dict[int, dict] = {}
    for k in range(1, len(pixel) + 1):
        for head in ([other, []] if other else [[]]):
            stage = stage_input(encoded.width, encoded.height, [*head, *pixel[:k]])
            key = stage_key(stage.layers)
            if classical and k in by_levels:
                table[key] = by_levels[k]
                if extra is not None:
                    extra_out[key] = dict(extra_by_levels[k])
                continue
            image = decoder.render(stage)
            report = quality_report(reference, image, metrics)
            by_levels[k] = table[key] = tuple(report[m] for m in metrics)
            if extra is not None:
                extra_by_levels[k] = extra_out[key] = extra(image)
    return table


def _pixel_info(encoded) -> dict[str, Any]:
    pixel = [ly for ly in encoded.layers if ly.WhichOneof("params") == "pixel"]
    if not pixel:
        return {"pixel_codec": "none", "pixel_raster": "", "pixel_quality": None}
    p = pixel[-1].pixel
    return {"pixel_codec": CODEC_NAMES.get(pixel[-1].codec, str(pixel[-1].codec)),
            "pixel_raster": f"{p.width}x{p.height}", "pixel_quality": p.quality or None}


def _learned_tables(encoded, image: np.ndarray, decoder, learned: LearnedWeights | None, caption: str
                    ) -> tuple[dict, dict[str, dict], dict[str, np.ndarray] | None]:
    """quality_table with the configured learned metrics: (table, per-stage learned values, features)."""
    if learned is None or not learned.any:
        return quality_table(encoded, image, decoder, QUALITY_METRICS), {}, None
    meter = LearnedMeter(learned)

    def measure(stage_image: np.ndarray) -> dict:
        values: dict[str, Any] = meter.measure(image, stage_image, caption)
        if learned.inception:
            values["inception"] = meter.features(stage_image)
        return values

    extra: dict[str, dict] = {}
    table = quality_table(encoded, image, decoder, QUALITY_METRICS, measure, extra)
    features = None
    if learned.inception:
        features = {key: values.pop("inception") for key, values in extra.items()}
        features["reference"] = meter.features(image)
    return table, extra, features


def _failed(key: str, method: str, name: str, image: np.ndarray, t0: float, exc: MiscError) -> Prepared:
    h, w = image.shape[:2]
    return Prepared(key, method, name, w, h, b"", {}, {}, time.perf_counter() - t0, error=str(exc),
                    fatal=not isinstance(exc, BudgetError))


def prepare_misc(key: str, name: str, image: np.ndarray, semantics, config, decoder: DecoderConfig | None = None,
                 learned: LearnedWeights | None = None) -> Prepared:
    """Encode with MISC's encoder and measure every stage with pixels (``decoder``: the configuration's
    DecoderConfig; None for the classical decoder; ``learned``: the learned metrics to add, CLIP-score
    against the semantic layer's caption)."""
    from miscnet.sender.encoder import encode_image

    h, w = image.shape[:2]
    t0 = time.perf_counter()
    try:
        result = encode_image(image, semantics, config)
        t1 = time.perf_counter()
        table, extra, features = _learned_tables(result.encoded, image, _decoder_for(decoder), learned,
                                                 semantics.caption)
    except MiscError as exc:
        return _failed(key, "misc", name, image, t0, exc)
    t2 = time.perf_counter()
    info = {**_pixel_info(result.encoded), "budget_bytes": config.budget_for(w, h), "fits_budget": True}
    return Prepared(key, "misc", name, w, h, result.data, table, info, t1 - t0, t2 - t1, learned=extra,
                    features=features)


def prepare_baseline(key: str, name: str, image: np.ndarray, codec: str, budget: int, raster: str,
                     levels: int, decoder: DecoderConfig | None = None, learned: LearnedWeights | None = None,
                     caption: str = "") -> Prepared:
    """Encode the whole image as one ``codec`` file within ``budget`` bytes and measure its stages
    (``caption``: the image's, for CLIP-score)."""
    from miscnet.experiments.baselines import encode_baseline

    h, w = image.shape[:2]
    t0 = time.perf_counter()
    try:
        base = encode_baseline(image, codec, budget, raster, levels)
        t1 = time.perf_counter()
        table, extra, features = _learned_tables(base.encoded, image, _decoder_for(decoder), learned, caption)
    except MiscError as exc:
        return _failed(key, codec, name, image, t0, exc)
    t2 = time.perf_counter()
    info = {"pixel_codec": codec, "pixel_raster": f"{base.width}x{base.height}", "pixel_quality": base.quality,
            "budget_bytes": budget, "fits_budget": base.fits}
    return Prepared(key, codec, name, w, h, to_bytes(base.encoded), table, info, t1 - t0, t2 - t1, learned=extra,
                    features=features)


class _TableQuality:
    """Stands in for simulate's quality cache: stage quality from the prepared table, no decoding."""

    def __init__(self, table: dict[str, tuple], learned: dict[str, dict] | None = None):
        self.table = table
        self.learned = learned or {}

    @property
    def decoder(self):  # only used by simulate(keep_images=True), which the sweep never asks for
        raise MiscError("the sweep keeps no stage images")

    def __call__(self, item, stage, want_image: bool = False):
        if not stage.has_pixels:
            return None, None
        key = stage_key(stage.layers)
        return {**dict(zip(QUALITY_METRICS, self.table[key], strict=True)), **self.learned.get(key, {})}, None


def simulate_points(prepared: Prepared, config: Configuration, points: list[tuple[str, int]]
                    ) -> tuple[list[tuple[str, dict]], float]:
    """Run each (point id, seed) on a fresh link; return (point id, record) pairs and the time taken."""
    t0 = time.perf_counter()
    encoded = from_bytes(prepared.data)
    link, transport = config.link_config(), config.transport_config()
    out = []
    for point_id, seed in points:
        table = _TableQuality(prepared.quality, prepared.learned)
        item = SimImage(prepared.image, encoded, None)
        result = simulate([item], SimScenario(link=link, transport=transport, seed=seed), quality_cache=table)[0]
        for event in result["events"]:
            event["layers"] = "+".join(event["layers"])  # one CSV cell
        out.append((point_id, _record(prepared, result)))
    return out, time.perf_counter() - t0


def _record(prepared: Prepared, result: dict) -> dict:
    events = result["events"]
    semantic = next((e["time_s"] for e in events if "semantic" in str(e.get("layers", "")).split("+")), None)
    totals = dict(result["totals"])
    totals["first_semantic_time_s"] = semantic
    return {"width": result["width"], "height": result["height"], "file_bytes": result["bytes"],
            "completed": result["completed"], "bit_exact": result["bit_exact"], "failure": result["failure"],
            "events": events, "totals": totals, "prep": prepared.info}


# ---------------------------------------------------------------------------------------------- executors

class _Inline:
    """One worker: tasks run in this process, in submission order."""

    workers = 1

    def __init__(self) -> None:
        self._queue: list[tuple[int, Callable, tuple]] = []
        self._n = 0

    def submit(self, fn, *args):
        self._n += 1
        self._queue.append((self._n, fn, args))
        return self._n

    def wait_any(self) -> list[tuple[Any, Any]]:
        handle, fn, args = self._queue.pop(0)
        return [(handle, fn(*args))]

    def close(self) -> None:
        pass


def _exit_with(parent_pid: int) -> None:
    """Pool worker initializer: leave when the sweep's process is gone (a killed sweep leaves no workers)."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # alive, owned by someone else
                pass

    threading.Thread(target=watch, name="miscnet-parent-watch", daemon=True).start()


class _ProcessPool:
    def __init__(self, workers: int) -> None:
        import concurrent.futures as cf
        import multiprocessing as mp

        methods = mp.get_all_start_methods()
        if "forkserver" in methods:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["miscnet.experiments.sweep"])
        else:
            ctx = mp.get_context("spawn")
        self.workers = workers
        self._cf = cf
        self._pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_exit_with,
                                            initargs=(os.getpid(),))
        self._pending: set = set()

    def submit(self, fn, *args):
        fut = self._pool.submit(fn, *args)
        self._pending.add(fut)
        return fut

    def wait_any(self):
        done, self._pending = self._cf.wait(self._pending, return_when=self._cf.FIRST_COMPLETED)
        return [(f, f.result()) for f in sorted(done, key=id)]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Dask:
    def __init__(self, address) -> None:
        try:
            import distributed
        except ImportError:
            raise MiscError("--dask needs the 'distributed' package: pip install 'dask[distributed]'") from None
        self._distributed = distributed
        if isinstance(address, distributed.Client):
            self._client, self._own = address, False
        else:
            try:
                self._client = distributed.Client(address, timeout="20s")
            except (OSError, TimeoutError) as exc:
                raise MiscError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
            self._own = True
        self.workers = max(1, sum(self._client.nthreads().values()))
        self._pending: set = set()
        self._n = 0
        self._run = uuid.uuid4().hex[:12]  # task keys must not meet another sweep's on a shared cluster

    def submit(self, fn, *args):
        self._n += 1
        fut = self._client.submit(fn, *args, pure=False, key=f"miscnet-{self._run}-{fn.__name__}-{self._n}")
        self._pending.add(fut)
        return fut

    def wait_any(self):
        done, not_done = self._distributed.wait(list(self._pending), return_when="FIRST_COMPLETED")
        self._pending = set(not_done)
        return [(f, f.result()) for f in sorted(done, key=lambda f: f.key)]

    def close(self) -> None:
        for f in self._pending:
            f.cancel()
        if self._own:
            self._client.close()


def make_executor(workers: int | None, dask) -> Any:
    """Where tasks run: this process (1 worker), local processes, or a Dask scheduler (address or Client);
    ``submit(fn, *args)``, ``wait_any()`` -> [(future, result)], ``close()``. Used by sweeps and fleets."""
    if dask is not None:
        return _Dask(dask)
    n = workers if workers is not None else (os.cpu_count() or 1)
    if n < 1:
        raise MiscError(f"--workers must be at least 1, not {n}")
    return _Inline() if n == 1 else _ProcessPool(n)


# ---------------------------------------------------------------------------------------------- the run

class _NoBar:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class SweepResult:
    out_dir: Path
    points: int  # in the plan
    run: int  # simulated in this call
    reused: int  # taken from an earlier, interrupted run
    errors: int  # points whose encoding failed (recorded, not fatal)
    wall_s: float
    workers: int
    timing: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    @property
    def points_per_s(self) -> float:
        return self.run / self.wall_s if self.wall_s > 0 else math.inf

    def as_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "points": self.points, "run": self.run, "reused": self.reused,
                "errors": self.errors, "wall_s": self.wall_s, "workers": self.workers,
                "points_per_s": self.points_per_s, "timing": self.timing, "files": [str(f) for f in self.files]}


def _read_points(path: Path) -> dict[str, dict]:
    """Records by point id from points.jsonl; a torn last line (a killed run) is dropped."""
    out: dict[str, dict] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("id"), str) and isinstance(rec.get("result"), dict):
            out[rec["id"]] = rec["result"]
    return out


def load_images(spec: ScenarioSpec, needed: set[int]) -> dict[int, np.ndarray]:
    from miscnet.core.image_io import load_image
    from miscnet.core.samples import resolve_image_arg

    loaded = {}
    for i in sorted(needed):
        img = spec.images[i]
        try:
            loaded[i] = load_image(resolve_image_arg(img.arg)[0])
        except MiscError as exc:
            raise ScenarioError(f"{spec.source}: image {img.name}: {exc}") from None
    return loaded


def semantics_for(spec: ScenarioSpec, config: Configuration, index: int, image: np.ndarray,
                  cache_dir: Path | None = None):
    """The semantics of one image under one configuration's semantic backend.

    The sidecar backend reads the file; a model backend (openai, hf) is asked once per (image, backend
    settings) and its answer kept in ``cache_dir``, so a resumed sweep uses the very same semantics.
    """
    from miscnet.core.semantics import load_semantics, semantics_to_json
    from miscnet.sender.semantics_source import semantics_for as source_semantics_for

    img = spec.images[index]
    cached = None
    if config.params["encoder.semantic"] != "sidecar" and cache_dir is not None:
        cached = cache_dir / f"{_safe(img.name)}-{config.semantics_key()}.json"
        if cached.is_file():
            return load_semantics(cached)[0]
    try:
        semantics, _warnings = source_semantics_for(config.semantics_config(img.semantics), image, img.arg)
    except MiscError as exc:
        raise ScenarioError(f"{spec.source}: image {img.name}, configuration {config.id} ({config.label}): "
                            f"{exc}") from None
    if cached is not None:
        atomic_write_bytes(cached, json.dumps(semantics_to_json(semantics), indent=1).encode())
    return semantics


def check_models(spec: ScenarioSpec, configs: list[Configuration]) -> None:
    """Every model a configuration names must be here (weights resolve; nothing loads): fail before any work."""
    from miscnet.receiver.decoders import make_decoder
    from miscnet.sender.map_layer import map_backend_for

    seen: set[str] = set()
    for c in configs:
        for what, key, check in (
                ("map", c.params["encoder.map"] + c.encoder_key(),
                 lambda c=c: map_backend_for(c.map_config()) if c.params["encoder.map"] not in ("none", "boxes")
                 else None),
                ("decoder", c.decoder_key(), lambda c=c: make_decoder(c.decoder_config()))):
            if key in seen:
                continue
            seen.add(key)
            try:
                check()
            except MiscError as exc:
                raise ScenarioError(f"{spec.source}: configuration {c.id} ({c.label}): {what}: {exc}") from None


def run_sweep(spec: ScenarioSpec, out_dir: str | Path, *, workers: int | None = None, dask=None,
              resume: bool = False, limit: int | None = None, quiet: bool = False, plots: bool = True
              ) -> SweepResult:
    """Run (or finish) every point of ``spec`` and write the outputs under ``out_dir``.

    ``workers``: local processes (default: the CPU count; 1 runs in this process). ``dask``: a scheduler
    address or a ``distributed.Client``; the points then run on that cluster. ``limit``: only the first
    N points of the plan. ``resume``: keep the points an earlier run of this folder finished.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    plan = spec.points()
    if limit is not None:
        if limit < 1:
            raise MiscError(f"--limit must be at least 1, not {limit}")
        plan = plan[:limit]
    points_path = out / POINTS_FILE
    existing = _read_points(points_path)
    if existing and not resume:
        raise MiscError(f"{out} already holds sweep results ({POINTS_FILE}); pass --resume to finish them "
                        f"or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    if spec.text:
        atomic_write_bytes(out / "scenario.toml", spec.text.encode())
    # rewrite what is kept (drops a torn last line), then append as points finish
    kept = {k: v for k, v in existing.items()}
    atomic_write_bytes(points_path, "".join(json.dumps({"id": k, "result": v}) + "\n"
                                            for k, v in kept.items()).encode())
    todo = [p for p in plan if p.id not in kept]
    reused = len(plan) - len(todo)

    timing = {"encode_s": 0.0, "decode_s": 0.0, "simulate_s": 0.0}
    # the learned metrics whose weights are configured and load (each checked once, here); the rest skipped
    learned, learned_status = learned_metrics.resolve(load=bool(todo))
    executor = None
    n_run = 0
    if todo:
        executor = make_executor(workers, dask)
        try:
            n_run = _execute(spec, todo, executor, out, timing, quiet, learned)
        finally:
            executor.close()
    records = _read_points(points_path)
    missing = [p.id for p in plan if p.id not in records]
    if missing:
        raise MiscError(f"{len(missing)} points have no result in {points_path}")
    t_assemble = time.perf_counter()
    files = write_outputs(spec, plan, records, out, plots=plots, learned_status=learned_status)
    timing["assemble_s"] = time.perf_counter() - t_assemble
    wall = time.perf_counter() - t_start
    n_workers = executor.workers if executor is not None else 0
    timing["wall_s"] = wall
    if n_workers:
        busy = timing["encode_s"] + timing["decode_s"]
        timing["outside_codec_share"] = max(0.0, 1.0 - busy / (wall * n_workers))
    errors = sum(1 for p in plan if records[p.id].get("error"))
    result = SweepResult(out, len(plan), n_run, reused, errors, wall, n_workers, timing, files)
    atomic_write_bytes(out / "run.json", json.dumps(result.as_dict(), indent=1).encode())
    return result


def _keep_features(prepared: Prepared, out: Path) -> None:
    """Write a prepared encoding's InceptionV3 features to learned/ (FID/KID read them when the outputs are
    assembled, also after a resume) and drop them from what travels on to the simulate tasks."""
    if not prepared.features:
        return
    import hashlib

    name = hashlib.sha256(f"{prepared.method}\n{prepared.key}".encode()).hexdigest()[:20] + ".npz"
    buf = io.BytesIO()
    np.savez(buf, **prepared.features)
    atomic_write_bytes(out / "learned" / name, buf.getvalue())
    prepared.info["learned_features"] = f"learned/{name}"
    prepared.features = None


def _execute(spec: ScenarioSpec, todo: list[Point], executor, out: Path, timing: dict, quiet: bool,
             learned: LearnedWeights | None = None) -> int:
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional
        tqdm = _NoBar
    configs = spec.configs
    raster, levels = spec.settings["baselines.raster"], spec.settings["baselines.levels"]
    check_models(spec, [configs[c] for c in sorted({p.config for p in todo})])
    # group the points by the MISC encoding they need (baselines take their budget from it)
    by_misc: dict[tuple[int, str, str], list[Point]] = defaultdict(list)
    for p in todo:
        c = configs[p.config]
        by_misc[(p.image, c.encoder_key(), c.decoder_key())].append(p)
    images = load_images(spec, {p.image for p in todo})
    semantics: dict[tuple[int, str], Any] = {}
    for key, points in by_misc.items():
        c = configs[points[0].config]
        skey = (key[0], c.semantics_key())
        if skey not in semantics:
            semantics[skey] = semantics_for(spec, c, key[0], images[key[0]], out / "semantics")

    def cost(key: tuple) -> float:  # encode cost grows with pixels; longest first balances best
        return images[key[0]].shape[0] * images[key[0]].shape[1]

    bar = tqdm(total=len(todo), desc=f"sweep {spec.name}", unit="pt", file=sys.stderr,
               disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)
    tasks: dict[Any, tuple] = {}
    baseline_prepared: dict[tuple, Prepared | None] = {}  # key -> Prepared, None while it runs
    baseline_waiting: dict[tuple, list[Point]] = defaultdict(list)
    n_done = 0
    log = (out / POINTS_FILE).open("a", encoding="utf-8")

    def submit_points(prepared: Prepared, points: list[Point]) -> None:
        by_config: dict[int, list[Point]] = defaultdict(list)
        for p in points:
            by_config[p.config].append(p)
        for c, pts in by_config.items():
            for i in range(0, len(pts), CHUNK_POINTS):
                chunk = pts[i : i + CHUNK_POINTS]
                handle = executor.submit(simulate_points, prepared, configs[c],
                                         [(p.id, p.sim_seed) for p in chunk])
                tasks[handle] = ("simulate", chunk)

    def record_errors(points: list[Point], message: str) -> None:
        nonlocal n_done
        for p in points:
            log.write(json.dumps({"id": p.id, "result": {"error": message}}) + "\n")
        log.flush()
        n_done += len(points)
        bar.update(len(points))

    def check_fatal(prepared: Prepared, points: list[Point]) -> None:
        if prepared.error and prepared.fatal:
            c = configs[points[0].config]
            raise MiscError(f"{spec.source}: image {prepared.image}, configuration {c.id} ({c.label}), "
                            f"{prepared.method}: {prepared.error}")

    for key in sorted(by_misc, key=lambda k: (-cost(k), k)):
        points = by_misc[key]
        c = configs[points[0].config]
        handle = executor.submit(prepare_misc, ":".join(map(str, key)), spec.images[key[0]].name, images[key[0]],
                                 semantics[(key[0], c.semantics_key())], c.encoder_config(), c.decoder_config(),
                                 learned)
        tasks[handle] = ("misc", key)
    try:
        while tasks:
            for handle, value in executor.wait_any():
                kind, payload = tasks.pop(handle)
                if kind == "simulate":
                    results, seconds = value
                    timing["simulate_s"] += seconds
                    for point_id, rec in results:
                        log.write(json.dumps({"id": point_id, "result": rec}) + "\n")
                    log.flush()
                    n_done += len(results)
                    bar.update(len(results))
                    continue
                prepared: Prepared = value
                _keep_features(prepared, out)
                timing["encode_s"] += prepared.encode_s
                timing["decode_s"] += prepared.decode_s
                if kind == "misc":
                    points = by_misc[payload]
                    check_fatal(prepared, points)
                    misc_points = [p for p in points if p.method == "misc"]
                    others = [p for p in points if p.method != "misc"]
                    if prepared.error:  # an impossible budget: recorded, the sweep goes on
                        record_errors(misc_points, f"encode: {prepared.error}")
                        record_errors(others, f"MISC encode (the baseline's budget): {prepared.error}")
                        continue
                    submit_points(prepared, misc_points)
                    budget = len(prepared.data)
                    for p in others:
                        bkey = (p.image, p.method, budget, raster, levels, payload[2])
                        baseline_waiting[bkey].append(p)
                        if bkey not in baseline_prepared:
                            baseline_prepared[bkey] = None
                            sem = semantics.get((p.image, configs[p.config].semantics_key()))
                            caption = sem.caption if sem is not None else ""
                            handle = executor.submit(prepare_baseline, ":".join(map(str, bkey)),
                                                     spec.images[p.image].name, images[p.image], p.method, budget,
                                                     raster, levels, configs[p.config].decoder_config(), learned,
                                                     caption)
                            tasks[handle] = ("baseline", bkey)
                        elif baseline_prepared[bkey] is not None:  # already encoded for an equal budget
                            ready = baseline_prepared[bkey]
                            waiting = baseline_waiting.pop(bkey)
                            if ready.error:
                                record_errors(waiting, f"baseline encode: {ready.error}")
                            else:
                                submit_points(ready, waiting)
                else:  # a baseline encoding
                    waiting = baseline_waiting.pop(payload, [])
                    check_fatal(prepared, waiting or by_misc[next(iter(by_misc))])
                    baseline_prepared[payload] = prepared
                    if prepared.error:
                        record_errors(waiting, f"baseline encode: {prepared.error}")
                    elif waiting:
                        submit_points(prepared, waiting)
    finally:
        log.close()
        bar.close()
    return n_done


# ---------------------------------------------------------------------------------------------- outputs

EVENT_FIELDS = ["event", "stage", "layers", "time_s", "payload_bytes", "wire_bytes", "bpp", "wire_bpp",
                *QUALITY_METRICS, *IMAGE_METRICS]  # the learned ones stay empty unless configured
POINT_FIELDS = ["completed", "bit_exact", "failure", "first_stage_time_s", "first_semantic_time_s",
                "completion_time_s", "wire_bytes_total", "fec_bytes", "retransmitted_bytes", "control_bytes",
                "packets_sent", "packets_lost", "rounds", "error"]
PREP_FIELDS = ["pixel_codec", "pixel_raster", "pixel_quality", "budget_bytes", "fits_budget", "file_bytes", "file_bpp"]
HEAD_FIELDS = ["scenario", "config", "label", "case", "image", "width", "height", "seed", "sim_seed", "method",
               "point"]
CSV_FIELDS = HEAD_FIELDS + list(CONFIG_KEYS) + PREP_FIELDS + EVENT_FIELDS + POINT_FIELDS


def point_rows(spec: ScenarioSpec, point: Point, rec: dict) -> list[dict]:
    """The CSV rows of one point: one per event (one with an empty stage when nothing arrived)."""
    c = spec.configs[point.config]
    head = {"scenario": spec.name, "config": c.id, "label": c.label, "case": c.case,
            "image": spec.images[point.image].name, "seed": point.seed, "sim_seed": point.sim_seed,
            "method": point.method, "point": point.id,
            **c.params}
    if rec.get("error"):
        return [{**head, "error": rec["error"], "completed": False}]
    w, h = rec["width"], rec["height"]
    pixels = w * h
    t = rec["totals"]
    prep = rec.get("prep", {})
    common = {**head, "width": w, "height": h, **{k: prep.get(k) for k in PREP_FIELDS[:5]},
              "file_bytes": rec["file_bytes"], "file_bpp": rec["file_bytes"] * 8 / pixels,
              "completed": rec["completed"], "bit_exact": rec["bit_exact"], "failure": rec["failure"] or None,
              "first_stage_time_s": t.get("first_stage_time_s"),
              "first_semantic_time_s": t.get("first_semantic_time_s"),
              "completion_time_s": t.get("completion_time_s"), "wire_bytes_total": t.get("wire_bytes"),
              "fec_bytes": t.get("fec_bytes"), "retransmitted_bytes": t.get("retransmitted_bytes"),
              "control_bytes": t.get("control_bytes"), "packets_sent": t.get("packets_sent"),
              "packets_lost": t.get("packets_lost"), "rounds": t.get("rounds")}
    rows = []
    for i, e in enumerate(rec["events"]):
        rows.append({**common, "event": i, "stage": e["stage"], "layers": e.get("layers"), "time_s": e["time_s"],
                     "payload_bytes": e["payload_bytes"], "wire_bytes": e["wire_bytes"],
                     "bpp": e["payload_bytes"] * 8 / pixels, "wire_bpp": e["wire_bytes"] * 8 / pixels,
                     **{m: e.get(m) for m in (*QUALITY_METRICS, *IMAGE_METRICS)}})
    return rows or [{**common, "stage": ""}]


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return v


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(r.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p90": None, "n": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "n": len(a)}


def _set_metrics(ok: list[dict], stages: list[str], out: Path | None) -> dict[str, list] | None:
    """FID and KID of each stage: the reconstructions of the distinct images (one per encoding, whatever the
    seed) against their references, from the features in learned/; None without features."""
    files = sorted({r["prep"]["learned_features"] for r in ok if r.get("prep", {}).get("learned_features")})
    if not files or out is None:
        return None
    feats: dict[str, dict[str, np.ndarray]] = {}
    for f in files:
        try:
            with np.load(out / f, allow_pickle=False) as z:
                feats[f] = {k: z[k] for k in z.files}
        except (OSError, ValueError):  # removed or torn: its images drop out of the sets
            continue
    res: dict[str, list] = {"fid": [], "kid": [], "kid-std": [], "fid-images": []}
    for s in stages:
        recon: dict[tuple[str, str], np.ndarray] = {}
        refs: dict[str, np.ndarray] = {}
        for r in ok:
            f = r.get("prep", {}).get("learned_features")
            if f not in feats:
                continue
            for e in first_pixel_events(r):
                if e["stage"] == s and e.get("layers") in feats[f]:
                    recon[(f, e["layers"])] = feats[f][e["layers"]]
                    refs[f] = feats[f]["reference"]
        m = learned_metrics.set_metrics(np.stack(list(recon.values())) if recon else np.zeros((0, 1)),
                                        np.stack(list(refs.values())) if refs else np.zeros((0, 1)))
        res["fid"].append(m["fid"])
        res["kid"].append(m["kid"])
        res["kid-std"].append(m["kid_std"])
        res["fid-images"].append(len(refs))
    return res


def aggregate(spec: ScenarioSpec, plan: list[Point], records: dict[str, dict], out_dir: Path | None = None,
              learned_status: dict[str, str] | None = None) -> list[dict]:
    """Per (configuration, method): the CompressAI-style curve over pixel stages, and time figures.

    The learned metrics that were computed join the curve: the means of lpips, dists and clip-score per
    stage, and per stage the set metrics fid, kid (with kid-std) over the distinct images (fid-images);
    ``learned-metrics`` says, per metric, "computed" (with a note when the sets are small) or why not."""
    if learned_status is None:
        learned_status = learned_metrics.resolve(load=False)[1]
    groups: dict[tuple[int, str], list[tuple[Point, dict]]] = defaultdict(list)
    for p in plan:
        groups[(p.config, p.method)].append((p, records[p.id]))
    out = []
    for (ci, method), items in sorted(groups.items(), key=lambda kv: (kv[0][0], spec.methods.index(kv[0][1]))):
        c = spec.configs[ci]
        ok = [r for _, r in items if not r.get("error")]
        per_stage: dict[str, list[dict]] = defaultdict(list)
        for r in ok:
            pixels = r["width"] * r["height"]
            for e in first_pixel_events(r):
                per_stage[e["stage"]].append({**e, "pixels": pixels})
        stages = sorted(per_stage, key=stage_order)
        n = len(items)
        res: dict[str, list] = {k: [] for k in ("stage", "bpp", "wire-bpp", "psnr-rgb", "ms-ssim-rgb", "ssimulacra2",
                                                "flip", "time-s", "time-s-median", "time-s-p90", "arrived")}
        for s in stages:
            ev = per_stage[s]
            res["stage"].append(s)
            res["bpp"].append(float(np.mean([e["payload_bytes"] * 8 / e["pixels"] for e in ev])))
            res["wire-bpp"].append(float(np.mean([e["wire_bytes"] * 8 / e["pixels"] for e in ev])))
            res["psnr-rgb"].append(float(np.mean([e["psnr"] for e in ev])))
            res["ms-ssim-rgb"].append(float(np.mean([e["ms_ssim"] for e in ev])))
            for metric in ("ssimulacra2", "flip"):  # None where a metric had nothing to measure (tiny images)
                values = [e[metric] for e in ev if e.get(metric) is not None]
                res[metric].append(float(np.mean(values)) if values else None)
            t = _stats([e["time_s"] for e in ev])
            res["time-s"].append(t["mean"])
            res["time-s-median"].append(t["median"])
            res["time-s-p90"].append(t["p90"])
            res["arrived"].append(len(ev) / n)
        for metric in IMAGE_METRICS:  # only those computed: an unconfigured metric adds no empty list
            curve = []
            for s in stages:
                values = [e[metric] for e in per_stage[s] if e.get(metric) is not None]
                curve.append(float(np.mean(values)) if values else None)
            if any(v is not None for v in curve):
                res["clip-score" if metric == "clip_score" else metric] = curve
        status = dict(learned_status)
        sets = _set_metrics(ok, stages, out_dir)
        if sets is not None:
            res.update(sets)
            note = learned_metrics.set_note(max(sets["fid-images"], default=0), max(sets["fid-images"], default=0))
            for metric in learned_metrics.SET_METRICS:
                if note and status.get(metric) == learned_metrics.COMPUTED:
                    status[metric] = f"{learned_metrics.COMPUTED}: {note}"
        first = [r["totals"]["first_stage_time_s"] for r in ok if r["totals"].get("first_stage_time_s") is not None]
        sem = [r["totals"]["first_semantic_time_s"] for r in ok if r["totals"].get("first_semantic_time_s") is not None]
        done = [r["totals"]["completion_time_s"] for r in ok if r["completed"]]
        finals = [max((e for e in r["events"] if e["psnr"] is not None), key=lambda e: e["time_s"])["psnr"]
                  for r in ok if any(e["psnr"] is not None for e in r["events"])]
        sent = sum(r["totals"]["wire_bytes"] for r in ok)
        payload = sum(r["file_bytes"] for r in ok)
        out.append({
            "name": f"{spec.name}: {c.label} [{method}]",
            "description": (f"{spec.description.strip()} Configuration {c.id} ({c.label}), method {method}; "
                            f"{len(spec.images)} images x {len(spec.seeds)} seeds; decoder {c.params['decoder.name']}."
                            " Each list has one value per pixel stage: bpp = payload bits of the layers the stage "
                            "uses per pixel, wire-bpp = bits delivered on the link by then, time-s = seconds from "
                            "the first packet; means over the points where the stage arrived (arrived = their "
                            "share).").strip(),
            "results": res,
            "time": {"first-stage-s": _stats(first), "first-semantic-stage-s": _stats(sem),
                     "completion-s": _stats(done), "complete-fraction": len(done) / n if n else 0.0,
                     "first-stage-fraction": len(first) / n if n else 0.0,
                     "first-semantic-stage-fraction": len(sem) / n if n else 0.0},
            "final-psnr-rgb": _stats(finals),
            "learned-metrics": status,
            "wire-overhead": (sent / payload) if payload else None,
            "config": c.id, "label": c.label, "case": c.case, "method": method,
            "protection": c.protection_label(), "params": c.params, "swept": c.swept,
            "points": n, "errors": n - len(ok),
            "budget-fits-fraction": (sum(1 for r in ok if r.get("prep", {}).get("fits_budget", True)) / len(ok)
                                     if ok else None),
        })
    return out


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:80]


def write_outputs(spec: ScenarioSpec, plan: list[Point], records: dict[str, dict], out: Path,
                  plots: bool = True, learned_status: dict[str, str] | None = None) -> list[Path]:
    rows = [row for p in plan for row in point_rows(spec, p, records[p.id])]
    files = [out / "results.csv"]
    atomic_write_bytes(files[0], csv_text(rows).encode())
    summaries = aggregate(spec, plan, records, out, learned_status)
    for s in summaries:
        cj = {k: s[k] for k in ("name", "description", "results")}
        cj.update({k: s[k] for k in ("time", "final-psnr-rgb", "wire-overhead", "params", "points", "errors",
                                     "learned-metrics")})
        path = out / "compressai" / f"{s['config']}-{_safe(s['method'])}.json"
        atomic_write_bytes(path, json.dumps(cj, indent=1).encode())
        files.append(path)
    summary = {"scenario": spec.name, "description": spec.description, "points": len(plan),
               "configurations": len({p.config for p in plan}), "images": [i.name for i in spec.images],
               "seeds": list(spec.seeds), "methods": list(spec.methods), "swept": list(spec.swept_keys),
               "results": summaries}
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
    files.append(out / "summary.json")
    if plots:
        from miscnet.experiments.plots import write_figures

        files += write_figures(spec, plan, records, summaries, out)
    return files

"""Cost profiles: how long a decoder takes to render each kind of progressive stage, for simulators.

A :class:`CostProfile` holds, per stage kind (``semantic``, ``map``, ``pixel``), measured points
``(pixels, batch, seconds, peak_mb)``: the time one call takes to render ``batch`` stages of that kind for
images of ``pixels`` pixels, and the peak memory it needed. ``service_time(stage, pixels, batch)``
interpolates between them (rules in its docstring). Profiles are JSON files: the committed ones live in
``experiments/profiles/`` (see its README) and load by name (``load_profile("classical-cpu")``); any other
file loads by path. ``measure_profile`` makes one by timing a decoder on real stages of a bundled sample, and
``miscnet profile`` (src/miscnet/cli/profile.py) writes one to a file.

For the diffusion decoder without weights, :func:`write_random_weight_models` builds the full-size
architectures (Stable Diffusion 2.1-base's UNet, VAE and OpenCLIP text tower, and a ControlNet of the same
size) with random weights in the checkpoints' own layout: what a forward pass costs does not depend on the
weights' values. :func:`estimate_diffusion_profile` derives the committed GPU estimate from FLOP counts
(on the meta device: no weights, no compute) and published timings.

Nothing here imports torch, diffusers or transformers at import time.
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
import os
import platform
import statistics
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from miscnet.core.errors import MiscError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"  # installed with the package
KINDS = ("semantic", "map", "pixel")
DECODER_NAMES = ("classical", "diffusion")
FORMAT = 1
ESTIMATE_PREFIX = "ESTIMATE:"
DEFAULT_SIZES = ((256, 256), (512, 512), (1024, 1024))
_TOP_KEYS = {"format", "decoder", "device", "source", "estimate", "points", "notes"}
_REQUIRED_TOP = ("decoder", "device", "source", "estimate", "points")
_POINT_KEYS = ("pixels", "batch", "seconds", "peak_mb")


class ProfileError(MiscError):
    """A cost profile that is missing, malformed, or lacks what was asked of it (one line, naming the file)."""


def stage_kind(stage: str) -> str:
    """The kind a stage name belongs to: "semantic", "map", "pixel.0", "pixel.1", ... -> semantic, map, pixel."""
    return stage.split(".", 1)[0]


# ============================================================================ the profile


Point = tuple[int, int, float, float]


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    """Log-log interpolation of ys over xs at x; beyond the ends, proportional to x.

    A segment with a zero end (a peak memory of 0 MB) is interpolated linearly instead.
    """
    if x <= xs[0]:
        return ys[0] * x / xs[0]
    if x >= xs[-1]:
        return ys[-1] * x / xs[-1]
    i = bisect_right(xs, x) - 1  # xs[i] <= x < xs[i + 1]
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    if x == x0:
        return y0
    if y0 <= 0 or y1 <= 0:
        return y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0)))


def _over_batches(curves: dict[int, tuple[list[int], list[float]]], pixels: float, batch: int) -> float:
    """The value at (pixels, batch): each measured batch size's curve interpolated in pixels, then
    linear in batch between measured batch sizes; beyond them, linear through the last two measured batch
    sizes (never decreasing), or proportional to batch with one; below the smallest, proportional."""
    sizes = sorted(curves)

    def at(b: int) -> float:
        return _interp(*curves[b], pixels)

    if batch in curves:
        return at(batch)
    if batch < sizes[0]:
        return at(sizes[0]) * batch / sizes[0]
    if batch > sizes[-1]:
        if len(sizes) == 1:
            return at(sizes[-1]) * batch / sizes[-1]
        b0, b1 = sizes[-2], sizes[-1]
        slope = max(0.0, (at(b1) - at(b0)) / (b1 - b0))
        return at(b1) + slope * (batch - b1)
    j = bisect_right(sizes, batch)
    b0, b1 = sizes[j - 1], sizes[j]
    y0, y1 = at(b0), at(b1)
    return y0 + (batch - b0) / (b1 - b0) * (y1 - y0)


@dataclass(frozen=True)
class CostProfile:
    """What a decoder costs per stage kind; see the module docstring and ``service_time``.

    ``points[kind]``: ``(pixels, batch, seconds, peak_mb)`` sorted (by pixels, then batch); ``seconds`` is the
    time of one call rendering ``batch`` stages (all of them, not each). ``source`` says where the numbers
    come from: "measured on <machine> <date> by miscnet profile", or "ESTIMATE: <how derived>" with
    ``estimate`` true. ``notes``: the settings measured (optional). ``origin``: the file it was read from.
    """

    decoder: str
    device: str
    source: str
    estimate: bool
    points: dict[str, list[Point]]
    notes: str = ""
    origin: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        where = self._where()
        if not isinstance(self.points, dict):
            raise ProfileError(f"{where}: points must map stage kinds to lists of points")
        normal: dict[str, list[Point]] = {}
        for kind, pts in self.points.items():
            if kind not in KINDS:
                raise ProfileError(f"{where}: unknown stage kind {kind!r} (use {', '.join(KINDS)})")
            checked = []
            for i, p in enumerate(pts):
                if len(p) != 4:
                    raise ProfileError(f"{where}: point {kind}[{i}] is not (pixels, batch, seconds, peak_mb)")
                for key, value in zip(_POINT_KEYS, p, strict=True):
                    _check_value(where, f"points.{kind}[{i}].{key}", key, value)
                checked.append((int(p[0]), int(p[1]), float(p[2]), float(p[3])))
            checked.sort()
            for a, b in zip(checked, checked[1:], strict=False):
                if a[:2] == b[:2]:
                    raise ProfileError(f"{where}: stage kind {kind!r} has two points at {a[0]} pixels, batch {a[1]}")
            if not checked:
                raise ProfileError(f"{where}: stage kind {kind!r} has no points")
            normal[kind] = checked
        object.__setattr__(self, "points", normal)

    def _where(self) -> str:
        return f"profile {self.origin}" if self.origin else f"{self.decoder}/{self.device} profile"

    def _curves(self, stage: str, column: int) -> dict[int, tuple[list[int], list[float]]]:
        kind = stage_kind(stage)
        if kind not in self.points:
            raise ProfileError(f"{self._where()}: no {kind!r} stage kind (for stage {stage!r}; it has "
                               f"{', '.join(self.points) or 'none'})")
        curves: dict[int, tuple[list[int], list[float]]] = {}
        for p in self.points[kind]:
            xs, ys = curves.setdefault(p[1], ([], []))
            xs.append(p[0])
            ys.append(p[column])
        return curves

    def _value(self, stage: str, pixels: int, batch: int, column: int) -> float:
        if not pixels > 0:
            raise ProfileError(f"{self._where()}: pixels must be positive, not {pixels}")
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
            raise ProfileError(f"{self._where()}: batch must be a whole number of at least 1, not {batch!r}")
        return _over_batches(self._curves(stage, column), float(pixels), int(batch))

    def service_time(self, stage: str, pixels: int, batch: int = 1) -> float:
        """Seconds one call takes to render ``batch`` stages named ``stage`` of images of ``pixels`` pixels.

        Stage names map to kinds ("pixel.0", "pixel.1" -> pixel). In pixels: log-log interpolation between
        the measured points of the same batch size (a power law per segment); beyond the first and last,
        proportional to pixels. In batch: linear between measured batch sizes; beyond the largest, linear
        through the two largest (never decreasing), or proportional with only one measured (a decoder that
        renders a batch as one stage after another); below the smallest, proportional. A kind the profile
        lacks is a ProfileError naming its file. "semantic+map" is the first stage of an image whose semantic
        and map layers came together: the diffusion decoder runs both passes in that call (its map stage
        starts from the semantic stage's text to image), so it costs the sum; the classical decoder draws a
        map stage in one render either way, so it costs a map stage.
        """
        return sum(self._value(part, pixels, batch, 2) for part in self._parts(stage))

    def peak_mb(self, stage: str, pixels: int, batch: int = 1) -> float:
        """Peak memory (MiB) of that call, by the same rules as ``service_time`` (the largest part's)."""
        return max(self._value(part, pixels, batch, 3) for part in self._parts(stage))

    def _parts(self, stage: str) -> list[str]:
        if stage == "semantic+map":
            return ["semantic", "map"] if self.decoder == "diffusion" else ["map"]
        return [stage]

    def to_dict(self) -> dict:
        d = {"format": FORMAT, "decoder": self.decoder, "device": self.device, "source": self.source,
             "estimate": self.estimate}
        if self.notes:
            d["notes"] = self.notes
        d["points"] = {kind: [dict(zip(_POINT_KEYS, p, strict=True)) for p in pts]
                       for kind, pts in self.points.items()}
        return d

    def to_json(self) -> str:
        """The profile as JSON (one point per line), as ``load_profile`` reads it."""
        d = self.to_dict()
        points = d.pop("points")
        lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in d.items()]
        lines.append('  "points": {')
        for k, (kind, pts) in enumerate(points.items()):
            lines.append(f"    {json.dumps(kind)}: [")
            for i, p in enumerate(pts):
                row = {"pixels": p["pixels"], "batch": p["batch"], "seconds": _round(p["seconds"]),
                       "peak_mb": _round(p["peak_mb"])}
                lines.append(f"      {json.dumps(row)}{',' if i < len(pts) - 1 else ''}")
            lines.append(f"    ]{',' if k < len(points) - 1 else ''}")
        lines += ["  }", "}"]
        return "\n".join(lines) + "\n"


def _round(x: float) -> float:
    """Six significant digits (a measurement has fewer), never rounding a positive value to zero."""
    r = float(f"{x:.6g}")
    return r if r > 0 or x <= 0 else x


# ============================================================================ loading


def _check_value(where: str, key: str, name: str, value) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name in ("pixels", "batch"):
        if not (number and float(value).is_integer() and value >= 1):
            raise ProfileError(f"{where}: key {key!r} must be a whole number of at least 1, not {_show(value)}")
    elif name == "seconds":
        if not (number and math.isfinite(value) and value > 0):
            raise ProfileError(f"{where}: key {key!r} must be a positive number of seconds, not {_show(value)}")
    elif not (number and math.isfinite(value) and value >= 0):
        raise ProfileError(f"{where}: key {key!r} must be a number of MiB, at least 0, not {_show(value)}")


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def committed_profiles() -> list[str]:
    """Names of the profiles shipped with miscnet (``load_profile(NAME)`` reads one)."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def profile_path(name_or_path: str | os.PathLike[str]) -> Path:
    """The file a name ("classical-cpu") or path stands for."""
    text = os.fspath(name_or_path)
    path = Path(text)
    if path.suffix == ".json" or os.sep in text or (os.altsep and os.altsep in text) or path.exists():
        return path
    found = PROFILES_DIR / f"{text}.json"
    if not found.is_file():
        raise ProfileError(f"unknown profile {text!r} (committed: {', '.join(committed_profiles()) or 'none'}; "
                           "or give a path to a .json file)")
    return found


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise _Duplicate(k)
        seen[k] = v
    return seen


def load_profile(name_or_path: str | os.PathLike[str]) -> CostProfile:
    """A committed profile by name ("classical-cpu", "diffusion-estimate", ...) or a profile file by path.

    A bad file is a one-line ProfileError naming the file and the key: not JSON, unknown or missing keys,
    a missing stage kind, a non-positive time, ...
    """
    path = profile_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"profile {path}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except _Duplicate as exc:
        raise ProfileError(f"profile {path}: key {exc.args[0]!r} appears twice") from None
    return profile_from_dict(data, str(path))


def profile_from_dict(data, origin: str = "") -> CostProfile:
    """Check a profile's JSON object key by key and make the CostProfile (errors name origin and the key)."""
    where = f"profile {origin}" if origin else "profile"
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: the top level must be a JSON object, not {type(data).__name__}")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ProfileError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    for key in _REQUIRED_TOP:
        if key not in data:
            raise ProfileError(f"{where}: missing key {key!r}")
    if data.get("format", FORMAT) != FORMAT:
        raise ProfileError(f"{where}: key 'format' is {_show(data['format'])}; this miscnet reads format {FORMAT}")
    if data["decoder"] not in DECODER_NAMES:
        raise ProfileError(f"{where}: key 'decoder' must be one of {', '.join(DECODER_NAMES)}, "
                           f"not {_show(data['decoder'])}")
    for key in ("device", "source", "notes"):
        if key in data and not (isinstance(data[key], str) and (data[key].strip() or key == "notes")):
            raise ProfileError(f"{where}: key {key!r} must be a non-empty string, not {_show(data[key])}")
    if not isinstance(data["estimate"], bool):
        raise ProfileError(f"{where}: key 'estimate' must be true or false, not {_show(data['estimate'])}")
    if data["estimate"] != data["source"].startswith(ESTIMATE_PREFIX):
        raise ProfileError(f"{where}: key 'source' must start with {ESTIMATE_PREFIX!r} exactly when 'estimate' "
                           "is true")
    points = data["points"]
    if not isinstance(points, dict):
        raise ProfileError(f"{where}: key 'points' must map stage kinds to lists, not {_show(points)}")
    for kind in points:
        if kind not in KINDS:
            raise ProfileError(f"{where}: unknown key 'points.{kind}' (stage kinds: {', '.join(KINDS)})")
    for kind in KINDS:
        if kind not in points:
            raise ProfileError(f"{where}: missing key 'points.{kind}' (every profile covers "
                               f"{', '.join(KINDS)})")
    parsed: dict[str, list[Point]] = {}
    for kind, pts in points.items():
        if not isinstance(pts, list) or not pts:
            raise ProfileError(f"{where}: key 'points.{kind}' must be a non-empty list of points")
        rows = []
        for i, p in enumerate(pts):
            at = f"points.{kind}[{i}]"
            if not isinstance(p, dict):
                raise ProfileError(f"{where}: key {at!r} must be an object with keys {', '.join(_POINT_KEYS)}")
            extra = sorted(set(p) - set(_POINT_KEYS))
            if extra:
                raise ProfileError(f"{where}: unknown key '{at}.{extra[0]}' (known: {', '.join(_POINT_KEYS)})")
            for key in _POINT_KEYS:
                if key not in p:
                    raise ProfileError(f"{where}: missing key '{at}.{key}'")
                _check_value(where, f"{at}.{key}", key, p[key])
            rows.append(tuple(p[k] for k in _POINT_KEYS))
        parsed[kind] = rows
    return CostProfile(decoder=data["decoder"], device=data["device"], source=data["source"],
                       estimate=data["estimate"], points=parsed, notes=data.get("notes", ""), origin=origin)


# ============================================================================ measuring


def machine_description(device: str = "cpu") -> str:
    """A short description of this machine (and its GPU when device is CUDA)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    memory = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages / 2**30:.0f} GiB memory"
    except (ValueError, OSError, AttributeError):
        pass
    text = f"{cpu} ({cores} CPU cores available{memory}), {platform.system()} {platform.machine()}"
    if device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(torch.device(device))
        text = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, host {text}"
    return text


def _sample_semantics(sample: str):
    from miscnet.core.samples import sample_sidecar_path
    from miscnet.core.semantics import load_semantics

    return load_semantics(sample_sidecar_path(sample))[0]


def encode_sample(sample: str, width: int, height: int, encoder_config=None):
    """(EncodedImage, Semantics): the bundled sample resized to width x height (Lanczos) and encoded."""
    import numpy as np
    from PIL import Image

    from miscnet.core.config import EncoderConfig
    from miscnet.core.container import from_bytes
    from miscnet.core.image_io import load_image
    from miscnet.core.samples import sample_image_path
    from miscnet.sender.encoder import encode_image

    image = load_image(sample_image_path(sample))
    if image.shape[:2] != (height, width):
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))
    semantics = _sample_semantics(sample)
    result = encode_image(image, semantics, encoder_config or EncoderConfig())
    return from_bytes(result.data), semantics  # what a receiver parses


def _with_caption_tag(encoded, semantics, tag: str):
    """encoded with its semantic layer re-encoded, the caption ending in ``tag``: a decoder that caches work
    by prompt (the diffusion decoder keeps its last text-to-image picture) starts afresh, as it does for a
    new image, while the map stage that follows still finds the picture of its own semantic stage."""
    from dataclasses import replace

    from miscnet.core.container import EncodedImage
    from miscnet.core.semantic_codec import encode_semantic_layer
    from miscnet.v1 import bitstream_pb2 as pb

    codec, params, payload = encode_semantic_layer(replace(semantics, caption=f"{semantics.caption} {tag}"))
    layers = [pb.Layer(kind=pb.LAYER_KIND_SEMANTIC, level=0, codec=codec, semantic=params, payload=payload)
              if ly.kind == pb.LAYER_KIND_SEMANTIC else ly for ly in encoded.layers]
    return EncodedImage(encoded.width, encoded.height, layers)


class _Memory:
    """Peak memory of one call: CUDA's allocator peak (weights included), the process's peak resident set
    above its level before (torch on the CPU; Linux), or tracemalloc's peak (Python and numpy allocations)."""

    def __init__(self, mode: str, device: str) -> None:
        self.mode, self.device = mode, device
        self.peak = 0.0

    def __enter__(self):
        if self.mode == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.mode == "rss":
            self._base = _rss_kib("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current resident set
            except OSError:
                self.mode = "none"
        elif self.mode == "tracemalloc":
            import tracemalloc

            self._was_tracing = tracemalloc.is_tracing()  # a caller's own tracing carries on afterwards
            if self._was_tracing:
                tracemalloc.reset_peak()
                self._base = tracemalloc.get_traced_memory()[0]
            else:
                self._base = 0
                tracemalloc.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.mode == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.mode == "rss":
            self.peak = max(0.0, (_rss_kib("VmHWM") - self._base) / 1024)
        elif self.mode == "tracemalloc":
            import tracemalloc

            self.peak = max(0, tracemalloc.get_traced_memory()[1] - self._base) / 2**20
            if not self._was_tracing:
                tracemalloc.stop()


def _rss_kib(field_name: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _render(decoder, stages: list) -> None:
    """What the receiver spends on ``stages`` (a batch): rendering them (the decoder's render_batch where it
    has one, else one by one) and encoding the PNG it writes of each. Render alone leaves out most of a
    classical stage's cost (bench_fleet_live showed live stages taking 20x the render time)."""
    from miscnet.core.image_io import png_bytes

    if len(stages) > 1 and hasattr(decoder, "render_batch"):
        images = decoder.render_batch(stages)
    else:
        images = [decoder.render(stage) for stage in stages]
    for image in images:
        png_bytes(image)


def measure_profile(decoder, decoder_name: str, device: str, sizes: Iterable[tuple[int, int]] = DEFAULT_SIZES,
                    batches: Iterable[int] = (1,), repeats: int = 3, *, sample: str = "astronaut",
                    warmup: int = 1, encoder_config=None, source: str | None = None, notes: str = "",
                    progress: Callable[[str], None] | None = None) -> CostProfile:
    """Time ``decoder.render`` on the progressive stages (semantic, map, pixel.0, pixel.1) of the bundled
    ``sample`` encoded at each size; the median of ``repeats`` per point.

    Each repeat renders an image's stages in stream order on fresh StageInputs (decoding the layers is part of
    a stage's cost, as at the receiver) with its own caption, so no cache carries over from another repeat;
    the pixel kind's time is the mean over its levels. Batch b: one call rendering b stages of a kind
    (``decoder.render_batch`` where it exists, else b renders in turn). Peak memory: CUDA's allocator peak
    on CUDA (weights included); the resident set's growth for torch on the CPU; tracemalloc's peak for the
    CPU numpy decoders, in one extra untimed pass (tracing slows what it traces). ``warmup`` untimed passes
    at the first size come first (after the decoder's models are loaded, where it has ``pipelines()``).
    """
    from miscnet.receiver.stages import progressive_stages

    sizes = [(int(w), int(h)) for w, h in sizes]
    batches = sorted({int(b) for b in batches})
    if not sizes or not batches or repeats < 1 or min(batches) < 1 or min(min(s) for s in sizes) < 1:
        raise ProfileError("measure_profile needs at least one size, one batch size of at least 1 and 1 repeat")
    cuda = device.startswith("cuda")
    mode = "cuda" if cuda else ("rss" if decoder_name == "diffusion" else "tracemalloc")
    say = progress or (lambda _msg: None)

    def sync() -> None:
        if cuda:
            import torch

            torch.cuda.synchronize(device)

    if hasattr(decoder, "pipelines"):  # load the weights before any timing
        say("loading the decoder's models")
        decoder.pipelines()
    points: dict[str, list[Point]] = {k: [] for k in KINDS}
    takes = 0
    for index, (width, height) in enumerate(sizes):
        encoded, semantics = encode_sample(sample, width, height, encoder_config)
        names = [s.name for s in progressive_stages(encoded)]
        for _ in range(warmup if index == 0 else 0):
            takes += 1
            for stage in progressive_stages(_with_caption_tag(encoded, semantics, f"(warm-up {takes})")):
                _render(decoder, [stage])
        for batch in batches:
            seconds: dict[str, list[float]] = {n: [] for n in names}
            peaks: dict[str, float] = dict.fromkeys(names, 0.0)
            passes = repeats + (1 if mode == "tracemalloc" else 0)
            for r in range(passes):
                timed = r < repeats
                images = []
                for _ in range(batch):
                    takes += 1
                    images.append(progressive_stages(_with_caption_tag(encoded, semantics, f"(take {takes})")))
                for i, name in enumerate(names):
                    group = [stages[i] for stages in images]
                    if timed:
                        with _Memory(mode if mode != "tracemalloc" else "none", device) as mem:
                            sync()
                            t0 = time.perf_counter()
                            _render(decoder, group)
                            sync()
                            seconds[name].append(time.perf_counter() - t0)
                    else:
                        with _Memory(mode, device) as mem:
                            _render(decoder, group)
                    peaks[name] = max(peaks[name], mem.peak)
            for kind in KINDS:
                kind_names = [n for n in names if stage_kind(n) == kind]
                if not kind_names:
                    continue
                per_repeat = [statistics.fmean(seconds[n][r] for n in kind_names) for r in range(repeats)]
                t = statistics.median(per_repeat)
                points[kind].append((width * height, batch, max(t, 1e-9), max(peaks[n] for n in kind_names)))
                say(f"{width}x{height} batch {batch} {kind}: {t:.4g} s, peak {points[kind][-1][3]:.1f} MiB")
    missing = [k for k in KINDS if not points[k]]
    if missing:
        raise ProfileError(f"sample {sample!r} encoded without a {missing[0]} stage: cannot profile it")
    if source is None:
        source = f"measured on {machine_description(device)} {datetime.date.today().isoformat()} by miscnet profile"
    return CostProfile(decoder=decoder_name, device=device, source=source, estimate=False, points=points,
                       notes=notes)


# ============================================================================ random-weight full-size models

# Stable Diffusion 2.1-base (the UNet DiffBIR v1 builds on): the diffusers configs of its UNet, VAE and text
# encoder (OpenCLIP ViT-H/14's text tower, 23 of its 24 layers as SD 2.x ships it), and a ControlNet made
# from that UNet (diffusers' ControlNetModel.from_unet: its down blocks and mid block, plus the conditioning
# embedding (16, 32, 96, 256)).
SD21_BASE_DESCRIPTION = (
    "SD 2.1-base architecture: UNet block_out_channels (320, 640, 1280, 1280), layers_per_block 2, "
    "attention_head_dim (5, 10, 20, 20), cross_attention_dim 1024, linear projections (866M parameters); "
    "VAE block_out_channels (128, 256, 512, 512), 4 latent channels (84M); CLIP text encoder hidden 1024, "
    "23 layers, 16 heads, intermediate 4096, vocabulary 49408 (340M); ControlNet from that UNet, "
    "conditioning channels (16, 32, 96, 256) (361M)")


def _scaled(channels: int, scale: float, multiple: int = 8) -> int:
    if scale == 1.0:
        return channels
    return max(multiple, int(round(channels * scale / multiple)) * multiple)


def sd21_base_configs(scale: float = 1.0) -> dict[str, dict]:
    """The diffusers / transformers config arguments of SD 2.1-base's UNet, VAE and text encoder, and the
    ControlNet's conditioning channels; ``scale`` < 1 narrows every channel width (depth kept), for tests."""
    if not 0 < scale <= 1:
        raise ProfileError(f"width scale must be in (0, 1], not {scale}")
    blocks = tuple(_scaled(c, scale) for c in (320, 640, 1280, 1280))
    heads = tuple(math.gcd(c, h) for c, h in zip(blocks, (5, 10, 20, 20), strict=True))
    text_heads = 16
    hidden = _scaled(1024, scale, text_heads)
    vae_blocks = tuple(_scaled(c, scale) for c in (128, 256, 512, 512))
    unet = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=blocks, layers_per_block=2,
                attention_head_dim=heads, cross_attention_dim=hidden, use_linear_projection=True,
                norm_num_groups=math.gcd(32, *blocks),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_blocks, layers_per_block=2,
               norm_num_groups=math.gcd(32, *vae_blocks), sample_size=512, scaling_factor=0.18215,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = dict(vocab_size=49408, hidden_size=hidden, intermediate_size=_scaled(4096, scale),
                num_hidden_layers=23, num_attention_heads=text_heads, max_position_embeddings=77,
                hidden_act="gelu", projection_dim=hidden)
    control = tuple(_scaled(c, scale) for c in (16, 32, 96, 256))
    return {"unet": unet, "vae": vae, "text": text, "controlnet": {"conditioning_embedding_out_channels": control}}


def random_weights_description(scale: float = 1.0) -> str:
    if scale == 1.0:
        return f"random weights, {SD21_BASE_DESCRIPTION}"
    return (f"random weights, SD 2.1-base layout with every channel width scaled by {scale:g} "
            "(NOT the full-size cost)")


def write_random_weight_models(dest: str | os.PathLike[str], scale: float = 1.0, seed: int = 0) -> dict[str, Path]:
    """Write a Stable Diffusion 2.1-base-size pipeline (dest/diffusion) and ControlNet (dest/controlnet) with
    random weights, saved as the checkpoints are (save_pretrained, safetensors, fp16) for the diffusion
    decoder's own loading code; return role -> folder. The tokenizer is the offline one of the tiny models
    (its ids fall inside the full vocabulary; a prompt's cost is its 77 positions, not its words)."""
    from miscnet.core.pretrained import quiet_loading, require_torch
    from miscnet.experiments.models import tiny_clip_tokenizer

    require_torch("miscnet profile --random-weights")
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    configs = sd21_base_configs(scale)
    with quiet_loading():
        import torch
        from diffusers import (
            AutoencoderKL,
            ControlNetModel,
            DDIMScheduler,
            StableDiffusionPipeline,
            UNet2DConditionModel,
        )
        from transformers import CLIPTextConfig, CLIPTextModel

        tok = tiny_clip_tokenizer(root)
        torch.manual_seed(seed)
        text = CLIPTextModel(CLIPTextConfig(**configs["text"], bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        controlnet = ControlNetModel.from_unet(unet, **configs["controlnet"])
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.to(dtype=torch.float16)
        pipe.save_pretrained(str(root / "diffusion"), safe_serialization=True)
        del pipe, text, unet, vae
        controlnet.to(dtype=torch.float16).save_pretrained(str(root / "controlnet"), safe_serialization=True)
    return {"diffusion": root / "diffusion", "controlnet": root / "controlnet"}


# ============================================================================ the GPU estimate

# The published timing the estimate is scaled from: diffusers' documentation, "Accelerated PyTorch 2.0 support
# in Diffusers", Benchmark section (diffusers 0.17.0.dev0; docs/source/en/optimization/torch2.0.mdx): on an
# NVIDIA A100, batch size 1, fp16, torch 2.0 without torch.compile, runwayml/stable-diffusion-v1-5 at its
# default 512 x 512, "SD - txt2img" runs 21.66 denoising iterations per second and "SD - controlnet" 15.02.
PUBLISHED_GPU = "NVIDIA A100"
PUBLISHED_TXT2IMG_IT_S = 21.66
PUBLISHED_CONTROLNET_IT_S = 15.02
PUBLISHED_REFERENCE = ("diffusers docs 'Accelerated PyTorch 2.0 support in Diffusers' benchmark: A100, fp16, "
                       "batch 1, torch 2.0 without compile, SD 1.5 at 512x512: txt2img 21.66 it/s, "
                       "controlnet 15.02 it/s")


class _LiveBytes:
    """Peak bytes of tensors alive at once while ops run (a dispatch mode; meta tensors have no data, so this
    counts what a device would hold). Weights made before it starts are not counted."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.live = self.peak = 0
                self.refs: dict[int, int] = {}

            def _drop(self, key: int, nbytes: int) -> None:
                self.refs[key] -= 1
                if not self.refs[key]:
                    del self.refs[key]
                    self.live -= nbytes

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import weakref

                import torch
                from torch.utils._pytree import tree_flatten

                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        storage = t.untyped_storage()
                        key, nbytes = storage._cdata, storage.nbytes()
                        if key not in self.refs:
                            self.refs[key] = 0
                            self.live += nbytes
                            self.peak = max(self.peak, self.live)
                        self.refs[key] += 1
                        weakref.finalize(t, self._drop, key, nbytes)
                return out

        return Mode()


def _flash_like_attention(query, key, value, *args, **kwargs):
    """Stands in for scaled_dot_product_attention when counting memory: a memory-efficient kernel holds only
    its output (and a row statistic), never the attention matrix."""
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _meta_models(sd15: bool = False):
    """(unet, controlnet, vae, text encoder) on the meta device: SD 2.1-base's, or SD 1.5's UNet and ControlNet
    (the published timing's model) with vae = text = None."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    c = sd21_base_configs()
    with torch.device("meta"):
        if sd15:
            unet = UNet2DConditionModel(**{**c["unet"], "cross_attention_dim": 768, "attention_head_dim": 8,
                                           "use_linear_projection": False})
            return unet, ControlNetModel.from_unet(unet, **c["controlnet"]), None, None
        unet = UNet2DConditionModel(**c["unet"])
        return (unet, ControlNetModel.from_unet(unet, **c["controlnet"]), AutoencoderKL(**c["vae"]),
                CLIPTextModel(CLIPTextConfig(**c["text"])))


def count_diffusion_costs(width: int, height: int) -> dict[str, float]:
    """FLOPs of each part of one diffusion pass at a width x height working size (SD 2.1-base parts, on the
    meta device: no weights, no arithmetic), the SD 1.5 iterations of the published timing, and activation
    peaks in bytes (fp16) at that size: the tensors alive at once, with attention as a memory-efficient
    kernel holds it (its output only; the meta device would otherwise hold whole attention matrices).
    Classifier-free guidance: UNet and ControlNet at batch 2, the text encoder once for the prompt and once
    for the negative prompt."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def run(fn, *, memory: bool = False) -> float:
        with torch.no_grad():
            if memory:
                sdpa = torch.nn.functional.scaled_dot_product_attention
                torch.nn.functional.scaled_dot_product_attention = _flash_like_attention
                try:
                    with _LiveBytes() as live:
                        fn()
                finally:
                    torch.nn.functional.scaled_dot_product_attention = sdpa
                return float(live.peak)
            with FlopCounterMode(display=False) as counter:
                fn()
        return float(counter.get_total_flops())

    def parts(unet, cn, vae, text, w: int, h: int, dtype, memory: bool) -> dict[str, float]:
        lat = torch.randn(2, 4, h // 8, w // 8, device="meta", dtype=dtype)
        ctx = torch.randn(2, 77, unet.config.cross_attention_dim, device="meta", dtype=dtype)
        ts = torch.tensor([500, 500], device="meta")
        cond = torch.randn(2, 3, h, w, device="meta", dtype=dtype)

        def control_step():
            down, mid = cn(lat, ts, encoder_hidden_states=ctx, controlnet_cond=cond, return_dict=False)
            unet(lat, ts, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                 mid_block_additional_residual=mid)

        out = {"unet_step": run(lambda: unet(lat, ts, encoder_hidden_states=ctx), memory=memory),
               "control_step": run(control_step, memory=memory)}
        if vae is not None:
            image = torch.randn(1, 3, h, w, device="meta", dtype=dtype)
            ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
            out["vae_encode"] = run(lambda: vae.encode(image), memory=memory)
            out["vae_decode"] = run(lambda: vae.decode(lat[:1]), memory=memory)
            out["text"] = 2 * run(lambda: text(ids), memory=memory)
        return out

    from miscnet.core.pretrained import quiet_loading

    with quiet_loading():
        unet, cn, vae, text = _meta_models()
        flops = parts(unet, cn, vae, text, width, height, torch.float32, False)
        half = [m.to(torch.float16) for m in (unet, cn, vae, text)]
        memory = parts(*half, width, height, torch.float16, True)
        weights = sum(p.numel() for m in half for p in m.parameters()) * 2
        sd15_unet, sd15_cn, _, _ = _meta_models(sd15=True)
        sd15 = parts(sd15_unet, sd15_cn, None, None, 512, 512, torch.float32, False)
    costs = {f"{k}_flops": v for k, v in flops.items()}
    costs.update({f"{k}_bytes": v for k, v in memory.items()})
    costs.update(weights_bytes=float(weights), sd15_unet_step_flops=sd15["unet_step"],
                 sd15_control_step_flops=sd15["control_step"])
    return costs


def cpu_side_seconds(width: int, height: int, objects: int = 3, sample: str = "astronaut") -> dict[str, float]:
    """What the diffusion decoder does on the CPU around its model calls, timed here at a width x height
    working size: decoding the pixel reference, compositing an object's pass, the wavelet colour fix, and
    resizing the result to half that size, as for a smaller image (median of 3)."""
    import numpy as np
    from PIL import Image

    from miscnet.core.pixel import decode_pixels
    from miscnet.receiver.diffusion import composite, wavelet_color_fix
    from miscnet.receiver.stages import progressive_stages

    encoded, _ = encode_sample(sample, width, height)
    stage = progressive_stages(encoded)[-1]
    rng = np.random.default_rng(0)
    current = rng.random((height, width, 3), dtype=np.float32)
    generated = rng.random((height, width, 3), dtype=np.float32)
    mask = rng.random((8, 8)) > 0.5

    def median(fn) -> float:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs)

    def resize():
        Image.fromarray((current * 255).astype(np.uint8)).resize((width // 2, height // 2), Image.Resampling.LANCZOS)

    return {"reference": median(lambda: decode_pixels(stage.pixel_levels, width, height)),
            "composite": median(lambda: composite(current, generated, mask)),
            "colour_fix": median(lambda: wavelet_color_fix(current, generated)),
            "resize": median(resize)}


def estimate_diffusion_profile(*, objects: int = 3, steps: int = 40, object_steps: int = 3,
                               working: tuple[int, int] = (1024, 1024),
                               sizes: Iterable[int] = (256, 512, 1024, 2048, 4096),
                               costs: dict[str, float] | None = None,
                               cpu_seconds: dict[str, float] | None = None) -> CostProfile:
    """The diffusion decoder's cost on a GPU of the published timing's class, at MISC's settings (see
    PUBLISHED_REFERENCE and experiments/profiles/README.md).

    Each part's time is its FLOPs (``count_diffusion_costs``) over the effective rate the published timing
    implies for the same kind of work on SD 1.5 at 512 x 512 (UNet steps at the txt2img rate, UNet +
    ControlNet steps at the controlnet rate, VAE and text encoder at the txt2img rate), plus the CPU-side work
    timed here. Stages (restoration by ControlNet, as MISC's DiffBIR; every pass encodes its prompt and
    negative prompt):

    * semantic: text to image, ``steps`` UNet steps, one VAE decode;
    * map: ``objects`` passes of ``object_steps`` ControlNet steps, each with a VAE encode, a VAE decode and a
      composite (the semantic stage's picture is reused, as the decoder caches it);
    * pixel: reference decode, those object passes, one global pass of ``steps`` ControlNet steps, colour fix.

    The decoder works at a long side of 1024 whatever the image's size (MISC's setting), so every size in
    ``sizes`` (square images, side in pixels) costs the same. Peak memory: the fp16 weights of every model
    (all stay on the device) plus the largest activation peak of the stage's parts.
    """
    w, h = working
    c = costs or count_diffusion_costs(w, h)
    cpu = cpu_seconds or cpu_side_seconds(w, h, objects)
    rate_unet = c["sd15_unet_step_flops"] * PUBLISHED_TXT2IMG_IT_S  # effective FLOP/s
    rate_control = c["sd15_control_step_flops"] * PUBLISHED_CONTROLNET_IT_S
    text = c["text_flops"] / rate_unet
    enc, dec = c["vae_encode_flops"] / rate_unet, c["vae_decode_flops"] / rate_unet
    unet_step = c["unet_step_flops"] / rate_unet
    control_step = c["control_step_flops"] / rate_control

    def control_pass(n: int) -> float:
        return text + enc + n * control_step + dec

    obj = objects * (control_pass(object_steps) + cpu["composite"])
    seconds = {"semantic": text + steps * unet_step + dec + cpu["resize"],
               "map": obj + cpu["resize"],
               "pixel": cpu["reference"] + obj + control_pass(steps) + cpu["colour_fix"] + cpu["resize"]}
    weights = c["weights_bytes"]
    peak = {"semantic": max(c["text_bytes"], c["unet_step_bytes"], c["vae_decode_bytes"]),
            "map": max(c["text_bytes"], c["vae_encode_bytes"], c["control_step_bytes"], c["vae_decode_bytes"])}
    peak["pixel"] = peak["map"]
    points = {kind: [(s * s, 1, seconds[kind], (weights + peak[kind]) / 2**20) for s in sorted(set(sizes))]
              for kind in KINDS}
    source = (f"{ESTIMATE_PREFIX} {PUBLISHED_GPU}-class GPU, fp16. Each part's FLOPs, counted on the real "
              f"SD 2.1-base architectures (UNet, ControlNet, VAE, OpenCLIP-H text encoder) on the meta device at "
              f"the decoder's {w}x{h} working size, divided by the effective rate implied by the published "
              f"timing ({PUBLISHED_REFERENCE}); times MISC's step counts: {steps} global steps, {object_steps} "
              f"steps per object x {objects} objects, ControlNet restoration; plus the decoder's CPU-side work "
              f"timed on {machine_description()} on {datetime.date.today().isoformat()}. Replace it with a "
              "GPU measurement: miscnet profile --decoder diffusion --device cuda --random-weights")
    notes = (f"per step at {w}x{h}: UNet {unet_step:.3f} s, UNet+ControlNet {control_step:.3f} s; "
             f"VAE encode {enc:.3f} s, decode {dec:.3f} s, prompt+negative {text:.4f} s; CPU: reference "
             f"{cpu['reference']:.3f} s, composite {cpu['composite']:.3f} s, colour fix {cpu['colour_fix']:.3f} "
             f"s, resize {cpu['resize']:.3f} s. The semantic stage's text to image is reused by the map stage "
             f"(add {seconds['semantic']:.2f} s to a map stage whose semantic stage another decoder rendered). "
             f"Weights {weights / 2**20:.0f} MiB fp16; activations counted on the meta device at {w}x{h} "
             "with memory-efficient attention. Every image size costs the same: the decoder works at a "
             f"{max(w, h)}-pixel long side whatever the image's size.")
    return CostProfile(decoder="diffusion", device="cuda", source=source, estimate=True, points=points, notes=notes)

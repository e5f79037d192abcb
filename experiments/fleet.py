"""Fleets in simulated time: many edge senders, shared links, and a receiver with finite compute.

A fleet scenario (TOML) names groups of senders, the shared links their paths cross, and the receiver::

    name = "cell"
    duration = "120s"            # simulated capture time; the run then drains for `drain` more
    seed = 0

    [encoder]                    # every image is encoded once, before the run
    budget = 1500                # bytes per image (or bpp = 0.03)

    [[group]]
    name = "cameras"
    count = 50
    images = ["astronaut", "coffee"]          # bundled samples, cycled
    arrival = "every 10s"                     # or "poisson 0.1/s", or "file capture_times.txt"
    start = "random"                          # each sender's first capture: uniform in one period; or "0s"
    access = { rate = "64kbit", delay = "20ms" }   # every link option; trace = FILE with trace_offset = "random"
                                              # and trace_rate = "64kbit" (scaled to that mean, fades kept)
    path = ["cell", "backhaul"]               # shared links, in order
    protection = { mode = "arq" }
    pacing = "aimd"                           # each sender paces to its path (channel/pacing.py); or "off"
    radio = "cellular"                        # transmit energy: cellular 438.4 nJ/bit, wifi 283.17 (PureEdgeSim)

    [[link]]
    name = "cell"
    rate = "2mbit"
    discipline = "drr"                        # per-flow fair queue; "fifo" is drop-tail FIFO
    queue = "256kB"

    [receiver]
    workers = 1
    policy = "newest"                         # fifo | newest | edf | semantic-first (receiver/scheduling.py)
    profile = "classical-cpu"                 # a cost profile (experiments/profiles/) or a file
    queue_limit = 1000
    max_batch = 1
    max_wait = "0s"

    [report]
    deadlines = ["2s", "5s", "10s"]

    [sweep]                                   # grid over any key: the cartesian product
    "group.cameras.count" = [1, 10, 100]
    "receiver.policy" = ["newest", "fifo"]

Each sender has its own access link and a stream of its own at the receiver (its own transport state),
and pipelines its images: a capture starts sending at once, whatever is still in flight. Every decoded
stage costs the profile's service time on one of the receiver's workers under the scheduling policy
the live receiver uses. Per image the run reports times from capture to the semantic stage, the first
picture and the last stage, the quality of the newest decoded stage at each deadline, and why an image
failed; per link, utilisation and drops; per worker, utilisation and batches; energy on both sides.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import simpy

from miscnet.channel.link import LinkConfig
from miscnet.channel.link import Path as LinkPath
from miscnet.channel.pacing import PacingConfig, PacingError, SimPacer, pacing_config
from miscnet.channel.packet import Datagram, PacketError
from miscnet.channel.transport import ImageSender, PathEstimate, TransportConfig, TransportReceiver, parse_feedback
from miscnet.channel.units import parse_time
from miscnet.core.errors import MiscError
from miscnet.experiments.sweep import stage_key
from miscnet.receiver.assembly import ImageAssembly
from miscnet.receiver.scheduling import Job

RADIO_NJ_PER_BIT = {"cellular": 438.4, "wifi": 283.17}  # PureEdgeSim's transmit energy defaults
DRAIN_S = 60.0  # after the last capture, the run goes on this long so images in flight can finish


class FleetError(MiscError):
    """A fleet scenario that cannot be run: the message names the file and the key."""


# ---------------------------------------------------------------- the scenario

@dataclass(frozen=True)
class Arrivals:
    kind: str  # "every", "poisson", "times"
    value: float = 0.0  # period (every) or rate per second (poisson)
    times: tuple[float, ...] = ()

    def capture_times(self, rng: np.random.Generator, start: float, until: float) -> list[float]:
        if self.kind == "times":
            return [start + t for t in self.times if start + t < until]
        out, t = [], start
        while t < until:
            out.append(t)
            t += self.value if self.kind == "every" else rng.exponential(1.0 / self.value)
        return out

    @property
    def period(self) -> float:
        return self.value if self.kind == "every" else 1.0 / self.value if self.kind == "poisson" else 0.0


@dataclass(frozen=True)
class Group:
    name: str
    count: int
    images: tuple[str, ...]
    arrivals: Arrivals
    start: str | float  # "random" or seconds
    access: LinkConfig
    random_trace_offset: bool
    path: tuple[str, ...]
    transport: TransportConfig
    nj_per_bit: float
    pacing: PacingConfig | None = field(default_factory=PacingConfig)  # None: datagrams go out at once


@dataclass(frozen=True)
class ComputeSpec:
    workers: int = 1
    policy: str = "newest"
    profile: str = "classical-cpu"
    queue_limit: int | None = None
    max_batch: int = 1
    max_wait_s: float = 0.0
    busy_power_w: float = 300.0
    idle_power_w: float = 50.0


@dataclass(frozen=True)
class FleetSpec:
    name: str
    source: str  # the file, for messages
    duration_s: float
    seed: int
    budget_bytes: int
    groups: tuple[Group, ...]
    links: dict[str, LinkConfig]
    receiver: ComputeSpec
    reverse: LinkConfig | None
    deadlines: tuple[float, ...]
    sweep: dict[str, list]
    raw: dict = field(repr=False, compare=False, default_factory=dict)


_TOP = {"name", "description", "duration", "drain", "seed", "encoder", "group", "link", "receiver", "reverse",
        "report", "sweep"}
_GROUP = {"name", "count", "images", "arrival", "start", "access", "path", "protection", "radio", "pacing"}
_LINK_KEYS = {"rate", "trace", "delay", "jitter", "loss", "queue", "reorder", "discipline", "trace_offset",
              "trace_rate", "outage"}
_RECEIVER = {"workers", "policy", "profile", "queue_limit", "max_batch", "max_wait", "busy_power", "idle_power"}
_PROTECTION = {"mode", "mtu", "fec_strong_rate", "fec_pixel_rate", "max_rounds", "deadline"}


def _check_keys(where: str, table: Any, allowed: set[str]) -> dict:
    if not isinstance(table, dict):
        raise FleetError(f"{where}: expected a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise FleetError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    return table


def _time(where: str, value: Any) -> float:
    try:
        return float(value) if isinstance(value, int | float) else parse_time(str(value))
    except (MiscError, ValueError) as exc:
        raise FleetError(f"{where}: {exc}") from None


def _arrivals(where: str, text: Any, base: Path) -> Arrivals:
    parts = str(text).split()
    try:
        if parts[0] == "every" and len(parts) == 2:
            period = parse_time(parts[1])
            if period > 0:
                return Arrivals("every", period)
        if parts[0] == "poisson" and len(parts) == 2 and parts[1].endswith("/s"):
            rate = float(parts[1][:-2])
            if rate > 0:
                return Arrivals("poisson", rate)
        if parts[0] == "file" and len(parts) == 2:
            path = base / parts[1]
            times = tuple(sorted(float(line) for line in path.read_text().split() if line.strip()))
            if times and times[0] >= 0:
                return Arrivals("times", times=times)
    except (OSError, ValueError, MiscError, IndexError) as exc:
        raise FleetError(f"{where}: {exc}") from None
    raise FleetError(f"{where}: {text!r} is not 'every 10s', 'poisson 0.1/s' or 'file TIMES.txt'")


def trace_dirs(base: Path) -> list[Path]:
    """Where a scenario's trace file names are looked for, in order: beside the scenario, $MISCNET_TRACES,
    and the workplace's shared/traces beside the checkout (Mahimahi's traces are GPL data, not committed)."""
    import os

    dirs = [base]
    if os.environ.get("MISCNET_TRACES"):
        dirs.append(Path(os.environ["MISCNET_TRACES"]))
    dirs.append(Path(__file__).resolve().parents[2] / "shared" / "traces")
    return dirs


def find_trace(where: str, name: str, base: Path) -> Path:
    tried = [d / name for d in trace_dirs(base)]
    for path in tried:
        if path.is_file():
            return path
    raise FleetError(f"{where}.trace: no file {name!r} (tried {', '.join(str(p) for p in tried)}; "
                     "set MISCNET_TRACES to the folder holding it)")


def _link(where: str, table: dict, name: str, base: Path) -> tuple[LinkConfig, bool]:
    table = dict(_check_keys(where, table, _LINK_KEYS | {"name"}))
    table.pop("name", None)
    offset = table.pop("trace_offset", 0)
    random_offset = offset == "random"
    discipline = table.pop("discipline", "fifo")
    if "trace" in table:
        table["trace"] = str(find_trace(where, str(table["trace"]), base))
    if "outage" in table:  # a file, relative to the fleet file
        table["outage"] = str(base / table["outage"])
    if "queue" in table and isinstance(table["queue"], int):
        table["queue"] = str(table["queue"])
    try:
        link = LinkConfig.from_strings(name=name, **{k: str(v) for k, v in table.items()})
        changes: dict[str, Any] = {}
        if discipline != "fifo":
            changes["discipline"] = discipline
        if not random_offset and offset:
            changes["trace_offset_s"] = _time(f"{where}.trace_offset", offset)
        return (link.with_(**changes) if changes else link), random_offset
    except (MiscError, TypeError) as exc:
        raise FleetError(f"{where}: {exc}") from None


def parse_fleet(raw: dict, source: str, base: Path) -> FleetSpec:
    """A FleetSpec from a parsed TOML table; FleetError naming ``source`` and the key for anything wrong."""
    _check_keys(source, raw, _TOP)
    links = {}
    for k, table in enumerate(raw.get("link", [])):
        name = table.get("name") if isinstance(table, dict) else None
        if not isinstance(name, str) or not name:
            raise FleetError(f"{source}: link[{k}]: every shared link needs a name")
        links[name] = _link(f"{source}: link.{name}", table, name, base)[0]
    groups = []
    for k, table in enumerate(raw.get("group", [])):
        where = f"{source}: group[{k}]"
        _check_keys(where, table, _GROUP)
        name = str(table.get("name", f"group{k}"))
        where = f"{source}: group.{name}"
        count = table.get("count", 1)
        if not isinstance(count, int) or count < 1:
            raise FleetError(f"{where}.count: a whole number >= 1, not {count!r}")
        images = table.get("images")
        if not images or not isinstance(images, list):
            raise FleetError(f"{where}.images: list the images this group sends (bundled sample names)")
        for hop in table.get("path", []):
            if hop not in links:
                raise FleetError(f"{where}.path: no [[link]] named {hop!r} (defined: {', '.join(links) or 'none'})")
        access, random_offset = _link(f"{where}.access", table.get("access", {"rate": "64kbit"}), f"{name}-access",
                                      base)
        protection = dict(_check_keys(f"{where}.protection", table.get("protection", {}), _PROTECTION))
        if "deadline" in protection:
            protection["deadline_s"] = _time(f"{where}.protection.deadline", protection.pop("deadline"))
        for rate in ("fec_strong_rate", "fec_pixel_rate"):
            if rate in protection:
                protection[rate.removeprefix("fec_")] = protection.pop(rate)
        try:
            transport = TransportConfig(**protection)
        except (MiscError, TypeError) as exc:
            raise FleetError(f"{where}.protection: {exc}") from None
        radio = table.get("radio", "cellular")
        nj = RADIO_NJ_PER_BIT.get(radio) if isinstance(radio, str) else float(radio)
        if nj is None:
            raise FleetError(f"{where}.radio: {radio!r} is not cellular, wifi or a number of nJ/bit")
        start = table.get("start", "random")
        start = start if start == "random" else _time(f"{where}.start", start)
        try:
            pacing = pacing_config(table.get("pacing", "aimd"))
        except PacingError as exc:
            raise FleetError(f"{where}.pacing: {exc}") from None
        groups.append(Group(name, count, tuple(images), _arrivals(f"{where}.arrival", table.get("arrival", "every 10s"),
                                                                   base),
                            start, access, random_offset, tuple(table.get("path", [])), transport, float(nj),
                            pacing))
    if not groups:
        raise FleetError(f"{source}: no [[group]] of senders")
    rx = _check_keys(f"{source}: receiver", raw.get("receiver", {}), _RECEIVER)
    try:
        receiver = ComputeSpec(workers=int(rx.get("workers", 1)), policy=str(rx.get("policy", "newest")),
                               profile=str(rx.get("profile", "classical-cpu")), queue_limit=rx.get("queue_limit"),
                               max_batch=int(rx.get("max_batch", 1)),
                               max_wait_s=_time(f"{source}: receiver.max_wait", rx.get("max_wait", 0)),
                               busy_power_w=float(rx.get("busy_power", 300.0)),
                               idle_power_w=float(rx.get("idle_power", 50.0)))
    except (TypeError, ValueError) as exc:
        raise FleetError(f"{source}: receiver: {exc}") from None
    if receiver.workers < 1 or receiver.max_batch < 1:
        raise FleetError(f"{source}: receiver: workers and max_batch must be >= 1")
    from miscnet.receiver.scheduling import POLICIES

    if receiver.policy not in POLICIES:
        raise FleetError(f"{source}: receiver.policy: {receiver.policy!r} is not one of {', '.join(POLICIES)}")
    encoder = _check_keys(f"{source}: encoder", raw.get("encoder", {}), {"budget"})
    report = _check_keys(f"{source}: report", raw.get("report", {}), {"deadlines"})
    deadlines = tuple(_time(f"{source}: report.deadlines", d) for d in report.get("deadlines", ["5s", "10s"]))
    reverse = None
    if "reverse" in raw:
        reverse = _link(f"{source}: reverse", raw["reverse"], "downlink", base)[0]
    sweep = raw.get("sweep", {})
    if not isinstance(sweep, dict):
        raise FleetError(f"{source}: sweep: expected a table")
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise FleetError(f"{source}: sweep.{key!r}: a non-empty list of values")
    return FleetSpec(str(raw.get("name", Path(source).stem)), source, _time(f"{source}: duration",
                                                                             raw.get("duration", "60s")),
                     int(raw.get("seed", 0)), int(encoder.get("budget", 1500)), tuple(groups), links, receiver,
                     reverse, deadlines, dict(sweep), raw)


def load_fleet(path: str | Path) -> FleetSpec:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise FleetError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise FleetError(f"{path.name}: not valid TOML: {exc}") from None
    spec = parse_fleet(raw, path.name, path.parent)
    for point in sweep_points(spec):  # every grid point must parse before any work
        point_spec(spec, point, path.parent)
    return spec


def sweep_points(spec: FleetSpec) -> list[dict[str, Any]]:
    keys = list(spec.sweep)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(spec.sweep[k] for k in keys))]


def point_spec(spec: FleetSpec, overrides: dict[str, Any], base: Path) -> FleetSpec:
    """The scenario with one grid point's values set (keys like "group.cameras.count", "receiver.workers")."""
    raw = copy.deepcopy(spec.raw)
    raw.pop("sweep", None)
    for key, value in overrides.items():
        parts = key.split(".")
        table = raw
        if parts[0] in ("group", "link") and len(parts) >= 3:
            named = [t for t in raw.get(parts[0], []) if t.get("name") == parts[1]]
            if not named:
                raise FleetError(f"{spec.source}: sweep.{key!r}: no {parts[0]} named {parts[1]!r}")
            table, parts = named[0], parts[2:]
        for part in parts[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise FleetError(f"{spec.source}: sweep.{key!r}: {part!r} is not a table")
        table[parts[-1]] = value
    return parse_fleet(raw, f"{spec.source} [{point_id(overrides)}]", base)


def point_id(overrides: dict[str, Any]) -> str:
    if not overrides:
        return "base"
    text = json.dumps(overrides, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# ---------------------------------------------------------------- the images

@dataclass
class FleetImage:
    """One encoded image and the quality of every stage a receiver can make of it (decoded once, before)."""

    name: str
    encoded: Any
    quality: dict[str, tuple[float, float]]  # sweep.stage_key(stage layers) -> (PSNR, MS-SSIM); pixel stages


def prepare_images(names: set[str], budget: int) -> dict[str, FleetImage]:
    from miscnet.core.config import EncoderConfig
    from miscnet.core.image_io import load_image
    from miscnet.core.samples import sample_image_path, sample_sidecar_path
    from miscnet.core.semantics import load_semantics
    from miscnet.experiments.sweep import quality_table
    from miscnet.receiver.classical import ClassicalDecoder
    from miscnet.sender.encoder import encode_image

    decoder, out = ClassicalDecoder(), {}
    for name in sorted(names):
        image = load_image(sample_image_path(name))
        sem, _ = load_semantics(sample_sidecar_path(name))
        encoded = encode_image(image, sem, EncoderConfig(budget_bytes=budget)).encoded
        out[name] = FleetImage(name, encoded, quality_table(encoded, image, decoder))
    return out


# ---------------------------------------------------------------- the run

@dataclass
class _Capture:
    sender: int
    group: str
    image: FleetImage
    image_id: int
    captured: float
    done_at: float | None = None  # transport complete
    state: str = "sending"
    failure: str = ""
    wire_bytes: int = 0
    # stages as made, by index: (sweep.stage_key of its layers, has pixels). Not by name: with block 0
    # late, a "pixel.1" stage is made twice (without, then with the semantic layers)
    stages: list[tuple[str, bool]] = field(default_factory=list)
    final: int | None = None  # index of the stage made when the image completed
    decoded: dict[int, float] = field(default_factory=dict)  # stage index -> decode end
    dropped: dict[int, str] = field(default_factory=dict)  # stage index -> reason


def run_fleet(spec: FleetSpec, images: dict[str, FleetImage], drain_s: float = DRAIN_S) -> dict:
    """Simulate the fleet; returns {"rows": per-image dicts, "summary": ..., "links": ..., "workers": ...}."""
    from miscnet.experiments.compute import ComputeConfig, ComputeModel
    from miscnet.experiments.profiles import load_profile

    env = simpy.Environment()
    shared = {name: cfg.build(env, random_stream(spec.seed, SHARED_LINKS, j), shared=True)
              for j, (name, cfg) in enumerate(spec.links.items())}
    profile = load_profile(spec.receiver.profile)
    captures: list[_Capture] = []
    r = spec.receiver

    def on_done(job: Job, start: float, end: float, worker: int) -> None:
        job.payload.decoded[job.index] = end

    def on_drop(job: Job, reason: str, t: float) -> None:
        job.payload.dropped[job.index] = reason

    compute = ComputeModel(env, ComputeConfig(workers=r.workers, policy=r.policy, queue_limit=r.queue_limit,
                                              max_batch=r.max_batch, max_wait_s=r.max_wait_s,
                                              busy_power_w=r.busy_power_w, idle_power_w=r.idle_power_w),
                           profile, on_done, on_drop)
    flows = []
    sender_index = 0
    deadline_max = max(spec.deadlines) if spec.deadlines else None
    for group in spec.groups:
        for n in range(group.count):
            flows.append(_Sender(env, spec, group, sender_index, n, shared, images, compute, captures,
                                 deadline_max))
            sender_index += 1
    series = _LinkSeries(env, shared, flows, spec.duration_s + drain_s)
    env.run(until=spec.duration_s + drain_s)
    end = env.now
    result = _report(spec, captures, flows, shared, compute, end)
    result["series"] = series.table()
    return result


class _LinkSeries:
    """Per link over time, in bins: utilisation, backlog delay (how long a packet arriving at the bin's end
    would wait before it starts to leave: the port's ``busy_until`` ahead of now) and queue drops. Shared
    links one by one; the access links as their mean (delay also as the largest)."""

    BINS = 200  # a few hundred points draw a clear curve; each costs one pass over the links

    def __init__(self, env, shared: dict, flows: list, span_s: float):
        self.env, self.shared, self.flows = env, shared, flows
        self.bin_s = max(1.0, span_s / self.BINS)
        self.t: list[float] = []
        self.rows: dict[str, dict[str, list]] = {
            name: {"utilization": [], "queue_delay_ms": [], "drops": []} for name in [*shared, "access"]}
        self.rows["access"]["queue_delay_max_ms"] = []
        self._last = {name: (0, 0) for name in self.rows}
        env.process(self._sample())

    def _add(self, name: str, delivered: int, dropped: int, capacity_bps: float, delay_s: float) -> None:
        last_delivered, last_dropped = self._last[name]
        self._last[name] = (delivered, dropped)
        row = self.rows[name]
        row["utilization"].append(round((delivered - last_delivered) * 8 / (capacity_bps * self.bin_s), 4)
                                  if capacity_bps else None)
        row["queue_delay_ms"].append(round(delay_s * 1e3, 3))
        row["drops"].append(dropped - last_dropped)

    def _sample(self):
        env = self.env
        while True:
            yield env.timeout(self.bin_s)
            now = env.now
            self.t.append(round(now, 6))
            for name, link in self.shared.items():
                self._add(name, link.bytes_delivered, link.packets_dropped_queue, link.capacity_bps(),
                          max(0.0, link.busy_until - now))
            if self.flows:
                delays = [max(0.0, f.access.busy_until - now) for f in self.flows]
                self._add("access", sum(f.access.bytes_delivered for f in self.flows),
                          sum(f.access.packets_dropped_queue for f in self.flows),
                          sum(f.access.capacity_bps() for f in self.flows), sum(delays) / len(delays))
                self.rows["access"]["queue_delay_max_ms"].append(round(max(delays) * 1e3, 3))

    def table(self) -> dict:
        return {"t_s": self.t, "bin_s": self.bin_s, "links": self.rows}


# Random streams. Sender k's access link draws from SeedSequence(seed, spawn_key=(2k,)) and its reverse link
# from (2k + 1,): for sender 0 exactly simulate's forward and reverse streams (default_rng(seed).spawn(2)),
# so a fleet of one sender gives simulate's numbers, loss included. Everything else a sender draws (start,
# Poisson gaps, trace offset) and the shared links have streams of their own entropy.
SENDER_CHOICES, SHARED_LINKS = 1, 2


def random_stream(seed: int, tag: int, k: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, tag], spawn_key=(k,)))


def _link_stream(seed: int, k: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k,)))


class _Sender:
    """One edge device: its captures, its access link + the shared links, its stream at the receiver."""

    def __init__(self, env, spec: FleetSpec, group: Group, index: int, n: int, shared, images, compute,
                 captures: list, deadline_max: float | None):
        self.env, self.spec, self.group, self.index = env, spec, group, index
        self.compute, self.captures, self.deadline_max = compute, captures, deadline_max
        self.rng = random_stream(spec.seed, SENDER_CHOICES, index)
        access = group.access
        if group.random_trace_offset and access.offset_period_s():  # the trace's period, else the outages'
            access = access.with_(trace_offset_s=float(self.rng.uniform(0, access.offset_period_s())))
        link_rng, reverse_rng = _link_stream(spec.seed, 2 * index), _link_stream(spec.seed, 2 * index + 1)
        self.access = access.build(env, link_rng)
        self.path = LinkPath(env, [self.access, *(shared[h] for h in group.path)], self._on_forward,
                             name=f"{group.name}{n}")
        hops = [access, *(spec.links[h] for h in group.path)]
        reverse = spec.reverse or LinkConfig(rate_bps=1e6, delay_s=sum(h.delay_s for h in hops), name="downlink")
        self.reverse = reverse.build(env, reverse_rng, self._on_reverse)
        self.receiver = TransportReceiver(max_images=256)
        self.assemblies: dict[int, tuple[_Capture, ImageAssembly]] = {}
        self.inboxes: dict[int, simpy.Store] = {}
        self.in_flight: dict[int, _Capture] = {}  # by image id, until the receiver has the whole image
        self.bytes_sent = 0
        # one pacer per sender, across all its images in flight (None: straight to the path)
        self.pacer = None if group.pacing is None else SimPacer(env, group.pacing, self._to_path)
        self.estimate = PathEstimate()  # what the transport learns of the path, shared by this device's images
        start = group.start if group.start != "random" else float(self.rng.uniform(0, group.arrivals.period or 1.0))
        self.times = group.arrivals.capture_times(self.rng, start, spec.duration_s)
        self.names = [group.images[(index + k) % len(group.images)] for k in range(len(self.times))]
        self.images = images
        env.process(self._captures())

    def _captures(self):
        for k, (t, name) in enumerate(zip(self.times, self.names, strict=True)):
            if t > self.env.now:
                yield self.env.timeout(t - self.env.now)
            cap = _Capture(self.index, self.group.name, self.images[name], k & 0xFFFF, self.env.now)
            self.captures.append(cap)
            self.in_flight[cap.image_id] = cap
            self.env.process(self._send(cap))

    def _send(self, cap: _Capture):
        env = self.env
        sender = ImageSender(cap.image_id, cap.image.encoded, self.group.transport, path=self.estimate)
        inbox = self.inboxes[cap.image_id] = simpy.Store(env)
        self._out(cap, sender.start(env.now))
        get = inbox.get()
        while not sender.finished:
            wait = max(0.0, (sender.timer_at or env.now) - env.now)
            fired = yield get | env.timeout(wait)
            if get in fired:
                self._out(cap, sender.on_feedback(fired[get], env.now))
                get = inbox.get()
            else:
                self._out(cap, sender.on_timer(env.now))
        self.inboxes.pop(cap.image_id, None)
        cap.state, cap.failure = sender.state, sender.failure

    def _out(self, cap: _Capture, datagrams) -> None:
        datagrams = list(datagrams)
        for dg in datagrams:
            cap.wire_bytes += dg.size
        if self.pacer is None:
            for dg in datagrams:
                self._to_path(dg)
        else:
            self.pacer.send(datagrams)

    def _to_path(self, dg: Datagram) -> None:
        dg.flow = self.index
        self.bytes_sent += dg.size  # the pacer's probes included
        self.path.send(dg)

    def _on_forward(self, dg: Datagram) -> None:
        received = self.receiver.on_datagram(dg.data)
        for fb in received.feedback:
            self.reverse.send(Datagram(fb, "feedback", dg.image_id, self.index))
        if not received.arrivals:
            return
        image_id = received.image_id
        entry = self.assemblies.get(image_id)
        if entry is None:
            cap = self.in_flight.get(image_id)
            if cap is None:
                return
            entry = self.assemblies[image_id] = (cap, ImageAssembly(received.arrivals[0].header))
        cap, assembly = entry
        stage = assembly.add(*(a.layer for a in received.arrivals))
        if stage is not None:
            cap.stages.append((stage_key(stage.layers), stage.has_pixels))
        if assembly.complete:
            cap.done_at, cap.final = self.env.now, len(cap.stages) - 1
            del self.assemblies[image_id]
            self.in_flight.pop(image_id, None)
        if stage is not None:
            deadline = None if self.deadline_max is None else cap.captured + self.deadline_max
            # an image's first stage with both the semantic and the map layer runs both passes (a diffusion
            # decoder's text to image, then the objects); it is costed as such, not as a map stage alone
            name = stage.name
            if len(cap.stages) == 1 and name == "map" and "semantic" in stage.layers:
                name = "semantic+map"
            self.compute.submit(Job(key=f"{self.index}/{cap.captured:.9f}", index=len(cap.stages) - 1,
                                    stage=name, pixels=stage.width * stage.height, arrived=self.env.now,
                                    deadline=deadline, has_pixels=stage.has_pixels, payload=cap))

    def _on_reverse(self, dg: Datagram) -> None:
        if self.pacer is not None and self.pacer.on_feedback(dg.data):
            return  # the answer to a pacing probe
        try:
            image_id, feedback = parse_feedback(dg.data)
        except PacketError:
            return
        inbox = self.inboxes.get(image_id)
        if inbox is not None:
            inbox.put(feedback)


# ---------------------------------------------------------------- what a run reports

def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _row(spec: FleetSpec, cap: _Capture, end: float) -> dict:
    rel = {i: t - cap.captured for i, t in cap.decoded.items()}
    semantic_s = min((t for i, t in rel.items() if not cap.stages[i][1]), default=None)
    picture_s = min((t for i, t in rel.items() if cap.stages[i][1]), default=None)
    last_s = rel.get(cap.final) if cap.final is not None else None
    row = {"group": cap.group, "sender": cap.sender, "image": cap.image.name, "captured_s": round(cap.captured, 6),
           "wire_bytes": cap.wire_bytes, "complete": cap.done_at is not None,
           "delivered_s": None if cap.done_at is None else cap.done_at - cap.captured,
           "semantic_s": semantic_s, "first_picture_s": picture_s, "last_stage_s": last_s,
           "stages": len(cap.stages), "stages_decoded": len(cap.decoded),
           "sender_state": cap.state, "failure": _failure(spec, cap, last_s)}
    for d in spec.deadlines:
        newest = max((i for i, t in rel.items() if t <= d), default=None)
        key = cap.stages[newest][0] if newest is not None else None
        psnr, msssim = cap.image.quality.get(key, (None, None))  # a stage without pixels has no PSNR
        row[f"psnr_at_{d:g}s"] = psnr  # the newest stage decoded by the deadline (none yet: empty)
        row[f"ms_ssim_at_{d:g}s"] = msssim
    return row


def _failure(spec: FleetSpec, cap: _Capture, last_s: float | None) -> str:
    if last_s is not None:
        if spec.deadlines and last_s > max(spec.deadlines):
            return "deadline missed"
        return ""
    if cap.done_at is None:
        if cap.state in ("failed", "unconfirmed"):
            return "lost on the channel"
        return "unfinished at the end of the run"
    reason = cap.dropped.get(cap.final)
    if reason == "rejected":
        return "rejected by the receiver's queue"
    if reason == "deadline":
        return "deadline missed (dropped from the queue)"
    if reason:
        return f"stage {reason}"
    return "unfinished at the end of the run (decode queue)"


def summarize_rows(rows: list[dict], deadlines: tuple[float, ...], senders: int) -> dict:
    """The per-image rows in summary keys (shared by simulated and live fleets, ``loadgen``): counts,
    p50/p95 times to the first picture and the last stage, failures by reason, shares by each deadline."""
    n = len(rows)
    pictures = [r["first_picture_s"] for r in rows if r["first_picture_s"] is not None]
    lasts = [r["last_stage_s"] for r in rows if r["last_stage_s"] is not None]
    failures: dict[str, int] = {}
    for r in rows:
        if r["failure"]:
            failures[r["failure"]] = failures.get(r["failure"], 0) + 1
    summary = {"senders": senders, "images": n, "complete": sum(bool(r["complete"]) for r in rows),
               "first_picture_p50_s": _percentile(pictures, 50), "first_picture_p95_s": _percentile(pictures, 95),
               "last_stage_p50_s": _percentile(lasts, 50), "last_stage_p95_s": _percentile(lasts, 95),
               "failures": failures}
    for d in deadlines:
        summary[f"first_picture_by_{d:g}s"] = sum(1 for p in pictures if p <= d) / n if n else None
        summary[f"last_stage_by_{d:g}s"] = sum(1 for p in lasts if p <= d) / n if n else None
    return summary


def _report(spec: FleetSpec, captures: list[_Capture], flows: list[_Sender], shared: dict, compute, end: float) -> dict:
    rows = [_row(spec, c, end) for c in captures if c.captured < spec.duration_s]
    summary = summarize_rows(rows, spec.deadlines, len(flows))
    span = spec.duration_s
    links = {}
    for name, link in shared.items():
        cap_bps = link.capacity_bps()
        links[name] = {"utilization": link.bytes_delivered * 8 / (cap_bps * end) if cap_bps else None,
                       "packets_dropped_queue": link.packets_dropped_queue, "packets_lost": link.packets_lost,
                       "bytes_delivered": link.bytes_delivered}
    access_util = [f.access.bytes_delivered * 8 / (f.access.capacity_bps() * end) for f in flows]
    links["access (mean)"] = {"utilization": float(np.mean(access_util)) if access_util else None,
                              "packets_dropped_queue": sum(f.access.packets_dropped_queue for f in flows),
                              "packets_lost": sum(f.access.packets_lost for f in flows)}
    energy_tx = sum(f.bytes_sent * 8 * f.group.nj_per_bit * 1e-9 for f in flows)
    workers = compute.stats(end)
    summary.update(sender_energy_j=energy_tx, receiver_energy_j=workers.get("energy_j"), duration_s=span,
                   run_s=end, packets=sum(f.path.packets_sent + f.reverse.packets_sent for f in flows))
    return {"rows": rows, "summary": summary, "links": links, "workers": workers}




# ---------------------------------------------------------------- sweeps, files and figures

_IMAGES: dict[tuple, dict[str, FleetImage]] = {}  # per process: points of one sweep share their images


def _run_point(spec: FleetSpec, overrides: dict[str, Any], base: str) -> dict:
    point = point_spec(spec, overrides, Path(base))
    names = {name for group in point.groups for name in group.images}
    key = (tuple(sorted(names)), point.budget_bytes)
    if key not in _IMAGES:
        _IMAGES[key] = prepare_images(names, point.budget_bytes)
    result = run_fleet(point, _IMAGES[key])
    result["overrides"] = overrides
    return result


def run_fleet_sweep(spec: FleetSpec, base: Path, out: Path, *, workers: int = 1, dask=None, resume: bool = False,
                    progress: bool = True) -> list[dict]:
    """Every grid point of ``spec``; each point's result is written as it finishes (``--resume`` skips
    the points already written). ``workers``: local processes; ``dask``: a Dask scheduler address or
    Client (the sweep's executors, sweep.make_executor). Returns the results in grid order."""
    from miscnet.core.image_io import atomic_write_bytes
    from miscnet.experiments.sweep import make_executor

    out = Path(out)
    points_dir = out / "points"
    points_dir.mkdir(parents=True, exist_ok=True)
    plan = sweep_points(spec) or [{}]
    done: dict[str, dict] = {}
    if resume:
        for overrides in plan:
            path = points_dir / f"{point_id(overrides)}.json"
            if path.exists():
                try:
                    done[point_id(overrides)] = json.loads(path.read_text())
                except (OSError, ValueError):
                    pass  # unreadable: run it again
    todo = [o for o in plan if point_id(o) not in done]

    def keep(result: dict) -> None:
        pid = point_id(result["overrides"])
        atomic_write_bytes(points_dir / f"{pid}.json", json.dumps(result).encode())
        done[pid] = result

    bar = _bar(len(plan), len(done), progress)
    executor = make_executor(min(workers, max(1, len(todo))) if dask is None else None, dask)
    try:
        for overrides in todo:
            executor.submit(_run_point, spec, overrides, str(base))
        while len(done) < len(plan):
            for _future, result in executor.wait_any():
                keep(result)
                bar.update()
    finally:
        executor.close()
        bar.close()
    results = [done[point_id(o)] for o in plan]
    write_outputs(spec, results, out)
    return results


def rows_csv(rows: list[dict]) -> str:
    import csv
    import io

    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def _bar(total: int, initial: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="point", desc="fleet", leave=False, disable=not show)


def write_outputs(spec: FleetSpec, results: list[dict], out: Path) -> None:
    """results.csv (one row per image, the point's values first), summary.json, links.csv (per link and time
    bin: utilisation, backlog delay, drops), and the figures."""
    from miscnet.core.image_io import atomic_write_bytes

    keys = list(spec.sweep)
    rows = [{**{k: r["overrides"].get(k) for k in keys}, "point": point_id(r["overrides"]), **row}
            for r in results for row in r["rows"]]
    atomic_write_bytes(out / "results.csv", rows_csv(rows).encode())
    summary = [{"point": point_id(r["overrides"]), **r["overrides"], **r["summary"], "links": r["links"],
                "workers": r["workers"]} for r in results]
    atomic_write_bytes(out / "summary.json", json.dumps({"scenario": spec.name, "points": summary}, indent=1).encode())
    link_rows = []
    for r in results:
        series = r.get("series") or {"t_s": [], "links": {}}
        for name, cols in series["links"].items():
            for k, t in enumerate(series["t_s"]):
                link_rows.append({**{key: r["overrides"].get(key) for key in keys}, "point": point_id(r["overrides"]),
                                  "link": name, "t_s": t, **{c: v[k] for c, v in cols.items()}})
    atomic_write_bytes(out / "links.csv", rows_csv(link_rows).encode())
    if results and keys:
        from miscnet.experiments.fleet_plots import fleet_figures, link_figure

        fleet_figures(spec, summary, out)
        link_figure(results, out)

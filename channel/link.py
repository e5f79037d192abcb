"""Links and paths in SimPy, built from the elements of ``channel/elements.py``.

A ``Link`` is one hop, one direction: ``[Loss] -> Port (drop-tail queue + rate) -> [Loss] -> [Reorder] ->
Wire (delay + jitter)``; the loss sits after the rate limiter by default and before the queue with
``loss_before_queue=True``. A ``Path`` chains links for one flow (edge access link -> shared cell ->
backhaul) and delivers at its end; a link built with ``shared=True`` may sit on the paths of several flows:
their packets queue FIFO together in its port (or, with ``discipline="drr"``, in one queue per
``packet.flow`` served by deficit round robin: ``DrrPort``) and each leaves to its own flow's next link or
``deliver``. ``DuplexConfig`` builds a forward and a reverse (feedback) direction with their own
parameters. Everything works on any ``simpy.Environment``, including
``simpy.rt.RealtimeEnvironment(strict=False)`` for live nodes: it only reads ``env.now`` and schedules
events, and it must be driven from the simulation's thread (SimPy is not thread-safe).

Semantics and the tools they follow are described with each element (``Port``: netem's rate recursion
and mm-link's traces and drop-tail queue; ``Loss``: netem's loss models, a fade in time and an outage
file, both looked up at the packet's time there; ``Wire``: netem's uniform jitter,
never reordering; ``Reorder``: netem's ``reorder``). In short, per link:

- a lost packet after the rate limiter has used the bottleneck, as a frame lost on the air has used
  airtime (the order of Pantheon/Mahimahi's ``mm-delay D mm-loss uplink L mm-link up down``);
  ``loss_before_queue=True`` gives netem's order (lost packets take neither queue nor rate);
- ``Link.send`` returns False when the link's queue had no room; a loss in the network returns True.

Cost: departure and arrival times are computed when a packet is sent (queues are FIFO, so nothing later
can change them). A single link, and a chain of private links, cost one SimPy event per delivered packet;
a shared link costs one more event per packet where it is entered from an earlier link (the flows' times
must be merged in time order there), and a reordering link one where it hands on to a next link. A drr
link cannot know departures ahead (later arrivals of other flows change them): it takes packets at their
arrival (a gate before it where an earlier link feeds it) and costs one more event per departure.

Randomness: a link spawns its generator into two streams, loss first, jitter second (a link without
reordering spawns nothing else, so its draws are what they always were); a reordering link spawns a third
stream after those two for the reorder decisions. A path of n > 1 links spawns n streams, one per link;
a one-link path uses its generator as that link would.

Stats count each packet when its fate is computed; ``packets_delivered`` counts packets when the link hands
them on: at their arrival time where a gate stands at the link's end (the end of a path, before a shared
link, after a reordering link), else when computed (a private next link takes them at once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path as FilePath
from typing import Any

import numpy as np
import simpy

from miscnet.channel.elements import (
    DrrPort,
    Exit,
    Gate,
    Loss,
    Packet,
    Port,
    Reorder,
    ResequencingGate,
    Wire,
    event_at,
)
from miscnet.channel.errors import LinkConfigError
from miscnet.channel.loss import LossModel, Outages
from miscnet.channel.trace import Trace
from miscnet.channel.units import parse_loss, parse_rate, parse_reorder, parse_size, parse_time

__all__ = ["DuplexConfig", "DuplexLink", "Link", "LinkConfig", "LinkSpec", "Packet", "Path", "PathConfig", "saturate"]

DEFAULT_REVERSE_RATE = "1mbit"  # feedback (NACKs, acks) is tiny; 1 Mbit/s keeps it from being the bottleneck
DISCIPLINES = ("fifo", "drr")  # a port's queueing: one drop-tail FIFO, or deficit round robin per flow


def _check_discipline(discipline: str, quantum_bytes: int, name: str) -> None:
    if discipline not in DISCIPLINES:
        raise LinkConfigError(f"{name}: discipline must be one of {', '.join(DISCIPLINES)}, got {discipline!r}")
    if isinstance(quantum_bytes, bool) or int(quantum_bytes) != quantum_bytes or quantum_bytes < 1:
        raise LinkConfigError(f"{name}: quantum_bytes must be a whole number >= 1, got {quantum_bytes!r}")


class Link:
    """One hop, one direction. With ``deliver``: ``send(packet)``, and ``deliver(packet)`` is called at the
    arrival time. Without it the link is a hop for ``Path`` (``shared=True``: for the paths of several flows).

    ``reorder`` is (probability, correlation, gap) for a ``Reorder`` element before the wire (see there),
    or None (the default: no reordering). It needs a delay or a jitter to skip, as netem's does.

    ``discipline="drr"`` replaces the FIFO ``Port`` by a ``DrrPort``: one drop-tail queue per
    ``packet.flow`` of ``queue_bytes`` each, served by deficit round robin with ``quantum_bytes``.
    """

    def __init__(self, env: simpy.Environment, rate: float | Trace, delay: float = 0.0, jitter: float = 0.0,
                 loss: LossModel | None = None, queue_bytes: int | None = None, *,
                 rng: np.random.Generator, deliver: Callable[[Any], None] | None = None, name: str = "uplink",
                 loss_before_queue: bool = False, reorder: tuple[float, float, int] | None = None,
                 shared: bool = False, discipline: str = "fifo", quantum_bytes: int = 1500,
                 outages: Outages | None = None):
        self.env = env
        self.name = name
        _check_discipline(discipline, quantum_bytes, name)
        self.discipline = discipline
        self.port: Port | DrrPort = (Port(env, rate, queue_bytes, name) if discipline == "fifo"
                                     else DrrPort(env, rate, queue_bytes, name, quantum_bytes))
        # separate streams: switching jitter on does not change which packets are lost
        loss_rng, jitter_rng = rng.spawn(2)
        self.wire = Wire(delay, jitter, jitter_rng, name)
        if reorder is not None and not (delay or jitter):
            raise LinkConfigError(f"{name}: reordering needs a delay (or jitter) to skip, as netem's does")
        self.reorderer = None if reorder is None else Reorder(*reorder, rng=rng.spawn(1)[0])
        # an outage file sits in the loss element, where a loss model would (after the rate by default)
        self.loss_element = None if loss is None and outages is None else Loss(loss, loss_rng, outages)
        self.loss_before_queue = loss_before_queue
        self.shared = shared
        elements: list = [self.port]
        if self.loss_element is not None:
            elements.insert(0 if loss_before_queue else 1, self.loss_element)
        if self.reorderer is not None:
            elements.append(self.reorderer)
        elements.append(self.wire)
        self.elements: tuple = tuple(elements)
        self.exits: list = []  # one per path through this link: Exit or Gate
        self._path: Path | None = None
        self._route: tuple = ()
        if deliver is not None:
            self._path = Path(env, [self], deliver, name=name)
            self._route = self._path.route

    # ---- the data path -------------------------------------------------------------------------------------
    def send(self, packet: Packet) -> bool:
        """Offer a packet now; False if the queue had no room (a loss in the network still returns True)."""
        route = self._route
        if not route:
            raise LinkConfigError(f"{self.name}: a link built without deliver is sent through its Path")
        return route[0].put(packet, self.env.now, route, 0)

    # ---- configuration, as the old fused link had it ---------------------------------------------------
    trace = property(lambda self: self.port.trace)
    rate_bps = property(lambda self: self.port.rate_bps)
    queue_bytes = property(lambda self: self.port.queue_bytes)
    delay = property(lambda self: self.wire.delay)
    jitter = property(lambda self: self.wire.jitter)
    loss = property(lambda self: None if self.loss_element is None else self.loss_element.model)
    outages = property(lambda self: None if self.loss_element is None else self.loss_element.outages)

    @property
    def reorders(self) -> bool:
        return self.reorderer is not None

    @property
    def takes_arrivals(self) -> bool:
        """Whether packets must enter at their arrival time (a gate before it): shared or drr links."""
        return self.shared or self.discipline != "fifo"

    # ---- observation -------------------------------------------------------------------------------------
    @property
    def packets_sent(self) -> int:
        """Every packet offered to the link."""
        return self.elements[0].packets_in

    @property
    def bytes_sent(self) -> int:
        return self.elements[0].bytes_in

    packets_dropped_queue = property(lambda self: self.port.packets_dropped)
    bytes_dropped_queue = property(lambda self: self.port.bytes_dropped)
    packets_lost = property(lambda self: 0 if self.loss_element is None else self.loss_element.packets_lost)
    bytes_lost = property(lambda self: 0 if self.loss_element is None else self.loss_element.bytes_lost)
    loss_trials = property(lambda self: 0 if self.loss_element is None else self.loss_element.packets_in)
    loss_bursts = property(lambda self: 0 if self.loss_element is None else self.loss_element.bursts)
    packets_lost_outage = property(
        lambda self: 0 if self.loss_element is None else self.loss_element.packets_lost_outage)
    packets_reordered = property(lambda self: 0 if self.reorderer is None else self.reorderer.packets_picked)

    @property
    def packets_delivered(self) -> int:
        return sum(e.packets_out for e in self.exits)

    @property
    def bytes_delivered(self) -> int:
        return sum(e.bytes_out for e in self.exits)

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting to start serialisation now (what the drop-tail limit applies to)."""
        return self.port.queued_bytes

    @property
    def queued_packets(self) -> int:
        return self.port.queued_packets

    def flow_bytes(self) -> dict[Any, int]:
        """Bytes each flow (``packet.flow``, None without one) has had leave the port, for a drr link."""
        if not isinstance(self.port, DrrPort):
            raise LinkConfigError(f"{self.name}: flow_bytes needs discipline='drr' (count at deliver instead)")
        return self.port.flow_bytes()

    def flow_queued_bytes(self, flow: Any = None) -> int:
        """Bytes of one flow waiting in a drr link's queue now (what its queue limit applies to)."""
        if not isinstance(self.port, DrrPort):
            raise LinkConfigError(f"{self.name}: flow_queued_bytes needs discipline='drr'")
        return self.port.flow_queued_bytes(flow)

    @property
    def busy_until(self) -> float:
        """When the last accepted packet finishes leaving the bottleneck (-inf if none yet)."""
        return self.port.busy_until

    @property
    def in_flight(self) -> int:
        """Packets accepted and not lost that this link has not handed on yet (held at its end)."""
        return sum(e.in_flight for e in self.exits)

    @property
    def mean_burst(self) -> float:
        """Mean number of consecutive lost packets (0 when nothing was lost)."""
        return self.packets_lost / self.loss_bursts if self.loss_bursts else 0.0

    def capacity_bps(self) -> float:
        """Constant rate, or the trace's mean capacity over one period."""
        return self.port.capacity_bps()

    def stats(self) -> dict[str, float]:
        out = {
            "packets_sent": self.packets_sent, "bytes_sent": self.bytes_sent,
            "packets_dropped_queue": self.packets_dropped_queue,
            "bytes_dropped_queue": self.bytes_dropped_queue,
            "packets_lost": self.packets_lost, "bytes_lost": self.bytes_lost,
            "packets_delivered": self.packets_delivered, "bytes_delivered": self.bytes_delivered,
            "loss_bursts": self.loss_bursts, "mean_burst": self.mean_burst,
        }
        if self.reorderer is not None:
            out["packets_reordered"] = self.packets_reordered
        if self.outages is not None:
            out["packets_lost_outage"] = self.packets_lost_outage
        return out

    def __repr__(self) -> str:
        rate = f"{self.rate_bps:g} bit/s" if self.trace is None else repr(self.trace)
        extra = "" if self.reorderer is None else f", {self.reorderer!r}"
        return (f"Link({self.name!r}, {rate}, delay={self.delay:g}s, jitter={self.jitter:g}s, "
                f"loss={self.loss!r}{extra})")


class Path:
    """One flow's row of links: ``send(packet)`` enters the first, ``deliver(packet)`` is called at the end.

    Links must be built without ``deliver``; a link may be on several paths only if built ``shared=True``.
    Between links the path puts a gate where one is needed (before a shared or drr link that is not the
    first, after a reordering link) and a plain counting exit elsewhere; the last link ends in the delivery
    gate.
    """

    def __init__(self, env: simpy.Environment, links: Sequence[Link], deliver: Callable[[Any], None],
                 name: str = "path"):
        links = list(links)
        if not links:
            raise LinkConfigError(f"{name}: a path needs at least one link")
        self.env = env
        self.name = name
        self.links = links
        route: list = []
        gates: list[Gate] = []
        for k, link in enumerate(links):
            if link._path is not None and link._path is not self:
                raise LinkConfigError(f"{name}: link {link.name!r} delivers on its own; build it without deliver")
            if link.exits and not link.shared:
                raise LinkConfigError(
                    f"{name}: link {link.name!r} is already on a path; build it with shared=True to share it")
            route.extend(link.elements)
            last = k == len(links) - 1
            if last or link.reorders or links[k + 1].takes_arrivals:
                gate_type = ResequencingGate if link.reorders else Gate
                gate = gate_type(env, deliver if last else None)
                gates.append(gate)
                out = gate
            else:
                out = Exit()
            link.exits.append(out)
            route.append(out)
        self.route = tuple(route)
        for gate in gates:
            if gate.deliver is None:
                gate.bind(self.route, self.route.index(gate) + 1)
        self.gates = gates
        self.packets_sent = 0
        self.bytes_sent = 0

    def send(self, packet: Packet) -> bool:
        """Offer a packet now; False if the first link's queue had no room."""
        self.packets_sent += 1
        self.bytes_sent += packet.size
        route = self.route
        return route[0].put(packet, self.env.now, route, 0)

    @property
    def packets_delivered(self) -> int:
        return self.gates[-1].packets_out

    @property
    def bytes_delivered(self) -> int:
        return self.gates[-1].bytes_out

    @property
    def in_flight(self) -> int:
        """Packets sent on this path that are held at one of its gates (not yet delivered)."""
        return sum(g.in_flight for g in self.gates)

    @property
    def queued_packets(self) -> int:
        """Packets waiting in the queues of the path's links (a shared link's include other flows')."""
        return sum(link.queued_packets for link in self.links)

    def capacity_bps(self) -> float:
        return min(link.capacity_bps() for link in self.links)

    def stats(self) -> dict[str, Any]:
        return {"packets_sent": self.packets_sent, "bytes_sent": self.bytes_sent,
                "packets_delivered": self.packets_delivered, "bytes_delivered": self.bytes_delivered,
                "links": [link.stats() for link in self.links]}

    def __repr__(self) -> str:
        return f"Path({self.name!r}, {' -> '.join(link.name for link in self.links)})"


# ---- configuration ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkConfig:
    """Everything needed to build one Link; immutable, so one config can build many fresh links.

    The loss model is kept as its netem spec string and parsed anew for every link (models are stateful).
    Exactly one of ``rate_bps`` / ``trace`` is set.

    ``discipline``: "fifo" (one drop-tail queue, the default) or "drr" (deficit round robin over
    ``packet.flow``, ``quantum_bytes`` a turn; ``queue_bytes`` is then each flow's limit). ``trace_offset_s``
    starts the trace that far into its period (``Trace.shifted``: rounded to a whole millisecond, modulo
    the period, and stored so), so links on one trace need not move in lockstep.

    ``outages``: an outage schedule (``Outages``, from a file): packets whose time on the link falls in an
    outage are lost, where the loss model sits. ``trace_offset_s`` shifts it too (wrapping around its own
    period), so a sender's fades stay where its trace has them; without a trace the offset is taken
    modulo the outage file's period, if it has one.
    """

    rate_bps: float | None = None
    trace: Trace | None = None
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: str = "none"
    queue_bytes: int | None = None
    loss_before_queue: bool = False
    name: str = "uplink"
    reorder: str = "none"  # netem's "P [CORR] [gap N]"; see channel.elements.Reorder
    discipline: str = "fifo"
    quantum_bytes: int = 1500  # one MTU: equal-sized full packets go one a turn
    trace_offset_s: float = 0.0
    trace_rate_bps: float | None = None  # scale the trace's opportunities to this mean (Trace.scaled_to)
    outages: Outages | None = None

    def __post_init__(self) -> None:
        if (self.rate_bps is None) == (self.trace is None):
            which = "both" if self.trace is not None else "neither"
            raise LinkConfigError(f"{self.name}: give either a rate or a trace, not {which}")
        model = parse_loss(self.loss)  # fail early, at configuration time
        object.__setattr__(self, "loss", model.spec if model is not None else "none")
        reorder = parse_reorder(self.reorder)
        if reorder is not None and not (self.delay_s or self.jitter_s):
            raise LinkConfigError(f"{self.name}: reordering needs a delay (or jitter) to skip, as netem's does")
        object.__setattr__(self, "reorder", "none" if reorder is None else _reorder_spec(*reorder))
        _check_discipline(self.discipline, self.quantum_bytes, self.name)
        object.__setattr__(self, "quantum_bytes", int(self.quantum_bytes))
        offset = self.trace_offset_s
        if not (isinstance(offset, int | float) and math.isfinite(offset) and offset >= 0):
            raise LinkConfigError(f"{self.name}: trace_offset_s must be a finite number >= 0, got {offset!r}")
        if self.outages is not None and not isinstance(self.outages, Outages):
            raise LinkConfigError(f"{self.name}: outages must be an Outages schedule, got {self.outages!r}")
        if offset and self.trace is None and self.outages is None:
            raise LinkConfigError(f"{self.name}: trace_offset_s={offset!r} needs a trace or an outage file")
        if self.trace is not None:
            object.__setattr__(self, "trace_offset_s", self.trace.offset_grid_ms(offset) / 1000.0)
        elif self.outages is not None and self.outages.period_s:
            object.__setattr__(self, "trace_offset_s", float(offset) % self.outages.period_s)
        if self.trace_rate_bps is not None:
            if self.trace is None:
                raise LinkConfigError(f"{self.name}: trace_rate={self.trace_rate_bps:g} bit/s needs a trace")
            self.trace.scaled_to(self.trace_rate_bps)  # fail early: a rate under a byte per opportunity

    @classmethod
    def from_strings(cls, rate: str | None = None, delay: str = "0ms", jitter: str = "0ms",
                     loss: str = "none", queue: str | int | None = None,
                     trace: str | FilePath | Trace | None = None, name: str = "uplink",
                     loss_before_queue: bool = False, reorder: str = "none", discipline: str = "fifo",
                     quantum: str | int = 1500, trace_offset: str = "0s",
                     trace_rate: str | None = None,
                     outage: str | FilePath | Outages | None = None) -> LinkConfig:
        """tc-style strings, as CLI options give them: ``rate="64kbit", delay="40ms", loss="random 5%"``.

        ``queue`` is a tc size ("64kb", "3000") or None / "none" / "unlimited"; ``trace`` a Mahimahi file;
        ``reorder`` netem's "P [CORR] [gap N]" ("25% 50%", "100% gap 5"); ``discipline`` "fifo" or "drr",
        ``quantum`` a tc size (drr's bytes a turn); ``trace_offset`` a time ("30s"); ``trace_rate`` a rate
        the trace is scaled to (its mean; every opportunity kept); ``outage`` an outage file (``Outages``;
        None or "none": no outages). Times follow tc: a bare number is microseconds.
        """
        if rate is not None and trace is not None:
            raise LinkConfigError(f"{name}: give either a rate or a trace, not both")
        if rate is None and trace is None:
            raise LinkConfigError(f"{name}: give a rate (e.g. 64kbit) or a Mahimahi trace file")
        q = None
        unlimited = isinstance(queue, str) and queue.strip().lower() in ("", "none", "unlimited")
        if queue is not None and not unlimited:
            q = parse_size(queue)
        if trace is not None and not isinstance(trace, Trace):
            trace = Trace.load(trace)
        if isinstance(outage, str) and outage.strip().lower() in ("", "none"):
            outage = None
        if outage is not None and not isinstance(outage, Outages):
            outage = Outages.load(outage)
        return cls(rate_bps=None if rate is None else parse_rate(rate), trace=trace,
                   delay_s=parse_time(delay), jitter_s=parse_time(jitter), loss=loss, queue_bytes=q,
                   loss_before_queue=loss_before_queue, name=name, reorder=reorder, discipline=discipline,
                   quantum_bytes=parse_size(quantum), trace_offset_s=parse_time(trace_offset),
                   trace_rate_bps=None if trace_rate is None else parse_rate(trace_rate), outages=outage)

    def reverse_default(self, name: str = "downlink") -> LinkConfig:
        """The feedback direction when none is given: 1 Mbit/s, same delay, no jitter, no loss, no limit."""
        return LinkConfig(rate_bps=parse_rate(DEFAULT_REVERSE_RATE), delay_s=self.delay_s, name=name)

    def capacity_bps(self) -> float:
        return self.rate_bps if self.trace is None else self.effective_trace().capacity_bps()

    def effective_trace(self, offset_s: float = 0.0) -> Trace | None:
        """The trace links are built on: shifted by ``offset_s`` and scaled to ``trace_rate_bps`` if set."""
        if self.trace is None:
            return None
        trace = self.trace.shifted(offset_s)
        return trace if self.trace_rate_bps is None else trace.scaled_to(self.trace_rate_bps)

    def offset_period_s(self) -> float | None:
        """The period a random ``trace_offset_s`` is drawn over: the trace's, else the outage file's."""
        if self.trace is not None:
            return self.trace.period_s
        return None if self.outages is None else self.outages.period_s

    def with_(self, **changes: Any) -> LinkConfig:
        return replace(self, **changes)

    def describe(self) -> dict[str, str]:
        """Flat strings for result rows and reports (``reorder``, ``discipline`` + ``quantum`` and
        ``trace_offset`` only when not their defaults, so rows of default links keep their columns)."""
        out = {
            "name": self.name,
            "rate": f"{self.rate_bps:g}bit" if self.trace is None else f"trace:{self.trace.name}",
            "capacity_bps": f"{self.capacity_bps():.6g}",
            "delay": f"{self.delay_s * 1e3:g}ms", "jitter": f"{self.jitter_s * 1e3:g}ms",
            "loss": self.loss, "queue": "unlimited" if self.queue_bytes is None else f"{self.queue_bytes}b",
            "loss_order": "before-queue" if self.loss_before_queue else "after-rate",
        }
        if self.reorder != "none":
            out["reorder"] = self.reorder
        if self.discipline != "fifo":
            out["discipline"] = self.discipline
            out["quantum"] = f"{self.quantum_bytes}b"
        if self.trace_offset_s:
            out["trace_offset"] = f"{self.trace_offset_s * 1e3:g}ms"
        if self.trace_rate_bps is not None:
            out["trace_rate"] = f"{self.trace_rate_bps:g}bit"
        if self.outages is not None:
            out["outage"] = FilePath(self.outages.name).name
        return out

    def build(self, env: simpy.Environment, rng: np.random.Generator,
              deliver: Callable[[Any], None] | None = None, *, shared: bool = False) -> Link:
        """A fresh link. With ``deliver`` it is ready to ``send``; without, it is a hop for ``Path``."""
        rate = self.rate_bps if self.trace is None else self.effective_trace(self.trace_offset_s)
        outages = None if self.outages is None else self.outages.shifted(self.trace_offset_s)
        return Link(env, rate, self.delay_s, self.jitter_s, parse_loss(self.loss), self.queue_bytes, rng=rng,
                    deliver=deliver, name=self.name, loss_before_queue=self.loss_before_queue,
                    reorder=parse_reorder(self.reorder), shared=shared, discipline=self.discipline,
                    quantum_bytes=self.quantum_bytes, outages=outages)


def _reorder_spec(p: float, corr: float, gap: int) -> str:
    pct = lambda x: f"{x * 100:.10g}%"  # noqa: E731
    return f"{pct(p)} {pct(corr)}" + (f" gap {gap}" if gap != 1 else "")


@dataclass(frozen=True)
class PathConfig:
    """Links in a row for one flow (e.g. edge access link -> cell -> backhaul); builds a ``Path``.

    Each link gets its own stream (``rng.spawn(n)``) when there are several; a one-link path is built
    exactly as that link alone. Links shared with other flows are built as objects (``LinkConfig.build(...,
    shared=True)``) and put on ``Path``s directly.
    """

    links: tuple[LinkConfig, ...]
    name: str = "path"

    def __post_init__(self) -> None:
        object.__setattr__(self, "links", tuple(self.links))
        if not self.links:
            raise LinkConfigError(f"{self.name}: a path needs at least one link")

    @property
    def delay_s(self) -> float:
        return sum(link.delay_s for link in self.links)

    def capacity_bps(self) -> float:
        return min(link.capacity_bps() for link in self.links)

    def reverse_default(self, name: str = "downlink") -> LinkConfig:
        """1 Mbit/s with the path's total delay, no jitter, no loss, no limit."""
        return LinkConfig(rate_bps=parse_rate(DEFAULT_REVERSE_RATE), delay_s=self.delay_s, name=name)

    def with_(self, **changes: Any) -> PathConfig:
        return replace(self, **changes)

    def describe(self) -> dict[str, str]:
        """Flat strings: the path's name and capacity, then each link's fields as ``<link name>.<field>``."""
        out = {"name": self.name, "capacity_bps": f"{self.capacity_bps():.6g}",
               "links": " -> ".join(link.name for link in self.links)}
        for k, link in enumerate(self.links):
            for key, value in link.describe().items():
                if key != "name":
                    out[f"{k}:{link.name}.{key}"] = value
        return out

    def build(self, env: simpy.Environment, rng: np.random.Generator, deliver: Callable[[Any], None]) -> Path:
        rngs = [rng] if len(self.links) == 1 else rng.spawn(len(self.links))
        links = [cfg.build(env, r) for cfg, r in zip(self.links, rngs, strict=True)]
        return Path(env, links, deliver, name=self.name)


@dataclass
class DuplexLink:
    forward: Link | Path
    reverse: Link | Path


@dataclass(frozen=True)
class DuplexConfig:
    """A forward (edge -> cloud) and a reverse (feedback) direction, each a link or a path of its own."""

    forward: LinkConfig | PathConfig
    reverse: LinkConfig | PathConfig | None = None  # None: forward.reverse_default()

    def __post_init__(self) -> None:
        if self.reverse is None:
            object.__setattr__(self, "reverse", self.forward.reverse_default())

    def build(self, env: simpy.Environment, rng: np.random.Generator, deliver_forward: Callable[[Any], None],
              deliver_reverse: Callable[[Any], None]) -> DuplexLink:
        # independent streams per direction: feedback traffic does not shift the forward loss pattern
        f_rng, r_rng = rng.spawn(2)
        return DuplexLink(self.forward.build(env, f_rng, deliver_forward),
                          self.reverse.build(env, r_rng, deliver_reverse))


@dataclass(frozen=True)
class LinkSpec:
    """A duplex link as users write it (tc-style strings), holding the one set of defaults.

    The CLI's link options and a scenario's ``[link]`` keys are its fields under the same names; ``build``
    parses them into the ``DuplexConfig`` the simulator and the relay use. ``rate=None`` is DEFAULT_RATE
    unless a trace is given; ``reverse_delay=None`` is the forward delay.
    """

    DEFAULT_RATE = "64kbit"  # class constant (not a field): the forward rate when neither rate nor trace

    rate: str | None = None
    trace: str | FilePath | Trace | None = None
    delay: str = "0ms"
    jitter: str = "0ms"
    loss: str = "none"
    reorder: str = "none"
    queue: str | int | None = None  # drop-tail bytes; None: unlimited
    loss_before_queue: bool = False  # netem's order instead of mm-loss behind mm-link
    reverse_rate: str = DEFAULT_REVERSE_RATE
    reverse_delay: str | None = None
    reverse_loss: str = "none"
    outage: str | FilePath | Outages | None = None  # an outage file for the forward link

    def build(self) -> DuplexConfig:
        rate = self.rate if self.rate is not None or self.trace is not None else self.DEFAULT_RATE
        forward = LinkConfig.from_strings(rate=rate, trace=self.trace, delay=self.delay, jitter=self.jitter,
                                          loss=self.loss, queue=self.queue, name="uplink",
                                          loss_before_queue=self.loss_before_queue, reorder=self.reorder,
                                          outage=self.outage)
        reverse = LinkConfig.from_strings(rate=self.reverse_rate, delay=self.reverse_delay or self.delay,
                                          loss=self.reverse_loss, name="downlink")
        return DuplexConfig(forward, reverse)


# ---- measurement -----------------------------------------------------------------------------------------
class _Probe:
    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size


def saturate(config: LinkConfig, seconds: float, seed: int, packet_size: int = 1500) -> dict[str, float]:
    """Drive one link with a sender that never lets its queue run dry, for ``seconds`` of virtual time.

    capacity_bps is what the link allows over (0, seconds]: the rate, or the trace's opportunities in that
    window times 1500 bytes. delivered_bps counts packet bytes that arrive by seconds + delay (exact when
    there is no jitter: the packets that left the bottleneck in the window). loss_rate and mean_burst are
    over the packets that met the loss model.
    """
    if seconds <= 0:
        raise LinkConfigError(f"saturate: seconds must be positive, got {seconds!r}")
    if packet_size <= 0:
        raise LinkConfigError(f"saturate: packet_size must be positive, got {packet_size!r}")
    limit = config.queue_bytes
    if limit is not None and limit < packet_size and config.trace is not None:
        raise LinkConfigError(f"saturate: a {limit}-byte queue cannot hold one {packet_size}-byte packet")
    # One flow: deficit round robin serves exactly as FIFO, whose times this driver can read ahead.
    config = replace(config, discipline="fifo")
    env = simpy.Environment()
    link = config.build(env, np.random.default_rng(seed), deliver=lambda _p: None)
    probe = _Probe(packet_size)
    # Keep the queue from ever draining: an arrival at time t cannot use opportunities due at t, so a
    # queue that empties inside a burst of same-millisecond opportunities would waste the rest of them.
    target = 64 * packet_size
    if config.trace is not None:
        per_ms = int(np.unique(config.trace.times_ms, return_counts=True)[1].max())
        target = max(target, 4 * per_ms * config.trace.budget_bytes)

    def sender():
        nonlocal target
        while True:
            while True:
                if limit is None:
                    room = link.queued_bytes < target
                else:  # an idle constant-rate link takes a packet at once, whatever the queue limit
                    room = (link.queued_bytes + packet_size <= limit
                            or (config.trace is None and link.busy_until <= env.now))
                if not room:
                    break
                link.send(probe)
            pending = link.port._pending
            if not pending:
                wake = link.busy_until
            else:  # wake while some of the backlog is still waiting for a later instant
                wake, last = pending[len(pending) // 2][0], pending[-1][0]
                if wake >= last:
                    if pending[0][0] < last:
                        wake = pending[0][0]
                    elif limit is None:
                        target *= 2
                        continue
            if wake <= env.now:
                raise RuntimeError("saturate: the sender would spin without time passing")
            yield event_at(env, wake)

    env.process(sender())
    end = seconds + config.delay_s
    env.run(until=math.nextafter(end, math.inf))  # include arrivals at exactly the end
    if config.trace is None:
        capacity = config.rate_bps
    else:
        capacity = link.trace.count_between(0.0, seconds) * link.trace.opportunity_bytes * 8 / seconds  # offset applied
    delivered = link.bytes_delivered * 8 / seconds
    return {
        "capacity_bps": capacity,
        "delivered_bps": delivered,
        "utilization": delivered / capacity if capacity > 0 else 0.0,
        "loss_rate": link.packets_lost / link.loss_trials if link.loss_trials else 0.0,
        "mean_burst": link.mean_burst,
    }

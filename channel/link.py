"""The link model in SimPy: byte-limited drop-tail queue -> rate (constant or trace) -> loss -> delay.

One direction of a path is a ``Link``; ``DuplexConfig`` builds a forward link and a reverse (feedback) link
with their own parameters. The model works on any ``simpy.Environment``, including
``simpy.rt.RealtimeEnvironment(strict=False)`` for live nodes: it only reads ``env.now`` and schedules
timeouts, and it must be driven from the simulation's thread (SimPy is not thread-safe).

Semantics, and the tool each is taken from:

- Queue: drop-tail on bytes, like ``mm-link --uplink-queue=droptail --uplink-queue-args=bytes=N``. The
  queue holds packets that have not started to leave the bottleneck; a packet whose size does not fit in
  what is left is dropped on arrival and ``send`` returns False. The packet being serialised is not in the
  queue (mm-link's packet "in transit" has left its queue too). ``queue_bytes=None`` = unlimited. Sizes
  count ``packet.size`` (mm-link would also count its 4-byte tun header).
- Constant rate: netem's recursion, ``send_time = max(prev_send_time, now) + 8 * size / rate`` where
  send_time is when the packet's last bit has left the bottleneck. An arrival on an idle link starts at
  once and is never queued (so a zero-byte queue is a bufferless link).
- Trace rate: mm-link's opportunities. Each opportunity may move 1504 bytes and each packet costs
  ``size + 4`` (mm-link reads packets from a tun device WITH its 4-byte packet-info header, and its
  PACKET_SIZE is 1504), so one 1500-byte IP packet fills one opportunity exactly. A packet larger than the
  opportunity's remaining budget carries its remaining bytes to the next one; budget left when nothing is
  queued is wasted; an arrival at time t may only use opportunities strictly after t (mm-link burns those
  due at or before "now" before it enqueues). Departure = the opportunity that moves its last byte.
- Loss: decided once per packet after serialisation (the order of Pantheon/Mahimahi's
  ``mm-delay D mm-loss uplink L mm-link up down`` and of the design's data path): a lost packet has used
  the bottleneck, as a frame lost on the air has used airtime. ``loss_before_queue=True`` gives netem's
  order instead (loss decided on arrival, before the queue; lost packets take neither queue nor rate).
- Delay: ``delay`` seconds of propagation plus, when ``jitter`` > 0, a draw uniform on [-jitter, +jitter]
  (netem's default jitter distribution, no correlation), the sum clipped at 0; then the arrival is clipped
  to be no earlier than the previous packet's, so the link never reorders (as netem with a rate does).

All departure and arrival times are computed when a packet is sent (the queue is FIFO, so nothing later
can change them): each delivered packet costs one SimPy event and idle links or opportunities cost none.
Deliveries are scheduled to land on the computed float time exactly.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from heapq import heappush
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import simpy
from simpy.events import NORMAL

from miscnet.channel.loss import LossModel
from miscnet.channel.trace import OPPORTUNITY_BYTES, Trace
from miscnet.channel.units import LinkConfigError, parse_loss, parse_rate, parse_size, parse_time

TUN_HEADER_BYTES = 4  # mm-link counts a tun packet-info header with every packet ...
TRACE_BUDGET_BYTES = OPPORTUNITY_BYTES + TUN_HEADER_BYTES  # ... against PACKET_SIZE = 1504 per opportunity
DEFAULT_REVERSE_RATE = "1mbit"  # feedback (NACKs, acks) is tiny; 1 Mbit/s keeps it from being the bottleneck


class Packet(Protocol):
    size: int  # bytes on the wire


def _delay_to(now: float, t: float) -> float:
    """The delay that brings ``now`` closest to ``t`` from above (0 if t has passed)."""
    if t <= now:
        return 0.0
    d = t - now
    while d > 0.0 and now + d > t:
        d = math.nextafter(d, -math.inf)
    while now + d < t:
        d = math.nextafter(d, math.inf)
    return d


def _event_at(env: simpy.Environment, t: float) -> simpy.Event:
    """A triggered event processed at exactly time ``t`` (>= env.now).

    SimPy only schedules at ``now + delay``, and for some (now, t) no float delay gives t exactly (the
    sums skip it when rounding ties). Delivery times are meant to equal the computed times, so in those
    rare cases we put the event on SimPy 4's queue ourselves, in the same (time, priority, id, event) form
    ``Environment.schedule`` uses; an environment without that queue gets the nearest later time instead.
    """
    now = env.now
    d = _delay_to(now, t)
    if now + d == t or t <= now:
        return env.timeout(d)
    queue, eid = getattr(env, "_queue", None), getattr(env, "_eid", None)
    if not isinstance(queue, list) or eid is None:
        return env.timeout(d)
    ev = simpy.Event(env)
    ev._ok = True
    ev._value = None
    heappush(queue, (t, NORMAL, next(eid), ev))
    return ev


class Link:
    """One direction of a path. ``send(packet)``; ``deliver(packet)`` is called at the arrival time."""

    def __init__(self, env: simpy.Environment, rate: float | Trace, delay: float = 0.0, jitter: float = 0.0,
                 loss: LossModel | None = None, queue_bytes: int | None = None, *,
                 rng: np.random.Generator, deliver: Callable[[Any], None], name: str = "uplink",
                 loss_before_queue: bool = False):
        if isinstance(rate, Trace):
            self.trace: Trace | None = rate
            self.rate_bps: float | None = None
        else:
            rate = float(rate)
            if not (rate > 0 and math.isfinite(rate)):
                raise LinkConfigError(f"{name}: rate must be a positive number of bit/s, got {rate!r}")
            self.trace, self.rate_bps = None, rate
        if not (delay >= 0 and math.isfinite(delay)) or not (jitter >= 0 and math.isfinite(jitter)):
            raise LinkConfigError(
                f"{name}: delay and jitter must be finite and >= 0 (got {delay!r}, {jitter!r})")
        if queue_bytes is not None and (int(queue_bytes) != queue_bytes or queue_bytes < 0):
            raise LinkConfigError(
                f"{name}: queue_bytes must be a whole number >= 0 or None, got {queue_bytes!r}")
        self.env = env
        self.name = name
        self.delay = float(delay)
        self.jitter = float(jitter)
        self.loss = loss
        self.queue_bytes = None if queue_bytes is None else int(queue_bytes)
        self.loss_before_queue = loss_before_queue
        self._deliver = deliver
        # separate streams: switching jitter on does not change which packets are lost
        self._loss_rng, self._jitter_rng = rng.spawn(2)

        # bottleneck state
        self._prev_send = -math.inf  # constant rate: when the previous packet finished leaving
        self._opp = -1  # trace: opportunity where the previous packet finished ...
        self._left = 0  # ... and the bytes of its budget still unused
        self._pending: deque[tuple[float, int]] = deque()  # (start of serialisation, size) of queued packets
        self._queued = 0
        # propagation: FIFO of (arrival time, packet); one timeout armed for the head at a time
        self._flight: deque[tuple[float, Any]] = deque()
        self._armed = False
        self._last_arrival = -math.inf

        self.packets_sent = 0  # every packet offered to send()
        self.bytes_sent = 0
        self.packets_dropped_queue = 0
        self.bytes_dropped_queue = 0
        self.packets_lost = 0
        self.bytes_lost = 0
        self.packets_delivered = 0
        self.bytes_delivered = 0
        self.loss_trials = 0  # packets that met the loss model
        self.loss_bursts = 0  # runs of consecutive losses among those
        self._in_burst = False

    # ---- the data path -----------------------------------------------------------------------------
    def send(self, packet: Packet) -> bool:
        """Offer a packet now; False if the queue had no room (a loss in the network still returns True)."""
        now = self.env.now
        size = packet.size
        self.packets_sent += 1
        self.bytes_sent += size
        if self.loss_before_queue and self.loss is not None and self._draw_loss(size):
            return True

        pending = self._pending
        while pending and pending[0][0] <= now:  # these have started to leave: out of the queue
            self._queued -= pending.popleft()[1]

        trace = self.trace
        if trace is None:
            prev = self._prev_send
            start = prev if prev > now else now
            depart = start + 8 * size / self.rate_bps
        else:
            opp, left = self._opp, self._left
            if opp < 0 or trace.time_of(opp) <= now:  # idle: what the last opportunity had left is gone
                opp, left = trace.index_after(now), TRACE_BUDGET_BYTES
            elif left == 0:
                opp, left = opp + 1, TRACE_BUDGET_BYTES
            start = trace.time_of(opp)
            cost = size + TUN_HEADER_BYTES
            if cost <= left:
                left -= cost
            else:
                rest = cost - left
                k = -(-rest // TRACE_BUDGET_BYTES)
                opp += k
                left = k * TRACE_BUDGET_BYTES - rest
            depart = trace.time_of(opp)

        if start > now:  # it waits in the queue
            limit = self.queue_bytes
            if limit is not None and self._queued + size > limit:
                self.packets_dropped_queue += 1
                self.bytes_dropped_queue += size
                return False
            pending.append((start, size))
            self._queued += size
        if trace is None:
            self._prev_send = depart
        else:
            self._opp, self._left = opp, left

        if not self.loss_before_queue and self.loss is not None and self._draw_loss(size):
            return True

        d = self.delay
        if self.jitter:
            d += self.jitter * (2.0 * self._jitter_rng.random() - 1.0)
            if d < 0.0:
                d = 0.0
        arrival = depart + d
        if arrival < self._last_arrival:
            arrival = self._last_arrival  # never overtake the packet ahead
        self._last_arrival = arrival
        self._flight.append((arrival, packet))
        if not self._armed:
            self._arm(arrival)
        return True

    def _draw_loss(self, size: int) -> bool:
        self.loss_trials += 1
        if self.loss.lost(self._loss_rng):
            self.packets_lost += 1
            self.bytes_lost += size
            if not self._in_burst:
                self.loss_bursts += 1
                self._in_burst = True
            return True
        self._in_burst = False
        return False

    def _arm(self, t: float) -> None:
        self._armed = True
        _event_at(self.env, t).callbacks.append(self._land)

    def _land(self, _event: simpy.Event) -> None:
        now = self.env.now
        flight = self._flight
        while flight and flight[0][0] <= now:
            _, packet = flight.popleft()
            self.packets_delivered += 1
            self.bytes_delivered += packet.size
            self._deliver(packet)  # may send again, on this link or another
        if flight:
            self._arm(flight[0][0])
        else:
            self._armed = False

    # ---- observation -------------------------------------------------------------------------------
    def _refresh(self) -> None:
        now = self.env.now
        pending = self._pending
        while pending and pending[0][0] <= now:
            self._queued -= pending.popleft()[1]

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting to start serialisation now (what the drop-tail limit applies to)."""
        self._refresh()
        return self._queued

    @property
    def queued_packets(self) -> int:
        self._refresh()
        return len(self._pending)

    @property
    def busy_until(self) -> float:
        """When the last accepted packet finishes leaving the bottleneck (-inf if none yet)."""
        if self.trace is None:
            return self._prev_send
        return -math.inf if self._opp < 0 else self.trace.time_of(self._opp)

    @property
    def in_flight(self) -> int:
        """Packets accepted and not lost that have not been delivered yet."""
        return len(self._flight)

    @property
    def mean_burst(self) -> float:
        """Mean number of consecutive lost packets (0 when nothing was lost)."""
        return self.packets_lost / self.loss_bursts if self.loss_bursts else 0.0

    def capacity_bps(self) -> float:
        """Constant rate, or the trace's mean capacity over one period."""
        return self.rate_bps if self.trace is None else self.trace.capacity_bps()

    def stats(self) -> dict[str, float]:
        return {
            "packets_sent": self.packets_sent, "bytes_sent": self.bytes_sent,
            "packets_dropped_queue": self.packets_dropped_queue,
            "bytes_dropped_queue": self.bytes_dropped_queue,
            "packets_lost": self.packets_lost, "bytes_lost": self.bytes_lost,
            "packets_delivered": self.packets_delivered, "bytes_delivered": self.bytes_delivered,
            "loss_bursts": self.loss_bursts, "mean_burst": self.mean_burst,
        }

    def __repr__(self) -> str:
        rate = f"{self.rate_bps:g} bit/s" if self.trace is None else repr(self.trace)
        return (f"Link({self.name!r}, {rate}, delay={self.delay:g}s, jitter={self.jitter:g}s, "
                f"loss={self.loss!r})")


# ---- configuration ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkConfig:
    """Everything needed to build one Link; immutable, so one config can build many fresh links.

    The loss model is kept as its netem spec string and parsed anew for every link (models are stateful).
    Exactly one of ``rate_bps`` / ``trace`` is set.
    """

    rate_bps: float | None = None
    trace: Trace | None = None
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: str = "none"
    queue_bytes: int | None = None
    loss_before_queue: bool = False
    name: str = "uplink"

    def __post_init__(self) -> None:
        if (self.rate_bps is None) == (self.trace is None):
            which = "both" if self.trace is not None else "neither"
            raise LinkConfigError(f"{self.name}: give either a rate or a trace, not {which}")
        model = parse_loss(self.loss)  # fail early, at configuration time
        object.__setattr__(self, "loss", model.spec if model is not None else "none")

    @classmethod
    def from_strings(cls, rate: str | None = None, delay: str = "0ms", jitter: str = "0ms",
                     loss: str = "none", queue: str | int | None = None,
                     trace: str | Path | Trace | None = None, name: str = "uplink",
                     loss_before_queue: bool = False) -> LinkConfig:
        """tc-style strings, as CLI options give them: ``rate="64kbit", delay="40ms", loss="random 5%"``.

        ``queue`` is a tc size ("64kb", "3000") or None / "none" / "unlimited"; ``trace`` a Mahimahi file.
        Times follow tc: a bare number is microseconds.
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
        return cls(rate_bps=None if rate is None else parse_rate(rate), trace=trace,
                   delay_s=parse_time(delay), jitter_s=parse_time(jitter), loss=loss, queue_bytes=q,
                   loss_before_queue=loss_before_queue, name=name)

    def reverse_default(self, name: str = "downlink") -> LinkConfig:
        """The feedback direction when none is given: 1 Mbit/s, same delay, no jitter, no loss, no limit."""
        return LinkConfig(rate_bps=parse_rate(DEFAULT_REVERSE_RATE), delay_s=self.delay_s, name=name)

    def capacity_bps(self) -> float:
        return self.rate_bps if self.trace is None else self.trace.capacity_bps()

    def with_(self, **changes: Any) -> LinkConfig:
        return replace(self, **changes)

    def describe(self) -> dict[str, str]:
        """Flat strings for result rows and reports."""
        return {
            "name": self.name,
            "rate": f"{self.rate_bps:g}bit" if self.trace is None else f"trace:{self.trace.name}",
            "capacity_bps": f"{self.capacity_bps():.6g}",
            "delay": f"{self.delay_s * 1e3:g}ms", "jitter": f"{self.jitter_s * 1e3:g}ms",
            "loss": self.loss, "queue": "unlimited" if self.queue_bytes is None else f"{self.queue_bytes}b",
            "loss_order": "before-queue" if self.loss_before_queue else "after-rate",
        }

    def build(self, env: simpy.Environment, rng: np.random.Generator,
              deliver: Callable[[Any], None]) -> Link:
        return Link(env, self.trace if self.trace is not None else self.rate_bps, self.delay_s, self.jitter_s,
                    parse_loss(self.loss), self.queue_bytes, rng=rng, deliver=deliver, name=self.name,
                    loss_before_queue=self.loss_before_queue)


@dataclass
class DuplexLink:
    forward: Link
    reverse: Link


@dataclass(frozen=True)
class DuplexConfig:
    """A forward (edge -> cloud) and a reverse (feedback) link, each with its own parameters."""

    forward: LinkConfig
    reverse: LinkConfig | None = None  # None: forward.reverse_default()

    def __post_init__(self) -> None:
        if self.reverse is None:
            object.__setattr__(self, "reverse", self.forward.reverse_default())

    def build(self, env: simpy.Environment, rng: np.random.Generator, deliver_forward: Callable[[Any], None],
              deliver_reverse: Callable[[Any], None]) -> DuplexLink:
        # independent streams per direction: feedback traffic does not shift the forward loss pattern
        f_rng, r_rng = rng.spawn(2)
        return DuplexLink(self.forward.build(env, f_rng, deliver_forward),
                          self.reverse.build(env, r_rng, deliver_reverse))


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
    env = simpy.Environment()
    link = config.build(env, np.random.default_rng(seed), deliver=lambda _p: None)
    probe = _Probe(packet_size)
    # Keep the queue from ever draining: an arrival at time t cannot use opportunities due at t, so a
    # queue that empties inside a burst of same-millisecond opportunities would waste the rest of them.
    target = 64 * packet_size
    if config.trace is not None:
        per_ms = int(np.unique(config.trace.times_ms, return_counts=True)[1].max())
        target = max(target, 4 * per_ms * TRACE_BUDGET_BYTES)

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
            pending = link._pending
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
            yield _event_at(env, wake)

    env.process(sender())
    end = seconds + config.delay_s
    env.run(until=math.nextafter(end, math.inf))  # include arrivals at exactly the end
    if config.trace is None:
        capacity = config.rate_bps
    else:
        capacity = config.trace.count_between(0.0, seconds) * OPPORTUNITY_BYTES * 8 / seconds
    delivered = link.bytes_delivered * 8 / seconds
    return {
        "capacity_bps": capacity,
        "delivered_bps": delivered,
        "utilization": delivered / capacity if capacity > 0 else 0.0,
        "loss_rate": link.packets_lost / link.loss_trials if link.loss_trials else 0.0,
        "mean_burst": link.mean_burst,
    }

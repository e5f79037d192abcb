"""The link's elements: small pieces, in the style of ns.py's ``Port`` (rate + tail drop) and ``Wire``.

A link (``channel/link.py``) is a row of these; a path is several links in a row; one link may carry
several flows. Every element has one method::

    put(packet, t, route, i) -> bool

"``packet`` reaches me, ``route[i]``, at time ``t``". The element works out what happens to it and hands
it on with ``route[i + 1].put(packet, t_out, route, i + 1)``: the route is the flow's whole row of
elements, so an element needs no fixed successor and one element object can sit on the routes of several
flows (a shared bottleneck), each packet leaving to its own flow's next element.

Time runs ahead of the clock. ``t`` may lie in the future (``t >= env.now``): the queue is FIFO, so once
a packet has entered a row of private elements nothing later can change its departure or arrival times,
and they are computed at once, without any SimPy event. An element relies on seeing its packets in
non-decreasing ``t``. Only a ``Gate`` turns computed times back into events: it holds packets until their
time and hands each on at ``env.now``. A route needs one at its end (delivery), before an element that
several flows share (their computed times are not in one order), and after a ``Reorder`` (which breaks
the order). So a single link costs one SimPy event per delivered packet, and a chain of private links no
more.

The return value is what the sender's ``send`` reports: False when the first queue on the route (reached
at the send time) had no room. A ``Port`` answers for itself and ignores what happens further on; a
packet lost in the network still returns True.

Counters are kept by each element at the moment it handles a packet, which for elements fed ahead of the
clock is when the packet's fate was computed; a ``Gate`` counts when it hands packets on (their arrival).

Elements and the tool each one follows:

- ``Port``: byte-limited drop-tail queue + a rate, constant (netem's ``send_time = max(prev_send_time,
  now) + 8 * size / rate``) or a Mahimahi trace (mm-link's accounting). See the class.
- ``Loss``: a ``LossModel`` (channel/loss.py), asked once per packet (a fade with the packet's time), and
  an optional ``Outages`` schedule.
- ``Wire``: propagation delay + uniform jitter, never reordering (as netem with a rate).
- ``Reorder``: netem's ``reorder P [CORR] [gap N]`` idea: a packet it picks skips the ``Wire`` right after
  it. See the class for the exact semantics.
- ``Exit``: counts packets handed from one link to the next when no event is needed between them.
- ``Gate`` / ``ResequencingGate``: the event boundary (FIFO, or by time for reordered input); at a route's
  end it calls the flow's ``deliver(packet)`` at the arrival time.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from heapq import heappop, heappush
from typing import Any, Protocol

import numpy as np
import simpy
from simpy.events import NORMAL

from miscnet.channel.errors import LinkConfigError
from miscnet.channel.loss import LossModel, Outages
from miscnet.channel.trace import TUN_HEADER_BYTES, Trace


class Packet(Protocol):
    size: int  # bytes on the wire


class Element(Protocol):
    def put(self, packet: Any, t: float, route: tuple, i: int) -> bool: ...


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


def event_at(env: simpy.Environment, t: float) -> simpy.Event:
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


# ---- queue + rate ------------------------------------------------------------------------------------
def _rate_and_limit(rate: float | Trace, queue_bytes: int | None,
                    name: str) -> tuple[Trace | None, float | None, int | None]:
    """(trace, rate_bps, queue_bytes) for a port, checked."""
    trace, rate_bps = (rate, None) if isinstance(rate, Trace) else (None, float(rate))
    if rate_bps is not None and not (rate_bps > 0 and math.isfinite(rate_bps)):
        raise LinkConfigError(f"{name}: rate must be a positive number of bit/s, got {rate_bps!r}")
    if queue_bytes is not None and (int(queue_bytes) != queue_bytes or queue_bytes < 0):
        raise LinkConfigError(f"{name}: queue_bytes must be a whole number >= 0 or None, got {queue_bytes!r}")
    return trace, rate_bps, None if queue_bytes is None else int(queue_bytes)


class Port:
    """A byte-limited drop-tail queue in front of a rate limiter (ns.py's Port: rate plus tail drop).

    - Queue: drop-tail on bytes, like ``mm-link --uplink-queue=droptail --uplink-queue-args=bytes=N``. The
      queue holds packets that have not started to leave; a packet whose size does not fit in what is left
      is dropped on arrival (``put`` returns False). The packet being serialised is not in the queue
      (mm-link's packet "in transit" has left its queue too). ``queue_bytes=None`` = unlimited. Sizes
      count ``packet.size`` (mm-link would also count its 4-byte tun header).
    - Constant rate: netem's recursion, ``send_time = max(prev_send_time, t) + 8 * size / rate`` where
      send_time is when the packet's last bit has left. An arrival on an idle port starts at once and is
      never queued (so a zero-byte queue is a bufferless link).
    - Trace rate: mm-link's opportunities. Each opportunity may move 1504 bytes and each packet costs
      ``size + 4`` (mm-link reads packets from a tun device WITH its 4-byte packet-info header, and its
      PACKET_SIZE is 1504), so one 1500-byte IP packet fills one opportunity exactly. A packet larger than
      the opportunity's remaining budget carries its remaining bytes to the next one; budget left when
      nothing is queued is wasted; an arrival at time t may only use opportunities strictly after t
      (mm-link burns those due at or before "now" before it enqueues). Departure = the opportunity that
      moves its last byte.

    The packet is handed on at its departure time.
    """

    __slots__ = ("env", "name", "trace", "rate_bps", "queue_bytes", "_prev_send", "_opp", "_left", "_pending",
                 "_queued", "packets_in", "bytes_in", "packets_dropped", "bytes_dropped", "sojourns")

    def __init__(self, env: simpy.Environment, rate: float | Trace, queue_bytes: int | None = None,
                 name: str = "port"):
        self.trace, self.rate_bps, self.queue_bytes = _rate_and_limit(rate, queue_bytes, name)
        self.env = env
        self.name = name
        self._prev_send = -math.inf  # constant rate: when the previous packet finished leaving
        self._opp = -1  # trace: opportunity where the previous packet finished ...
        self._left = 0  # ... and the bytes of its budget still unused
        self._pending: deque[tuple[float, int]] = deque()  # (start of serialisation, size) of queued packets
        self._queued = 0
        self.packets_in = 0
        self.bytes_in = 0
        self.packets_dropped = 0
        self.bytes_dropped = 0
        # set to a list to record each accepted packet's wait before its serialisation starts (seconds)
        self.sojourns: list[float] | None = None

    def put(self, packet: Any, t: float, route: tuple, i: int) -> bool:
        size = packet.size
        self.packets_in += 1
        self.bytes_in += size
        pending = self._pending
        while pending and pending[0][0] <= t:  # these have started to leave: out of the queue
            self._queued -= pending.popleft()[1]

        trace = self.trace
        if trace is None:
            prev = self._prev_send
            start = prev if prev > t else t
            depart = start + 8 * size / self.rate_bps
        else:
            opp, left = self._opp, self._left
            if opp < 0 or trace.time_of(opp) <= t:  # idle: what the last opportunity had left is gone
                opp, left = trace.index_after(t), trace.budget_bytes
            elif left == 0:
                opp, left = opp + 1, trace.budget_bytes
            start = trace.time_of(opp)
            cost = size + TUN_HEADER_BYTES
            if cost <= left:
                left -= cost
            else:
                rest = cost - left
                k = -(-rest // trace.budget_bytes)
                opp += k
                left = k * trace.budget_bytes - rest
            depart = trace.time_of(opp)

        if start > t:  # it waits in the queue
            limit = self.queue_bytes
            if limit is not None and self._queued + size > limit:
                self.packets_dropped += 1
                self.bytes_dropped += size
                return False
            pending.append((start, size))
            self._queued += size
        if self.sojourns is not None:
            self.sojourns.append(start - t if start > t else 0.0)
        if trace is None:
            self._prev_send = depart
        else:
            self._opp, self._left = opp, left
        route[i + 1].put(packet, depart, route, i + 1)
        return True

    def _refresh(self) -> None:
        now = self.env.now
        pending = self._pending
        while pending and pending[0][0] <= now:
            self._queued -= pending.popleft()[1]

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting to start serialisation now (what the drop-tail limit applies to).

        For a port fed ahead of the clock this includes packets computed to arrive later."""
        self._refresh()
        return self._queued

    @property
    def queued_packets(self) -> int:
        self._refresh()
        return len(self._pending)

    @property
    def busy_until(self) -> float:
        """When the last accepted packet finishes leaving (-inf if none yet)."""
        if self.trace is None:
            return self._prev_send
        return -math.inf if self._opp < 0 else self.trace.time_of(self._opp)

    def capacity_bps(self) -> float:
        """Constant rate, or the trace's mean capacity over one period."""
        return self.rate_bps if self.trace is None else self.trace.capacity_bps()

    def __repr__(self) -> str:
        rate = f"{self.rate_bps:g} bit/s" if self.trace is None else repr(self.trace)
        return f"Port({self.name!r}, {rate}, queue_bytes={self.queue_bytes})"


class _Flow:
    """One flow's state in a ``DrrPort``: its FIFO of (packet, route, i), DRR deficit and byte counts."""

    __slots__ = ("queue", "arrivals", "deficit", "queued", "delivered")

    def __init__(self):
        self.queue: deque[tuple[Any, tuple, int]] = deque()
        self.arrivals: deque[float] = deque()  # when each queued packet arrived (for sojourn times)
        self.deficit = 0
        self.queued = 0  # bytes waiting (not the packet in service)
        self.delivered = 0  # bytes handed on


class DrrPort:
    """A ``Port`` whose queue is one byte-limited drop-tail FIFO per flow, served by deficit round robin.

    Deficit round robin (Shreedhar & Varghese, 1996): active flows (those with packets waiting) take turns;
    a flow's turn adds ``quantum`` bytes to its deficit and sends head packets while they fit in it; a flow
    whose queue empties leaves the round with its deficit reset to 0; a newly active flow joins at the
    tail. Over any busy stretch the bytes two backlogged flows get differ by at most a few quanta and
    packet sizes, whatever their packet sizes: it shares bytes, not packets. The flow of a packet is
    ``packet.flow`` (None when the packet has no such attribute: one flow for everything, plain FIFO).

    ``queue_bytes`` limits each flow's queue, so a flow over its share is dropped and others are not. Rate,
    trace accounting, "the packet in service is not queued" and "an idle constant-rate port starts an
    arrival at once" are ``Port``'s; with one flow the departures are exactly ``Port``'s.

    Event-driven, unlike ``Port``: which packet leaves next depends on arrivals of other flows not yet
    seen, so nothing is computed ahead of the clock. ``put`` must be called at ``t == env.now`` (a ``Gate``
    before it when an earlier link feeds it, as ``Path`` arranges); the port arms one SimPy event per
    departure (per opportunity that ends a packet, on a trace) and hands each packet on at its departure.
    Counters are kept when packets arrive (in, dropped) and depart (``flow_bytes``).
    """

    __slots__ = ("env", "name", "trace", "rate_bps", "queue_bytes", "quantum", "_flows", "_active", "_fresh",
                 "_cur", "_cur_flow", "_event", "_due", "_opp", "_left", "_queued", "_npackets",
                 "packets_in", "bytes_in", "packets_dropped", "bytes_dropped", "sojourns")

    def __init__(self, env: simpy.Environment, rate: float | Trace, queue_bytes: int | None = None,
                 name: str = "port", quantum: int = 1500):
        self.trace, self.rate_bps, self.queue_bytes = _rate_and_limit(rate, queue_bytes, name)
        self.env = env
        self.name = name
        if int(quantum) != quantum or quantum < 1:
            raise LinkConfigError(f"{name}: quantum_bytes must be a whole number >= 1, got {quantum!r}")
        self.quantum = int(quantum)
        self._flows: dict[Any, _Flow] = {}
        self._active: deque[_Flow] = deque()  # flows with packets waiting, in round order
        self._fresh = True  # the head flow has not had its quantum for this turn yet
        self._cur: tuple[Any, tuple, int] | None = None  # in service: its last byte leaves at _due
        self._cur_flow: _Flow | None = None
        self._event: simpy.Event | None = None  # the armed event; a superseded one finds itself stale
        self._due = -math.inf
        self._opp, self._left = -1, 0  # trace: the opportunity in use and its budget left, as in Port
        self._queued = 0
        self._npackets = 0
        self.packets_in = 0
        self.bytes_in = 0
        self.packets_dropped = 0
        self.bytes_dropped = 0
        self.sojourns: list[float] | None = None  # as Port's: each packet's wait before it starts to leave

    def put(self, packet: Any, t: float, route: tuple, i: int) -> bool:
        env = self.env
        now = env.now
        if t != now:
            raise RuntimeError(f"{self.name}: a drr port takes packets at their arrival (t={t!r}, now={now!r})")
        size = packet.size
        self.packets_in += 1
        self.bytes_in += size
        while self._event is not None and self._due <= now:
            self._serve(None)  # departures due now go first: Port counts them gone at their time
        key = getattr(packet, "flow", None)
        flow = self._flows.get(key)
        if flow is None:
            flow = self._flows[key] = _Flow()
        if self._event is None and self.trace is None:  # idle constant rate: serialise at once
            if self.sojourns is not None:
                self.sojourns.append(0.0)
            self._start((packet, route, i), flow, size, now)
            return True
        limit = self.queue_bytes
        if limit is not None and flow.queued + size > limit:
            self.packets_dropped += 1
            self.bytes_dropped += size
            return False
        if not flow.queue:
            self._active.append(flow)
        flow.queue.append((packet, route, i))
        flow.arrivals.append(now)
        flow.queued += size
        self._queued += size
        self._npackets += 1
        if self._event is None:  # idle trace: wait for the first opportunity after now (Port's rule)
            self._opp, self._left = self.trace.index_after(now), self.trace.budget_bytes
            self._arm(self.trace.time_of(self._opp))
        return True

    def _arm(self, t: float) -> None:
        self._due = t
        ev = self._event = event_at(self.env, t)
        ev.callbacks.append(self._serve)

    def _start(self, entry: tuple[Any, tuple, int], flow: _Flow, size: int, now: float) -> None:
        self._cur, self._cur_flow = entry, flow
        d = 8 * size / self.rate_bps
        self._due = now + d  # Port's start + 8 * size / rate, and exactly where SimPy puts the timeout
        ev = self._event = self.env.timeout(d)
        ev.callbacks.append(self._serve)

    def _next(self) -> tuple[tuple[Any, tuple, int], _Flow, int]:
        """Take the next packet by DRR (some flow has one waiting)."""
        active = self._active
        while True:
            flow = active[0]
            if self._fresh:
                flow.deficit += self.quantum
                self._fresh = False
            entry = flow.queue[0]
            size = entry[0].size
            if size <= flow.deficit:
                flow.queue.popleft()
                arrived = flow.arrivals.popleft()
                if self.sojourns is not None:
                    self.sojourns.append(self.env.now - arrived)
                flow.deficit -= size
                flow.queued -= size
                self._queued -= size
                self._npackets -= 1
                if not flow.queue:
                    flow.deficit = 0
                    active.popleft()
                    self._fresh = True
                return entry, flow, size
            active.rotate(-1)  # its turn is over: to the tail, the next flow's turn
            self._fresh = True

    def _hand_on(self, entry: tuple[Any, tuple, int], flow: _Flow, now: float) -> None:
        packet, route, i = entry
        flow.delivered += packet.size
        route[i + 1].put(packet, now, route, i + 1)

    def _serve(self, event: simpy.Event | None) -> None:
        """The armed time has come: hand on what has left, start the next packet, arm the next event."""
        if event is not None and event is not self._event:
            return  # superseded: put() served this instant already
        self._event = None
        now = self.env.now
        if self._cur is not None:
            self._hand_on(self._cur, self._cur_flow, now)
            self._cur = self._cur_flow = None
        trace = self.trace
        if trace is None:
            if self._npackets:
                entry, flow, size = self._next()
                self._start(entry, flow, size, now)
            return
        opp, left = self._opp, self._left  # Port's trace accounting, one packet at a time
        while self._npackets:
            if left == 0:
                opp, left = opp + 1, trace.budget_bytes
                if trace.time_of(opp) > now:  # choose the next packet when it can start
                    self._opp, self._left = opp, left
                    self._arm(trace.time_of(opp))
                    return
            entry, flow, size = self._next()
            cost = size + TUN_HEADER_BYTES
            if cost <= left:  # leaves within this opportunity
                left -= cost
                self._hand_on(entry, flow, now)
                continue
            rest = cost - left
            k = -(-rest // trace.budget_bytes)
            opp += k
            left = k * trace.budget_bytes - rest
            if trace.time_of(opp) <= now:  # carried into opportunities of this same millisecond
                self._hand_on(entry, flow, now)
                continue
            self._cur, self._cur_flow = entry, flow
            self._opp, self._left = opp, left
            self._arm(trace.time_of(opp))
            return
        self._opp, self._left = opp, left

    # ---- observation ---------------------------------------------------------------------------------
    @property
    def queued_bytes(self) -> int:
        """Bytes waiting to start serialisation now, all flows together."""
        return self._queued

    @property
    def queued_packets(self) -> int:
        return self._npackets

    def flow_bytes(self) -> dict[Any, int]:
        """Bytes each flow has had handed on (departed), by ``packet.flow``."""
        return {key: flow.delivered for key, flow in self._flows.items()}

    def flow_queued_bytes(self, flow: Any = None) -> int:
        """Bytes of ``flow`` waiting now (what its queue limit applies to)."""
        f = self._flows.get(flow)
        return 0 if f is None else f.queued

    @property
    def busy_until(self) -> float:
        """When what has been accepted finishes leaving if nothing else arrives (-inf if idle and nothing
        was ever accepted; a constant-rate sum may differ from the departures by float rounding)."""
        if self._event is None:
            return self._due
        if self.trace is None:
            return self._due + 8 * self._queued / self.rate_bps
        if not self._npackets:
            return self._due
        rest = self._queued + TUN_HEADER_BYTES * self._npackets  # bytes carry over: one stream of them
        opp, left = self._opp, self._left
        if rest > left:
            opp += -(-(rest - left) // self.trace.budget_bytes)
        return self.trace.time_of(opp)

    capacity_bps = Port.capacity_bps

    def __repr__(self) -> str:
        rate = f"{self.rate_bps:g} bit/s" if self.trace is None else repr(self.trace)
        return f"DrrPort({self.name!r}, {rate}, queue_bytes={self.queue_bytes} per flow, quantum={self.quantum})"


# ---- loss ----------------------------------------------------------------------------------------------
class Loss:
    """Asks its ``LossModel`` once per packet, in packet order, drawing from its own generator.

    A time-based model (``lost_at``: a fade) is asked with the packet's time here, and ``outages`` (an
    ``Outages`` schedule) lose every packet whose time falls in one. The model is asked for every packet,
    in an outage or not, so adding an outage file changes no other packet's fate.

    A lost packet goes no further (``put`` returns True: the network took it). Counts trials, losses (those
    in outages among them) and bursts (runs of consecutive losses among the trials).
    """

    __slots__ = ("model", "rng", "outages", "packets_in", "bytes_in", "packets_lost", "bytes_lost", "bursts",
                 "_in_burst", "_lost_at", "_plain", "packets_lost_outage")

    def __init__(self, model: LossModel | None, rng: np.random.Generator, outages: Outages | None = None):
        self.model = model
        self.rng = rng
        self.outages = outages
        self._lost_at = getattr(model, "lost_at", None)
        self._plain = model is not None and self._lost_at is None and outages is None
        self.packets_in = 0  # = trials
        self.bytes_in = 0
        self.packets_lost = 0
        self.bytes_lost = 0
        self.packets_lost_outage = 0
        self.bursts = 0
        self._in_burst = False

    def _lost(self, t: float) -> bool:
        model = self.model
        if model is None:
            lost = False
        elif self._lost_at is not None:
            lost = self._lost_at(t, self.rng)
        else:
            lost = model.lost(self.rng)
        if self.outages is not None and self.outages.down_at(t):
            self.packets_lost_outage += 1
            return True
        return lost

    def put(self, packet: Any, t: float, route: tuple, i: int) -> bool:
        self.packets_in += 1
        self.bytes_in += packet.size
        # the per-packet models keep their fast path; time and outages need the packet's time
        if self.model.lost(self.rng) if self._plain else self._lost(t):
            self.packets_lost += 1
            self.bytes_lost += packet.size
            if not self._in_burst:
                self.bursts += 1
                self._in_burst = True
            return True
        self._in_burst = False
        return route[i + 1].put(packet, t, route, i + 1)

    @property
    def mean_burst(self) -> float:
        return self.packets_lost / self.bursts if self.bursts else 0.0

    def __repr__(self) -> str:
        extra = "" if self.outages is None else f", {self.outages!r}"
        return f"Loss({self.model!r}{extra})"


# ---- delay ---------------------------------------------------------------------------------------------
class Wire:
    """Propagation: ``delay`` seconds plus, when ``jitter`` > 0, a draw uniform on [-jitter, +jitter]
    (netem's default jitter distribution, no correlation), the sum clipped at 0; then the arrival is
    clipped to be no earlier than the previous packet's, so a wire never reorders (as netem with a rate).
    """

    __slots__ = ("delay", "jitter", "rng", "_last_arrival")

    def __init__(self, delay: float = 0.0, jitter: float = 0.0, rng: np.random.Generator | None = None,
                 name: str = "wire"):
        if not (delay >= 0 and math.isfinite(delay)) or not (jitter >= 0 and math.isfinite(jitter)):
            raise LinkConfigError(
                f"{name}: delay and jitter must be finite and >= 0 (got {delay!r}, {jitter!r})")
        if jitter and rng is None:
            raise LinkConfigError(f"{name}: jitter needs a random generator")
        self.delay = float(delay)
        self.jitter = float(jitter)
        self.rng = rng
        self._last_arrival = -math.inf

    def put(self, packet: Any, t: float, route: tuple, i: int) -> bool:
        d = self.delay
        if self.jitter:
            d += self.jitter * (2.0 * self.rng.random() - 1.0)
            if d < 0.0:
                d = 0.0
        arrival = t + d
        if arrival < self._last_arrival:
            arrival = self._last_arrival  # never overtake the packet ahead
        self._last_arrival = arrival
        return route[i + 1].put(packet, arrival, route, i + 1)

    def __repr__(self) -> str:
        return f"Wire(delay={self.delay:g}s, jitter={self.jitter:g}s)"


class Reorder:
    """netem-like reordering: a packet this element picks skips the ``Wire`` that follows it on the route.

    Parameters (netem's ``reorder P [CORR] gap N``):

    - ``probability`` P: the chance that an eligible packet is picked;
    - ``gap`` N (default 1, as tc sets it): after a picked packet, the next N - 1 packets always take the
      delay and are not eligible (netem's counter); from the N-th on each packet is eligible. Like netem,
      the first N - 1 packets are not eligible either. ``reorder 100% gap 5``: every 5th packet skips;
    - ``correlation`` C: the lag-1 correlation of successive decisions on eligible packets, as a two-state
      chain that keeps the marginal rate P: P(pick | previous eligible picked) = P + C (1 - P),
      P(pick | previous not picked) = P (1 - C); the first decision is plain P. (netem mixes uniforms,
      ``u = (1 - C) v + C u_prev``, which also pulls the pick rate away from P; we keep P.)

    A picked packet is handed past the wire at the time it reaches this element (its departure from the
    port): no delay, no jitter draw, so it overtakes packets still on the wire; the wire's no-overtaking
    rule does not see it. One uniform per eligible packet, from the element's own generator. Output
    times are no longer in order, so a ``ResequencingGate`` must follow the wire.
    """

    __slots__ = ("probability", "correlation", "gap", "rng", "_counter", "_prev", "packets_in", "packets_picked")

    def __init__(self, probability: float, correlation: float = 0.0, gap: int = 1, *,
                 rng: np.random.Generator):
        for name, v in (("probability", probability), ("correlation", correlation)):
            if not 0.0 <= v <= 1.0:
                raise LinkConfigError(f"reorder: {name} {v!r} is not within 0..1")
        if int(gap) != gap or gap < 1:
            raise LinkConfigError(f"reorder: gap must be a whole number >= 1, got {gap!r}")
        self.probability = float(probability)
        self.correlation = float(correlation)
        self.gap = int(gap)
        self.rng = rng
        self._counter = 0
        self._prev: bool | None = None  # the previous decision on an eligible packet
        self.packets_in = 0
        self.packets_picked = 0

    def picks(self) -> bool:
        """Decide for the next packet (advances the element's state)."""
        self.packets_in += 1
        if self._counter < self.gap - 1:
            self._counter += 1
            return False
        p, c, prev = self.probability, self.correlation, self._prev
        if prev is not None and c:
            p = p + c * (1.0 - p) if prev else p * (1.0 - c)
        picked = self.rng.random() < p
        self._prev = picked
        if picked:
            self._counter = 0
            self.packets_picked += 1
        else:
            self._counter += 1
        return picked

    def put(self, packet: Any, t: float, route: tuple, i: int) -> bool:
        if self.picks():
            return route[i + 2].put(packet, t, route, i + 2)
        return route[i + 1].put(packet, t, route, i + 1)

    def __repr__(self) -> str:
        return f"Reorder({self.probability:g}, correlation={self.correlation:g}, gap={self.gap})"


# ---- link boundaries -----------------------------------------------------------------------------------
class Exit:
    """Where a link hands packets straight to the next private link: counts them, no event."""

    __slots__ = ("packets_out", "bytes_out")

    def __init__(self):
        self.packets_out = 0
        self.bytes_out = 0

    in_flight = 0  # nothing waits here

    def put(self, packet: Any, t: float, route: tuple, i: int) -> bool:
        self.packets_out += 1
        self.bytes_out += packet.size
        return route[i + 1].put(packet, t, route, i + 1)


class Gate:
    """The event boundary: holds packets until their computed time, then hands each on at ``env.now``.

    Input times must not decrease (FIFO). One SimPy event is armed for the head at a time, so a packet
    costs at most one event and packets due at the same instant share one. With ``deliver`` the gate ends
    its route and calls ``deliver(packet)``; otherwise it is bound (``bind``) to the route and position
    of the element it feeds. Counts packets when it hands them on; ``in_flight`` = packets held.
    """

    __slots__ = ("env", "deliver", "packets_out", "bytes_out", "_held", "_armed", "_route", "_next")

    def __init__(self, env: simpy.Environment, deliver: Callable[[Any], None] | None = None):
        self.env = env
        self.deliver = deliver
        self.packets_out = 0
        self.bytes_out = 0
        self._held: deque[tuple[float, Any]] = deque()
        self._armed = False
        self._route: tuple = ()
        self._next = -1

    def bind(self, route: tuple, i: int) -> None:
        """Hand packets on to ``route[i]`` (for a gate without ``deliver``)."""
        self._route, self._next = route, i

    def put(self, packet: Any, t: float, route: tuple, i: int) -> bool:
        self._held.append((t, packet))
        if not self._armed:
            self._armed = True
            event_at(self.env, t).callbacks.append(self._release)
        return True

    def _release(self, _event: simpy.Event) -> None:
        now = self.env.now
        held = self._held
        deliver = self.deliver
        while held and held[0][0] <= now:
            _, packet = held.popleft()
            self.packets_out += 1
            self.bytes_out += packet.size
            if deliver is not None:
                deliver(packet)  # may send again, on this route or another
            else:
                self._route[self._next].put(packet, now, self._route, self._next)
        if held:
            event_at(self.env, held[0][0]).callbacks.append(self._release)
        else:
            self._armed = False

    @property
    def in_flight(self) -> int:
        return len(self._held)


class ResequencingGate(Gate):
    """A ``Gate`` for input out of time order (after a ``Reorder``): hands packets on by time, FIFO on ties.

    An early packet behind a later armed one arms an earlier event; an event that finds nothing due only
    re-arms for what is left.
    """

    __slots__ = ("_heap", "_seq", "_alarms")

    def __init__(self, env: simpy.Environment, deliver: Callable[[Any], None] | None = None):
        super().__init__(env, deliver)
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = 0
        self._alarms: list[float] = []  # times of the events armed and not yet fired

    def _arm(self, t: float) -> None:
        heappush(self._alarms, t)
        event_at(self.env, t).callbacks.append(self._release)

    def put(self, packet: Any, t: float, route: tuple, i: int) -> bool:
        self._seq += 1
        heappush(self._heap, (t, self._seq, packet))
        if not self._alarms or t < self._alarms[0]:
            self._arm(t)
        return True

    def _release(self, _event: simpy.Event) -> None:
        heappop(self._alarms)
        now = self.env.now
        heap = self._heap
        deliver = self.deliver
        while heap and heap[0][0] <= now:
            packet = heappop(heap)[2]
            self.packets_out += 1
            self.bytes_out += packet.size
            if deliver is not None:
                deliver(packet)
            else:
                self._route[self._next].put(packet, now, self._route, self._next)
        if heap and (not self._alarms or heap[0][0] < self._alarms[0]):
            self._arm(heap[0][0])

    @property
    def in_flight(self) -> int:
        return len(self._heap)

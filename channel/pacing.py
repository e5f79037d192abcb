"""Pacing: one sender's datagrams leave at a rate estimated from what its path delivered, not in bursts.

Without it a sender hands a whole image to its path at once, and senders that share a bottleneck fill
its queue (up to its drop-tail limit: seconds of delay). A ``Pacer`` sits between one sender (all of its
images in flight: one flow) and its path: datagrams queue in the pacer, FIFO, and leave one by one at the
paced rate; the path's queues stay short and the backlog waits at the sender, where nothing is lost.

Signals (no new protocol field). Every POLL that leaves the pacer is timed, and the FEEDBACK that answers
it (same image id and token) gives an RTT sample that excludes the time spent in the pacer. Because a
flow's packets stay in order on the path, the answer to a POLL also says that every byte released before
it has arrived (or was lost on the way): answers about two min RTTs apart give a delivery-rate sample,
BBR's ``bytes / max(send interval, ack interval)`` (spans under a quarter of min_rtt are a burst's spacing
and are not used). The transport's own POLLs (``arq``, ``hybrid``) are used as they are; where they are too
sparse (``none`` and ``fec`` send none; a long image sends one per round), the pacer adds a **probe**: a
POLL with token 0, which no round uses, for an image id counted down from 0xFFFF that the stream has not
used, so the receiver answers ``{token 0, complete false}`` and keeps no state (proto/PROTOCOL.md 3.2). A
probe follows every ``probe_bytes`` of data with no POLL among them, and the tail of a burst; at the
default about 0.4 % of the bytes (``bench_pacing`` measures it). Loss: the share of a round's bytes the
transport asked to resend (counted when it asks, so a backlog of old resends is not new loss).

Control: AIMD on the queueing delay (``rtt - min_rtt``) on the rate, in the manner of Swift (Kumar et al.,
SIGCOMM 2020); BBR's model (delivery rate, min RTT, its startup) gives the start and the base of a
decrease. Why this and not BBR's gain cycle or LEDBAT:

- fairness: senders on one bottleneck see the same queueing delay, so they decrease together, by the same
  factor, and increase by the same amount: Chiu and Jain's AIMD argument, the differences between their
  rates shrink at every decrease. LEDBAT's controller is additive both ways and keeps whatever unfairness
  it starts with; BBR v1's max filter over-estimates each flow's share when many probe at once and leans on
  a window of 2 BDP (at least 4 packets: with 32 small flows that alone is more than the pipe) to bound
  the queue.
- delay: above ``target_delay_s`` of queueing (25 ms) the rate becomes the delivered rate times
  ``1 - beta (q - target) / q`` (at most ``max_decrease`` off), once per round trip of what left after the
  previous decrease and not while the queue is already draining; below it the rate grows by
  ``increase_packets`` per RTT per RTT, less as the delay nears the target, so 32 senders together do not
  overshoot. The queue hovers near the target whatever the number of senders. On a slow flow the target
  is at least 1.5 of its own packet times (at 16 kbit/s a 1212-byte packet alone takes 600 ms): senders
  sharing a slow bottleneck cannot queue less than a packet each, and the slower ones tolerate more.
- utilisation: decreases are small when the overshoot is, so the queue seldom drains.
- a drop-tail queue that is full shows no delay to a sender that started behind it (its min_rtt includes
  the queue): a round with more than ``loss_threshold`` of resends cuts by ``max_decrease``; on a link
  with random loss below that threshold the pacer does not react to loss at all.

Startup: from ``initial_rate_bps`` (after ``initial_burst`` packets at once) the rate follows twice the
highest delivery rate seen, at most doubling per round trip (BBR's startup), until the queueing delay
passes half the target, the RTT grows by a quarter of the target within a round trip, the delivery rate
stops growing (by 25 % in 3 rounds) or a round is lossy; then it drops to what was delivered and the AIMD
phase begins. A sender with nothing waiting (app-limited) does not increase. With no answer for
``silence_s`` (and at least 4 RTTs) while data was sent, the rate halves, once per period.

Sans I/O like the transport: ``push`` datagrams, ``release(now)`` takes the ones due, ``next_release_at``
says when to call again, ``on_feedback(data, now)`` takes every FEEDBACK packet of the stream (before the
transport sees it). ``SimPacer`` drives one in SimPy; ``ThreadPacer`` on the wall clock (live sender).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from miscnet.channel.packet import FEEDBACK, POLL, Datagram, Packet, PacketError, decode_packet
from miscnet.core.errors import MiscError

PACING_MODES = ("aimd", "off")  # "aimd": this module's pacer; "off": datagrams go to the path at once
PROBE_TOKEN = 0  # round tokens are 1..0xFFFE and the final POLL's is 0xFFFF: 0 is free for probes
PROBE_IDS = 4096  # probes use image ids 0xFFFF, 0xFFFE, ... (this many, cycled): far above a stream's own
SAMPLE_RTTS = 2  # a delivery-rate sample spans this many min RTTs (fewer: too few packets of a slow flow)
TARGET_PACKETS = 1.5  # the target is at least this many of the flow's own packet times
DRAINING_S = 0.001  # a queueing delay this much under the one that caused the last decrease: it drains
MAX_TIMED_POLLS = 1024  # POLLs awaiting an answer the pacer remembers (the oldest are forgotten)


class PacingError(MiscError):
    """A pacing setting that cannot be used (the message names it)."""


@dataclass(frozen=True)
class PacingConfig:
    mode: str = "aimd"
    target_delay_s: float = 0.025  # queueing delay the controller holds the path to
    initial_rate_bps: float = 1e6
    min_rate_bps: float = 8e3
    max_rate_bps: float = 1e9
    initial_burst: int = 4  # packets that may leave at once at the start (RFC 3390-like initial window)
    burst_packets: int = 2  # credit a sender idle for a while may spend at once
    beta: float = 0.5  # decrease: rate = delivered * (1 - beta * (q - target) / q) ...
    max_decrease: float = 0.3  # ... by at most this, once per round trip
    increase_packets: float = 0.2  # increase: this many packets per RTT, per RTT
    packet_bytes: int = 1212  # a full packet (MTU payload + header): the unit of the increase and bursts
    probe_bytes: int = 2424  # data released between two timed POLLs, at least
    min_rtt_window_s: float = 30.0  # the propagation delay is the least RTT seen within this window
    silence_s: float = 1.0
    loss_threshold: float = 0.1  # a round whose resends are over this share of its bytes: congestion

    def __post_init__(self) -> None:
        if self.mode not in PACING_MODES:
            raise PacingError(f"pacing {self.mode!r} unknown (use {' or '.join(PACING_MODES)})")
        for name in ("target_delay_s", "initial_rate_bps", "min_rate_bps", "max_rate_bps", "min_rtt_window_s",
                     "silence_s", "increase_packets"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise PacingError(f"pacing {name}: a positive number, not {value!r}")
        if not self.min_rate_bps <= self.initial_rate_bps <= self.max_rate_bps:
            raise PacingError("pacing: min_rate_bps <= initial_rate_bps <= max_rate_bps does not hold")
        if not (0 < self.beta <= 1 and 0 < self.max_decrease < 1):
            raise PacingError(f"pacing: beta in (0, 1] and max_decrease in (0, 1), not {self.beta}, "
                              f"{self.max_decrease}")
        for name in ("initial_burst", "burst_packets", "packet_bytes", "probe_bytes"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise PacingError(f"pacing {name}: a whole number >= 1, not {getattr(self, name)!r}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def pacing_config(mode: str | None) -> PacingConfig | None:
    """The config for a mode name ("aimd", "off"); None for "off"; PacingError for anything else."""
    config = PacingConfig(mode=str(mode))
    return config if config.enabled else None


@dataclass
class _TimedPoll:
    sent_at: float
    released: int  # bytes the pacer had released, this POLL included
    idle_epoch: int  # how many times the pacer had run dry by then (a sample across one is app-limited)


@dataclass
class PacerStats:
    datagrams: int = 0
    bytes: int = 0
    probes: int = 0
    probe_bytes: int = 0
    rtt_samples: int = 0
    rate_samples: int = 0
    decreases: int = 0
    max_backlog_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Pacer:
    """One flow's pacer (sans I/O). Rates inside are bytes per second; ``rate_bps`` reports bit/s."""

    def __init__(self, config: PacingConfig | None = None, now: float = 0.0):
        self.config = config = config or PacingConfig()
        self.rate = config.initial_rate_bps / 8
        self.state = "startup"  # -> "steady"
        self.min_rtt: float | None = None
        self.srtt: float | None = None
        self.delivery_rate: float | None = None  # the latest delivery-rate sample (bytes/s)
        self.max_delivery = 0.0  # the highest in startup
        self.queue: deque[Datagram] = deque()
        self.backlog_bytes = 0
        self.stats = PacerStats()
        self._next = now  # when the head may leave
        self._credit = config.initial_burst * config.packet_bytes  # bytes that may leave ahead of the rate
        self._released = 0
        self._since_poll = 0  # data bytes released since the last timed POLL
        self._idle_epoch = 0
        self._polls: dict[tuple[int, int], _TimedPoll] = {}
        self._answers: deque[tuple[_TimedPoll, int, float]] = deque()  # (poll, released, answered at)
        self._last_answer_at = now
        self._rtt_window: deque[tuple[float, float]] = deque()  # (time, rtt): a windowed minimum
        self._decrease_mark = 0  # bytes released when the rate last decreased
        self._retransmitted = 0  # bytes the transport asked to resend (its loss recovery): the loss signal
        self._loss_mark = (0, 0)  # (released, retransmitted) when the current loss round began
        self.loss_fraction = 0.0  # share of the last round's bytes that were resends
        self._round_mark = 0  # startup: bytes released when the current round began, and the rate then
        self._round_rate = self.rate
        self._full_delivery = 0.0  # ... the delivery rate it has to beat by 25 %, and for how many rounds not
        self._flat_rounds = 0
        self._cut_queueing: float | None = None  # the queueing delay that caused it, in this episode
        self._last_increase: float | None = None
        self._last_sent = now
        self._silent_cut_at = now
        self._probe_seq = 0

    # ---- the data path --------------------------------------------------------------------------------
    @property
    def rate_bps(self) -> float:
        return self.rate * 8

    def push(self, datagrams: Iterable[Datagram], now: float) -> None:
        # idle after sending (not the first push: that one keeps the initial burst)
        was_empty = not self.queue and self._released > 0
        for dg in datagrams:
            self.queue.append(dg)
            self.backlog_bytes += dg.size
            if dg.role == "retransmit":  # counted when the transport asks (it just learnt of a loss), not
                self._retransmitted += dg.size  # when it leaves: a backlog of old resends is no new loss
        if was_empty and self.queue and self._next < now:
            # idle until now: the schedule restarts now, with at most burst_packets of credit
            cap = self.config.burst_packets * self.config.packet_bytes
            self._credit = min(cap, max(self._credit, (now - self._next) * self.rate))
            self._next = now
        self.stats.max_backlog_bytes = max(self.stats.max_backlog_bytes, self.backlog_bytes)

    def next_release_at(self) -> float | None:
        """When ``release`` has something to hand on (None: nothing queued)."""
        if not self.queue:
            return None
        return self._next if self._credit < self.queue[0].size else -math.inf

    def release(self, now: float) -> list[Datagram]:
        """The datagrams due at ``now``, in order, probes included; the caller sends them at once."""
        out: list[Datagram] = []
        self._check_silence(now)
        while self.queue:
            head = self.queue[0]
            if self._credit >= head.size:
                self._credit -= head.size
            elif self._next <= now:
                self._next = max(self._next, now - self.config.packet_bytes / self.rate) + head.size / self.rate
            else:
                break
            self.queue.popleft()
            self.backlog_bytes -= head.size
            self._sent(head, now, out)
            if self._since_poll >= self.config.probe_bytes:
                self._sent(self._probe(), now, out)
        if not self.queue and out:
            if self._since_poll:  # data with no POLL behind it: time its tail
                self._sent(self._probe(), now, out)
            self._idle_epoch += 1
        return out

    def _sent(self, dg: Datagram, now: float, out: list[Datagram]) -> None:
        self._released += dg.size
        self._last_sent = now
        self.stats.datagrams += 1
        self.stats.bytes += dg.size
        if dg.role == "poll":
            head = _poll_key(dg.data)
            if head is not None:
                self._polls[head] = _TimedPoll(now, self._released, self._idle_epoch)
                if len(self._polls) > MAX_TIMED_POLLS:
                    self._polls.pop(next(iter(self._polls)))
                self._since_poll = 0
        else:
            self._since_poll += dg.size
        out.append(dg)

    def _probe(self) -> Datagram:
        image_id = 0xFFFF - self._probe_seq % PROBE_IDS
        self._probe_seq += 1
        data = Packet(POLL, image_id, 0, PROBE_TOKEN, 0).encode()
        self.stats.probes += 1
        self.stats.probe_bytes += len(data)
        return Datagram(data, "poll", image_id)

    # ---- feedback ----------------------------------------------------------------------------------------
    def on_feedback(self, data: bytes, now: float) -> bool:
        """A FEEDBACK packet of this stream arrived; True if it answers one of the pacer's own probes (the
        transport can ignore it: it answers nothing the transport asked)."""
        try:
            packet = decode_packet(data)
        except PacketError:
            return False
        if packet.kind != FEEDBACK:
            return False
        key = (packet.image_id, packet.symbol)
        poll = self._polls.pop(key, None)
        if poll is not None:
            self._on_answer(poll, now)
        return packet.symbol == PROBE_TOKEN

    def _on_answer(self, poll: _TimedPoll, now: float) -> None:
        cfg = self.config
        rtt = now - poll.sent_at
        self.stats.rtt_samples += 1
        self.srtt = rtt if self.srtt is None else 0.875 * self.srtt + 0.125 * rtt
        window = self._rtt_window
        while window and window[-1][1] >= rtt:
            window.pop()
        window.append((now, rtt))
        while window[0][0] < now - cfg.min_rtt_window_s:
            window.popleft()
        self.min_rtt = window[0][1]
        # delivery rate over about one round trip of answers (consecutive answers are a few packets apart:
        # too short a span to average out other flows' packets between them)
        answers = self._answers
        while len(answers) > 1 and answers[1][2] <= now - SAMPLE_RTTS * self.min_rtt:
            answers.popleft()
        app_limited, rising = True, 0.0
        if answers:
            rising = rtt - (answers[0][2] - answers[0][0].sent_at)  # the RTT's growth over that round trip
        if answers and poll.released > answers[0][0].released:
            prev, prev_at = answers[0][0], answers[0][2]
            app_limited = poll.idle_epoch != prev.idle_epoch
            interval = max(poll.sent_at - prev.sent_at, now - prev_at)
            if interval >= self.min_rtt / 4:  # shorter: a burst's spacing (or drops), not the path's rate
                self.delivery_rate = (poll.released - prev.released) / interval
                self.stats.rate_samples += 1
        if not answers or poll.released > answers[-1][0].released:
            answers.append((poll, poll.released, now))
            self._last_answer_at = now
        self._control(rtt - self.min_rtt, rising, app_limited, poll.released, now)

    def target_delay(self) -> float:
        """The queueing delay held to: ``target_delay_s``, or more on a slow flow, where a packet of each
        sender sharing the bottleneck takes longer than that to drain (about this flow's own packet time
        at its rate; Swift scales its target for small windows likewise, and it pulls slow flows up)."""
        return max(self.config.target_delay_s, TARGET_PACKETS * self.config.packet_bytes / self.rate)

    def _control(self, queueing: float, rising: float, app_limited: bool, released: int, now: float) -> None:
        cfg = self.config
        srtt = max(self.srtt or 0.0, 1e-3)
        target = self.target_delay()
        lossy = False
        if released > self._loss_mark[0]:  # a round trip since the mark: the resends it caused have left
            total = self._released - self._loss_mark[0]
            self.loss_fraction = (self._retransmitted - self._loss_mark[1]) / total if total else 0.0
            self._loss_mark = (self._released, self._retransmitted)
            lossy = self.loss_fraction > cfg.loss_threshold
        if self.state == "startup":
            # BBR's startup ends when the delivery rate stops growing (by 25 % in 3 rounds); a queue says
            # so sooner: its delay passes half the target, or the RTT grew by a quarter of the target in
            # one round trip (a sender that starts behind others' queue does not see it in min_rtt)
            if self.delivery_rate is not None and not app_limited:
                self.max_delivery = max(self.max_delivery, self.delivery_rate)
                self.rate = min(max(self.rate, 2 * self.max_delivery), 2 * self._round_rate)
                if released > self._round_mark:  # a round trip: the data sent when the last one ended is in
                    self._round_mark, self._round_rate = self._released, self.rate
                    if self.max_delivery >= 1.25 * self._full_delivery:
                        self._full_delivery, self._flat_rounds = self.max_delivery, 0
                    else:
                        self._flat_rounds += 1
            if (queueing > target / 2 or rising > target / 4 or self._flat_rounds >= 3
                    or lossy):
                self.state = "steady"
                self.rate = max(self.delivery_rate or self.rate, cfg.min_rate_bps / 8)
                self._decrease_mark = self._released
        elif lossy and released > self._decrease_mark:
            # a full drop-tail queue (a sender that started behind it sees no delay of its own): cut hard
            self.rate = min(self.rate, self.delivery_rate or self.rate) * (1 - cfg.max_decrease)
            self._decrease_mark = self._released
            self.stats.decreases += 1
        elif queueing > target:
            # from what was delivered (the share this flow had), not from what was sent; once per round
            # trip of what left after the last decrease, and not while the queue drains after one (a second
            # decrease would take it below the target: idle link)
            draining = self._cut_queueing is not None and queueing < self._cut_queueing - DRAINING_S
            if released > self._decrease_mark and not draining:
                base = min(self.rate, self.delivery_rate or self.rate)
                self.rate = base * max(1 - cfg.beta * (queueing - target) / queueing,
                                       1 - cfg.max_decrease)
                self._decrease_mark = self._released
                self._cut_queueing = queueing
                self.stats.decreases += 1
        else:
            self._cut_queueing = None
        if self.state == "steady" and queueing <= target and not app_limited \
                and self._last_increase is not None:
            # bytes/s per RTT, less as the delay nears the target: many senders together do not overshoot
            step = cfg.increase_packets * cfg.packet_bytes / srtt * (1 - max(queueing, 0.0) / target)
            self.rate += step * min(now - self._last_increase, srtt) / srtt
        self._last_increase = now
        self.rate = min(max(self.rate, cfg.min_rate_bps / 8), cfg.max_rate_bps / 8)

    def _check_silence(self, now: float) -> None:
        """No answer for a long while although data went out: the path may have collapsed; halve the rate."""
        period = max(self.config.silence_s, 4 * (self.srtt or 0.0))
        if (self._last_sent - self._last_answer_at > period and now - self._silent_cut_at > period
                and now - self._last_answer_at > period):
            self.rate = max(self.rate / 2, self.config.min_rate_bps / 8)
            self._silent_cut_at = now
            if self.state == "startup":
                self.state = "steady"


def _poll_key(data: bytes) -> tuple[int, int] | None:
    """(image id, token) of a POLL the sender made (its own packet: no need to verify the checksum)."""
    if len(data) < 6 or (data[0] >> 3) & 7 != POLL:
        return None
    return int.from_bytes(data[1:3], "big"), int.from_bytes(data[4:6], "big")


# ---------------------------------------------------------------- drivers

class SimPacer:
    """A pacer in SimPy: ``send(datagrams)`` instead of the path's ``send``; ``on_feedback(data)`` for
    every FEEDBACK of the flow (returns True for the answer to a probe). ``send_fn`` takes one datagram."""

    def __init__(self, env, config: PacingConfig, send_fn: Callable[[Datagram], object]):
        self.env = env
        self.pacer = Pacer(config, env.now)
        self.send_fn = send_fn
        self._wake = None  # the pending wake-up event, if any
        self._wake_at = math.inf

    def send(self, datagrams: Iterable[Datagram]) -> None:
        self.pacer.push(datagrams, self.env.now)
        self._drain()

    def on_feedback(self, data: bytes) -> bool:
        probe = self.pacer.on_feedback(data, self.env.now)
        self._drain()  # the rate may have risen
        return probe

    def _drain(self) -> None:
        for dg in self.pacer.release(self.env.now):
            self.send_fn(dg)
        at = self.pacer.next_release_at()
        if at is None or at >= self._wake_at:
            return
        self._wake_at = at
        ev = self._wake = self.env.timeout(max(0.0, at - self.env.now))
        ev.callbacks.append(self._woken)

    def _woken(self, event) -> None:
        if event is not self._wake:
            return  # superseded by an earlier wake-up
        self._wake, self._wake_at = None, math.inf
        self._drain()

    @property
    def backlog_bytes(self) -> int:
        return self.pacer.backlog_bytes


class ThreadPacer:
    """A pacer on the wall clock: a thread hands each datagram to ``send_fn`` at its time.

    ``send`` and ``on_feedback`` may be called from any thread; ``send_fn`` is called from the pacer's
    thread only, in order. ``close`` waits (up to ``wait_s``) for the backlog to leave, then stops."""

    def __init__(self, config: PacingConfig, send_fn: Callable[[Datagram], object],
                 clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.pacer = Pacer(config, clock())
        self.send_fn = send_fn
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="pacer")
        self._thread.start()

    def send(self, datagrams: Iterable[Datagram]) -> None:
        with self._cond:
            self.pacer.push(list(datagrams), self.clock())
            self._cond.notify()

    def on_feedback(self, data: bytes) -> bool:
        with self._cond:
            probe = self.pacer.on_feedback(data, self.clock())
            self._cond.notify()
            return probe

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop and not self.pacer.queue:
                    return
                due = self.pacer.release(self.clock())
                if not due:
                    at = self.pacer.next_release_at()
                    self._cond.wait(timeout=None if at is None else max(0.0, at - self.clock()))
                    continue
            for dg in due:  # outside the lock: send_fn may block
                self.send_fn(dg)

    def close(self, wait_s: float = 5.0) -> None:
        end = self.clock() + wait_s
        with self._cond:
            while self.pacer.queue and self.clock() < end:
                self._cond.wait(timeout=0.05)
            self._stop = True
            self.pacer.queue.clear()
            self._cond.notify()
        self._thread.join(timeout=1.0)

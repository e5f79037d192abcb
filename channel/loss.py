"""Packet loss models with netem's parameters, defaults and per-packet algorithms.

Each model is stateful (a Markov chain) and draws from a numpy Generator the caller owns, so a scenario
seeded once replays the same losses. ``lost(rng)`` is asked once per packet, in packet order.

- ``Bernoulli(p)``: netem ``loss random P``.
- ``GilbertElliott(p, r, 1-h, 1-k)``: netem ``loss gemodel``. States Good/Bad; p = P(Good->Bad),
  r = P(Bad->Good), 1-h = loss probability in Bad, 1-k = loss probability in Good. Defaults as tc sets
  them: r = 1-p, 1-h = 100 %, 1-k = 0 %; with only p given the chain forgets its state every packet, so it
  IS Bernoulli(p). Like the kernel (``loss_gilb_ell``), a packet's fate follows the state it finds, and the
  state moves on for the next packet.
- ``FourState(p13, p31, p32, p23, p14)``: netem ``loss state``, the 4-state model of Salsano et al.
  (1 = received in a gap, 2 = received in a burst, 3 = lost in a burst, 4 = isolated loss). Defaults as tc:
  p31 = 1-p13, p32 = 0, p23 = 100 %, p14 = 0 (p13 alone is Bernoulli). Like the kernel (``loss_4state``)
  one uniform draw picks the next state and the packet is lost when that state is 3 or 4.

Every model reports ``mean_loss()``, ``mean_burst()`` (mean run of consecutive losses) and
``loss_rate_stderr(n)`` (standard error of a loss rate measured over n packets, for honest tolerances).

Loss in time, which netem does not have: a radio link fades for seconds whatever the sender does, so the
state must change with the clock, not with the packet count.

- ``TimeGilbertElliott(mean_good_s, mean_bad_s, loss_good, loss_bad)`` (``fade GOOD BAD [LG LB]``): Good and
  Bad hold for exponential durations with the given means (an alternating renewal process, started in its
  stationary law at time 0); a packet is lost with the probability of the state at its time on the link (``lost_at(t,
  rng)``). The state schedule draws from a stream of its own spawned from the link's loss generator, so
  it is the same whatever the traffic: a 2 s fade drops every packet sent in it, one or a thousand.
- ``Outages``: intervals read from a file during which the link delivers nothing, optionally repeating
  every ``period``; a separate link option (``outage = FILE``), combined with any loss model.
"""

from __future__ import annotations

import copy
import math
from bisect import bisect_right
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from miscnet.channel.errors import LinkConfigError

if TYPE_CHECKING:
    from miscnet.channel.trace import Trace


@runtime_checkable
class LossModel(Protocol):
    """What the link needs from a loss model."""

    def lost(self, rng: np.random.Generator) -> bool: ...

    def mean_loss(self) -> float: ...

    def mean_burst(self) -> float: ...

    @property
    def spec(self) -> str: ...


def _check(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise LinkConfigError(f"loss parameter {name}={value!r} is not a probability (0..1)")
    return value


def _pct(x: float) -> str:
    return f"{x * 100:.10g}%"


def _chain_stats(t: np.ndarray, g: np.ndarray, start: int) -> tuple[float, float, float]:
    """(mean loss, mean burst, asymptotic variance per packet) of a loss process driven by a Markov chain.

    Packet n is lost with probability g[S_n], independently given the state sequence S. The stationary law
    is the Cesaro limit from ``start`` (computed by doubling), so absorbing or periodic chains still get
    the long-run answer the simulation converges to.
    """
    k = t.shape[0]
    power, avg = t.copy(), t.copy()  # avg = (1/N) sum_{j=1..N} T^j with N = 1, 2, 4, ...
    for _ in range(60):
        avg = (avg + power @ avg) / 2.0
        power = power @ power
    pi = avg[start]
    pi = pi / pi.sum()
    loss = float(pi @ g)
    # a burst starts where a received packet is followed by a lost one
    starts = float(pi @ ((1.0 - g) * (t @ g)))
    if loss <= 0.0:
        burst = 0.0
    elif starts <= 1e-300:
        burst = math.inf
    else:
        burst = loss / starts
    try:  # sum over lags of the autocovariance via the fundamental matrix (ergodic chains)
        z = np.linalg.inv(np.eye(k) - t + np.outer(np.ones(k), pi))
        cov_sum = float(pi @ (g * ((z - np.eye(k)) @ g)))
        var = loss * (1.0 - loss) + 2.0 * cov_sum
    except np.linalg.LinAlgError:
        var = math.nan
    return loss, burst, max(var, 0.0)


class Bernoulli:
    """netem ``loss random P``: every packet lost independently with probability p."""

    __slots__ = ("p",)

    def __init__(self, p: float):
        self.p = _check(p, "p")

    def lost(self, rng: np.random.Generator) -> bool:
        return rng.random() < self.p

    def mean_loss(self) -> float:
        return self.p

    def mean_burst(self) -> float:
        if self.p == 0.0:
            return 0.0
        return math.inf if self.p == 1.0 else 1.0 / (1.0 - self.p)

    def loss_rate_stderr(self, n: int) -> float:
        return math.sqrt(self.p * (1.0 - self.p) / n)

    @property
    def spec(self) -> str:
        return f"random {_pct(self.p)}"

    def __repr__(self) -> str:
        return f"Bernoulli(p={self.p!r})"


class GilbertElliott:
    """netem ``loss gemodel p [r [1-h [1-k]]]``; starts in Good, as the kernel does."""

    __slots__ = ("p", "r", "one_minus_h", "one_minus_k", "bad")

    def __init__(self, p: float, r: float | None = None, one_minus_h: float | None = None,
                 one_minus_k: float | None = None):
        self.p = _check(p, "p")
        self.r = _check(1.0 - self.p if r is None else r, "r")
        self.one_minus_h = _check(1.0 if one_minus_h is None else one_minus_h, "1-h")
        self.one_minus_k = _check(0.0 if one_minus_k is None else one_minus_k, "1-k")
        self.bad = False

    def lost(self, rng: np.random.Generator) -> bool:
        # kernel order: two draws, the transition first, then the loss with the state the packet found
        if self.bad:
            if rng.random() < self.r:
                self.bad = False
            return rng.random() < self.one_minus_h
        if rng.random() < self.p:
            self.bad = True
        return rng.random() < self.one_minus_k

    def mean_loss(self) -> float:
        """L = (r(1-k) + p(1-h)) / (p + r): time in Good times its loss, plus time in Bad times its loss."""
        p, r = self.p, self.r
        if p == 0.0:
            return self.one_minus_k  # never leaves Good
        return (r * self.one_minus_k + p * self.one_minus_h) / (p + r)

    def _chain(self) -> tuple[np.ndarray, np.ndarray]:
        t = np.array([[1.0 - self.p, self.p], [self.r, 1.0 - self.r]])
        return t, np.array([self.one_minus_k, self.one_minus_h])

    def mean_burst(self) -> float:
        """Mean run of consecutive losses; 1/r in the (simple) Gilbert case 1-h = 1, 1-k = 0."""
        if self.one_minus_h == 1.0 and self.one_minus_k == 0.0 and self.p > 0.0:
            return math.inf if self.r == 0.0 else 1.0 / self.r
        return _chain_stats(*self._chain(), start=0)[1]

    def loss_rate_stderr(self, n: int) -> float:
        return math.sqrt(_chain_stats(*self._chain(), start=0)[2] / n)

    @property
    def spec(self) -> str:
        return f"gemodel {_pct(self.p)} {_pct(self.r)} {_pct(self.one_minus_h)} {_pct(self.one_minus_k)}"

    def __repr__(self) -> str:
        return (f"GilbertElliott(p={self.p!r}, r={self.r!r}, one_minus_h={self.one_minus_h!r}, "
                f"one_minus_k={self.one_minus_k!r})")


class FourState:
    """netem ``loss state p13 [p31 [p32 [p23 [p14]]]]``; starts in state 1, as the kernel does."""

    __slots__ = ("p13", "p31", "p32", "p23", "p14", "state")

    def __init__(self, p13: float, p31: float | None = None, p32: float | None = None,
                 p23: float | None = None, p14: float | None = None):
        self.p13 = _check(p13, "p13")
        self.p31 = _check(1.0 - self.p13 if p31 is None else p31, "p31")
        self.p32 = _check(0.0 if p32 is None else p32, "p32")
        self.p23 = _check(1.0 if p23 is None else p23, "p23")
        self.p14 = _check(0.0 if p14 is None else p14, "p14")
        if self.p13 + self.p14 > 1.0 + 1e-12:
            raise LinkConfigError(f"loss state: p13 + p14 = {self.p13 + self.p14:.6g} exceeds 100%")
        if self.p31 + self.p32 > 1.0 + 1e-12:
            raise LinkConfigError(f"loss state: p31 + p32 = {self.p31 + self.p32:.6g} exceeds 100%")
        self.state = 1

    def lost(self, rng: np.random.Generator) -> bool:
        u = rng.random()
        s = self.state
        if s == 1:
            if u < self.p14:
                self.state = 4
                return True
            if u < self.p14 + self.p13:
                self.state = 3
                return True
            return False
        if s == 2:
            if u < self.p23:
                self.state = 3
                return True
            return False
        if s == 3:
            if u < self.p32:
                self.state = 2
                return False
            if u < self.p32 + self.p31:
                self.state = 1
                return False
            return True
        self.state = 1  # state 4: an isolated loss always returns to the gap
        return False

    def _chain(self) -> tuple[np.ndarray, np.ndarray]:
        t = np.array([
            [1.0 - self.p13 - self.p14, 0.0, self.p13, self.p14],
            [0.0, 1.0 - self.p23, self.p23, 0.0],
            [self.p31, self.p32, 1.0 - self.p31 - self.p32, 0.0],
            [1.0, 0.0, 0.0, 0.0],
        ])
        return t, np.array([0.0, 0.0, 1.0, 1.0])

    def mean_loss(self) -> float:
        return _chain_stats(*self._chain(), start=0)[0]

    def mean_burst(self) -> float:
        return _chain_stats(*self._chain(), start=0)[1]

    def loss_rate_stderr(self, n: int) -> float:
        return math.sqrt(_chain_stats(*self._chain(), start=0)[2] / n)

    @property
    def spec(self) -> str:
        ps = (self.p13, self.p31, self.p32, self.p23, self.p14)
        return "state " + " ".join(_pct(x) for x in ps)

    def __repr__(self) -> str:
        return (f"FourState(p13={self.p13!r}, p31={self.p31!r}, p32={self.p32!r}, p23={self.p23!r}, "
                f"p14={self.p14!r})")


# ---- loss in time -----------------------------------------------------------------------------------------
def _seconds(x: float) -> str:
    return f"{x:.10g}s"


class TimeGilbertElliott:
    """Gilbert-Elliott in time (``fade GOOD BAD [LOSS_GOOD LOSS_BAD]``): states hold for durations, not
    packet counts.

    Good lasts an exponential time of mean ``mean_good_s``, then Bad one of mean ``mean_bad_s``, and so on.
    Time 0 finds Bad with probability mean_bad / (mean_good + mean_bad), and the state it finds lasts an
    exponential time of its mean (memoryless: that is the stationary process), so a transfer at time 0
    meets fades as one at any later time would; netem's per-packet chain starts in Good, but its states
    last packets, not tens of seconds. A packet at time t is lost with ``loss_good`` or ``loss_bad`` as the state
    at t is (defaults 0 and 1: nothing lost in Good, everything in Bad). The long-run fraction of time in
    Bad is mean_bad / (mean_good + mean_bad), and so is the loss rate of packets sent at a steady pace.

    The schedule is drawn lazily from a generator spawned from the one ``lost_at`` is first called with,
    so it depends on the seed alone, never on how many packets ask; the per-packet draws (only where a
    state's loss lies strictly between 0 and 1) come from the caller's generator. ``lost_at`` must see
    non-decreasing times, as a link's elements do.
    """

    time_based = True
    __slots__ = ("mean_good_s", "mean_bad_s", "loss_good", "loss_bad", "_segments", "_segment", "_origin")

    def __init__(self, mean_good_s: float, mean_bad_s: float, loss_good: float = 0.0, loss_bad: float = 1.0):
        for name, value in (("good", mean_good_s), ("bad", mean_bad_s)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise LinkConfigError(f"fade: the mean {name} duration must be a positive time, got {value!r}")
        self.mean_good_s = float(mean_good_s)
        self.mean_bad_s = float(mean_bad_s)
        self.loss_good = _check(loss_good, "loss in good")
        self.loss_bad = _check(loss_bad, "loss in bad")
        self._segments: Iterator[tuple[float, float, bool]] | None = None
        self._segment = (0.0, 0.0, True)
        self._origin: np.random.Generator | None = None  # the schedule's generator as it was spawned

    def segments(self, rng: np.random.Generator) -> Iterator[tuple[float, float, bool]]:
        """The state schedule drawn from ``rng``: (start, end, bad) forever, from time 0."""
        t, bad = 0.0, bool(rng.random() < self.fraction_bad())
        while True:
            end = t + float(rng.exponential(self.mean_bad_s if bad else self.mean_good_s))
            if end > t:  # a zero-length draw is no state at all
                yield t, end, bad
                t = end
            bad = not bad

    def bad_at(self, t: float, rng: np.random.Generator) -> bool:
        """Whether the link is in Bad at time ``t`` (non-decreasing across calls)."""
        if self._segments is None:
            schedule_rng = rng.spawn(1)[0]
            self._origin = copy.deepcopy(schedule_rng)
            self._segments = self.segments(schedule_rng)
            self._segment = next(self._segments)
        start, end, bad = self._segment
        if t < start:
            raise ValueError(f"fade: time went backwards ({t!r} < {start!r})")
        while t >= end:
            self._segment = start, end, bad = next(self._segments)
        return bad

    def schedule(self, until: float) -> list[tuple[float, float, bool]]:
        """The (start, end, bad) states this model has drawn, or will, up to ``until`` (after its first
        ``lost_at``), for reports and tests; it leaves the model's own draws alone."""
        if self._origin is None:
            raise ValueError("fade: the schedule is drawn at the first packet; none has been asked yet")
        out = []
        for segment in self.segments(copy.deepcopy(self._origin)):
            if segment[0] >= until:
                return out
            out.append(segment)
        return out  # pragma: no cover - segments() never ends

    def lost_at(self, t: float, rng: np.random.Generator) -> bool:
        p = self.loss_bad if self.bad_at(t, rng) else self.loss_good
        return p >= 1.0 or (p > 0.0 and rng.random() < p)

    def lost(self, rng: np.random.Generator) -> bool:
        raise TypeError("a fade decides by time: call lost_at(t, rng)")

    def fraction_bad(self) -> float:
        return self.mean_bad_s / (self.mean_good_s + self.mean_bad_s)

    def mean_loss(self) -> float:
        """The time average of the loss probability (a steady sender's loss rate)."""
        f = self.fraction_bad()
        return (1.0 - f) * self.loss_good + f * self.loss_bad

    def mean_burst(self) -> float:
        """A run of losses in packets depends on the sender's pace; a fade lasts ``mean_bad_s`` on average."""
        return math.nan

    @property
    def spec(self) -> str:
        return (f"fade {_seconds(self.mean_good_s)} {_seconds(self.mean_bad_s)} {_pct(self.loss_good)} "
                f"{_pct(self.loss_bad)}")

    def __repr__(self) -> str:
        return (f"TimeGilbertElliott(mean_good_s={self.mean_good_s!r}, mean_bad_s={self.mean_bad_s!r}, "
                f"loss_good={self.loss_good!r}, loss_bad={self.loss_bad!r})")


class Outages:
    """Intervals [start, end) in seconds during which a link delivers nothing, from an outage file.

    A packet whose time on the link (its departure from the rate limiter, or its send time with
    ``loss_before_queue``) falls in an outage is lost, as a frame sent into a fade is lost on the air: the
    queue keeps draining at the link's rate and nothing is held for later. With ``period_s`` the schedule
    repeats forever (a file made from a trace repeats with the trace); without, the link is up after the
    last interval. ``shifted(offset)`` starts the schedule ``offset`` seconds in (modulo the period), so
    senders on one file need not fade together.

    File format (``parse``): one outage per line, ``START END`` as plain numbers of seconds; ``period P``
    once, anywhere; ``#`` starts a comment; blank lines are skipped. Intervals must not go backwards or
    overlap (touching is allowed), must last a positive time and must end within the period.
    """

    __slots__ = ("name", "starts", "ends", "period_s", "offset_s")

    def __init__(self, intervals: list[tuple[float, float]] | tuple = (), period_s: float | None = None,
                 name: str = "outages", offset_s: float = 0.0):
        self.name = name
        starts: list[float] = []
        ends: list[float] = []
        for k, (start, end) in enumerate(intervals):
            _check_interval(name, f"interval {k}", float(start), float(end), ends[-1] if ends else None,
                            starts[-1] if starts else None)
            starts.append(float(start))
            ends.append(float(end))
        if period_s is not None:
            _check_period(name, "period", float(period_s), ends[-1] if ends else None)
            period_s = float(period_s)
        self.starts, self.ends, self.period_s = tuple(starts), tuple(ends), period_s
        if not (math.isfinite(offset_s) and offset_s >= 0):
            raise LinkConfigError(f"{name}: an outage offset must be finite and >= 0 s, got {offset_s!r}")
        self.offset_s = float(offset_s) % period_s if period_s else float(offset_s)

    # ---- loading -----------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, name: str = "outages") -> Outages:
        """Parse an outage file; errors name ``name`` and the 1-based line."""
        intervals: list[tuple[float, float]] = []
        period: float | None = None
        period_line = 0
        for lineno, raw in enumerate(text.splitlines(), 1):
            where = f"{name}:{lineno}"
            tokens = raw.split("#", 1)[0].split()
            if not tokens:
                continue
            if tokens[0].lower() == "period":
                if len(tokens) != 2:
                    raise LinkConfigError(f"{where}: expected 'period SECONDS', got {raw.strip()!r}")
                if period is not None:
                    raise LinkConfigError(f"{where}: the period is given twice")
                period, period_line = _number(where, tokens[1], "period"), lineno
                continue
            if len(tokens) != 2:
                raise LinkConfigError(f"{where}: expected 'START END' in seconds, got {raw.strip()!r}")
            start, end = (_number(where, tok, what) for tok, what in zip(tokens, ("start", "end"), strict=True))
            _check_interval(name, f"line {lineno}", start, end, intervals[-1][1] if intervals else None,
                            intervals[-1][0] if intervals else None, where)
            intervals.append((start, end))
        if period is not None:
            _check_period(f"{name}:{period_line}", "period", period, intervals[-1][1] if intervals else None)
        return cls(intervals, period, name)

    @classmethod
    def load(cls, path: str | Path) -> Outages:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LinkConfigError(f"{path}: outage file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LinkConfigError(f"{path}: cannot read outage file ({exc.__class__.__name__}: {exc})") from None
        return cls.parse(text, str(path))

    @classmethod
    def from_trace(cls, trace: Trace, min_gap_s: float) -> Outages:
        """The trace's gaps of at least ``min_gap_s`` between delivery opportunities, with its period.

        The gap before the first opportunity counts too (the previous period ends with an opportunity at
        its last timestamp, which is time 0 of the next).
        """
        if not (math.isfinite(min_gap_s) and min_gap_s > 0):
            raise LinkConfigError(f"outages: the minimum gap must be a positive time, got {min_gap_s!r}")
        ms = np.concatenate(([0], trace.times_ms))
        gaps = np.diff(ms)
        where = np.flatnonzero(gaps / 1000.0 >= min_gap_s)
        intervals = [(ms[i] / 1000.0, ms[i + 1] / 1000.0) for i in where.tolist()]
        return cls(intervals, trace.period_s, f"gaps of at least {min_gap_s:g} s in {Path(trace.name).name}")

    def to_text(self) -> str:
        """The file ``parse`` reads back to the same schedule."""
        lines = [f"# outages ({self.name}): START END in seconds; the link delivers nothing in between"]
        if self.period_s is not None:
            lines.append(f"period {self.period_s:.10g}")
        lines += [f"{s:.10g} {e:.10g}" for s, e in zip(self.starts, self.ends, strict=True)]
        return "\n".join(lines) + "\n"

    # ---- schedule ----------------------------------------------------------------------------------
    def shifted(self, offset_s: float) -> Outages:
        """This schedule seen from ``offset_s`` seconds in: time t here is the file's t + offset (wrapping
        around the period if there is one). An offset of 0 gives this very object."""
        if offset_s == 0:
            return self
        out = object.__new__(Outages)
        out.name, out.starts, out.ends, out.period_s = self.name, self.starts, self.ends, self.period_s
        total = self.offset_s + float(offset_s)
        if not (math.isfinite(total) and offset_s >= 0):
            raise LinkConfigError(f"{self.name}: an outage offset must be finite and >= 0 s, got {offset_s!r}")
        out.offset_s = total % self.period_s if self.period_s else total
        return out

    def down_at(self, t: float) -> bool:
        """Whether time ``t`` (seconds of the link's clock) lies in an outage."""
        u = t + self.offset_s
        if self.period_s is not None:
            u %= self.period_s
        i = bisect_right(self.starts, u) - 1
        return i >= 0 and u < self.ends[i]

    def __len__(self) -> int:
        return len(self.starts)

    def total_s(self) -> float:
        """Seconds of outage in the file (one period)."""
        return sum(e - s for s, e in zip(self.starts, self.ends, strict=True))

    def mean_duration_s(self) -> float:
        return self.total_s() / len(self.starts) if self.starts else 0.0

    def fraction_down(self) -> float | None:
        """Share of each period spent in outage (None without a period)."""
        return None if self.period_s is None else self.total_s() / self.period_s

    def __repr__(self) -> str:
        period = "" if self.period_s is None else f", period {self.period_s:g} s"
        shift = f", offset {self.offset_s:g} s" if self.offset_s else ""
        return f"Outages({self.name!r}, {len(self.starts)} intervals{period}{shift})"


def _number(where: str, token: str, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise LinkConfigError(f"{where}: {what} {token!r} is not a number of seconds (write 12.5, not 12.5s)") from None
    if not math.isfinite(value) or value < 0:
        raise LinkConfigError(f"{where}: {what} {token!r} must be a finite number of seconds >= 0")
    return value


def _check_interval(name: str, which: str, start: float, end: float, prev_end: float | None,
                    prev_start: float | None, where: str | None = None) -> None:
    where = where or f"{name}: {which}"
    if not (math.isfinite(start) and math.isfinite(end) and start >= 0):
        raise LinkConfigError(f"{where}: an outage needs finite times >= 0, got {start!r} {end!r}")
    if end <= start:
        raise LinkConfigError(f"{where}: outage {start:g} {end:g} lasts {end - start:g} s; it must end after it "
                              "starts")
    if prev_start is not None and start < prev_start:
        raise LinkConfigError(f"{where}: outage at {start:g} s goes backwards (the previous one starts at "
                              f"{prev_start:g} s); list outages in time order")
    if prev_end is not None and start < prev_end:
        raise LinkConfigError(f"{where}: outage {start:g} {end:g} overlaps the previous one (which ends at "
                              f"{prev_end:g} s)")


def _check_period(name: str, which: str, period: float, last_end: float | None) -> None:
    if not (math.isfinite(period) and period > 0):
        raise LinkConfigError(f"{name}: {which} {period!r} must be a positive number of seconds")
    if last_end is not None and last_end > period:
        raise LinkConfigError(f"{name}: the last outage ends at {last_end:g} s, after the period ({period:g} s)")

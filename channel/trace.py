"""Mahimahi link traces: parsing with mm-link's rules and the schedule of delivery opportunities.

A trace line is one delivery opportunity at an integer millisecond; lines may share a millisecond and
must not decrease. The schedule repeats forever with a period equal to the LAST timestamp (mm-link adds
the last timestamp to its base at each wrap), so opportunity number ``a`` (counted from 0 across periods)
happens at ``(a // n) * period + ms[a % n]`` milliseconds. Every lookup below is index arithmetic plus one
bisection of the period, so idle stretches of any length cost nothing.

``Trace.shifted(offset_s)`` starts the same schedule ``offset_s`` seconds into its period (wrapping), so
links on one trace need not move in lockstep. ``Trace.scaled_to(rate_bps)`` keeps every opportunity (so
every fade and gap of the recording, at its own time scale) but lets each move fewer or more bytes, so the
mean capacity is ``rate_bps``: a 1.9 Mbit/s LTE uplink recording as a 64 kbit/s access link.

Rejected, like mm-link: an empty line, a token that is not a non-negative integer (leading blanks are
accepted, as strtol does; trailing ones, including a CR from a CRLF file, are not), a decreasing timestamp,
an empty file, and a last timestamp of 0.
"""

from __future__ import annotations

import copy
import math
import re
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from miscnet.channel.errors import LinkConfigError

OPPORTUNITY_BYTES = 1500  # what one line delivers, in IP bytes (mm-link's 1504 include a 4-byte tun header)
TUN_HEADER_BYTES = 4  # mm-link counts a tun packet-info header with every packet ...
OPPORTUNITY_BUDGET_BYTES = OPPORTUNITY_BYTES + TUN_HEADER_BYTES  # ... against PACKET_SIZE = 1504 per opportunity

_INTEGER = re.compile(r"[ \t\n\v\f\r]*\+?([0-9]+)")  # what strtol(…, 10) consumes, sign aside


class Trace:
    """One Mahimahi trace; times in the public API are seconds unless a name says ``ms``."""

    __slots__ = ("name", "times_ms", "period_ms", "_ms", "_n", "budget_bytes")
    offset_ms = 0  # where in its period the schedule starts (see ``shifted``)

    def __init__(self, times_ms: np.ndarray | list[int], name: str = "trace"):
        ms = np.asarray(times_ms, dtype=np.int64)
        if ms.ndim != 1 or ms.size == 0:
            raise LinkConfigError(f"{name}: no valid timestamps found (empty trace)")
        if (ms < 0).any() or (np.diff(ms) < 0).any():
            raise LinkConfigError(f"{name}: timestamps must be non-negative and non-decreasing")
        if ms[-1] == 0:
            raise LinkConfigError(f"{name}: the last timestamp is 0; a trace must last a non-zero time")
        self.name = name
        self.times_ms = ms
        self.times_ms.flags.writeable = False
        self.period_ms = int(ms[-1])
        self._ms = ms.tolist()  # bisect on a list beats numpy for one scalar at a time
        self._n = len(self._ms)
        self.budget_bytes = OPPORTUNITY_BUDGET_BYTES  # what one opportunity moves, tun headers included

    # ---- loading -----------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, name: str = "trace") -> Trace:
        """Parse trace text; errors name ``name`` and the 1-based line number."""
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # getline() sees no line after the final newline
        times: list[int] = []
        prev = -1
        for lineno, line in enumerate(lines, 1):
            if line == "":
                raise LinkConfigError(f"{name}:{lineno}: empty line (mm-link rejects them)")
            m = _INTEGER.fullmatch(line)
            if m is None:
                hint = " (CRLF line ending? mm-link rejects it)" if line.endswith("\r") else ""
                raise LinkConfigError(
                    f"{name}:{lineno}: {line!r} is not a non-negative integer millisecond timestamp{hint}")
            ms = int(m.group(1))
            if ms < prev:
                raise LinkConfigError(
                    f"{name}:{lineno}: timestamp {ms} is before the previous one ({prev}); "
                    "timestamps must be non-decreasing")
            times.append(ms)
            prev = ms
        if not times:
            raise LinkConfigError(f"{name}: no valid timestamps found (empty trace)")
        if times[-1] == 0:
            raise LinkConfigError(
                f"{name}:{len(times)}: the last timestamp is 0; a trace must last a non-zero time")
        return cls(np.array(times, dtype=np.int64), name)

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        path = Path(path)
        try:
            text = path.read_bytes().decode("ascii")  # no newline translation: mm-link sees every CR
        except FileNotFoundError:
            raise LinkConfigError(f"{path}: trace file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LinkConfigError(f"{path}: cannot read trace ({exc.__class__.__name__}: {exc})") from None
        return cls.parse(text, str(path))

    def offset_grid_ms(self, offset_s: float) -> int:
        """``offset_s`` as ``shifted`` uses it: the nearest whole millisecond (the trace's grid), modulo the
        period."""
        if not (math.isfinite(offset_s) and offset_s >= 0):
            raise LinkConfigError(f"{self.name}: a trace offset must be finite and >= 0 s, got {offset_s!r}")
        return math.floor(offset_s * 1000.0 + 0.5) % self.period_ms

    def shifted(self, offset_s: float) -> Trace:
        """The same trace started ``offset_s`` seconds into its period, wrapping: the new trace's time t is
        this one's time t + offset (``offset_grid_ms``). An offset of 0 gives this very trace."""
        ms = (self.offset_ms + self.offset_grid_ms(offset_s)) % self.period_ms
        base = self._origin if isinstance(self, _ShiftedTrace) else self
        return base if ms == 0 else _ShiftedTrace(base, ms)

    def scaled_to(self, rate_bps: float) -> Trace:
        """This schedule with each opportunity's budget scaled so the mean capacity is ``rate_bps`` (the
        budget is whole bytes, so the mean is within half a byte per opportunity of the target)."""
        if not (math.isfinite(rate_bps) and rate_bps > 0):
            raise LinkConfigError(f"{self.name}: a trace rate must be a finite rate > 0, got {rate_bps!r}")
        unscaled = self._n * OPPORTUNITY_BYTES * 8 / self.period_s
        budget = round(OPPORTUNITY_BUDGET_BYTES * rate_bps / unscaled)
        if budget < 1:
            raise LinkConfigError(f"{self.name}: {rate_bps:g} bit/s is under one byte per opportunity of this trace "
                                  f"(mean {unscaled:g} bit/s)")
        out = copy.copy(self)
        out.budget_bytes = budget
        if isinstance(out, _ShiftedTrace):
            out._origin = copy.copy(self._origin)
            out._origin.budget_bytes = budget
        return out

    @property
    def opportunity_bytes(self) -> float:
        """IP bytes one opportunity moves (1500 unless scaled)."""
        return self.budget_bytes * OPPORTUNITY_BYTES / OPPORTUNITY_BUDGET_BYTES

    # ---- figures -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def period_s(self) -> float:
        return self.period_ms / 1000.0

    def capacity_bps(self) -> float:
        """Mean capacity over one period: lines * 1500 * 8 / period (the README's definition; a scaled trace:
        its bytes per opportunity instead of 1500)."""
        return self._n * self.opportunity_bytes * 8 / self.period_s

    def __repr__(self) -> str:
        shift = f", offset {self.offset_ms} ms" if self.offset_ms else ""
        if self.budget_bytes != OPPORTUNITY_BUDGET_BYTES:
            shift += f", {self.budget_bytes} B per opportunity"
        return f"Trace({self.name!r}, {self._n} opportunities, period {self.period_ms} ms{shift})"

    # ---- schedule ----------------------------------------------------------------------------------
    def time_ms(self, index: int) -> int:
        """Millisecond of opportunity ``index`` (0-based, counted across periods)."""
        c, i = divmod(index, self._n)
        return c * self.period_ms + self._ms[i]

    def time_of(self, index: int) -> float:
        """Time of opportunity ``index`` in seconds (ms / 1000, so equal ms give equal floats)."""
        c, i = divmod(index, self._n)
        return (c * self.period_ms + self._ms[i]) / 1000.0

    def _first_index_ms(self, m: int) -> int:
        """Smallest index whose millisecond is >= m."""
        if m <= 0:
            return 0
        c = (m - 1) // self.period_ms  # the first period whose last opportunity (at (c+1)*period) is >= m
        return c * self._n + bisect_left(self._ms, m - c * self.period_ms)

    def _first_ms(self, t: float, strict: bool) -> int:
        """Smallest integer millisecond m with m/1000 > t (strict) or >= t, judged on the float m/1000."""
        if not math.isfinite(t):
            raise ValueError(f"time must be finite, got {t!r}")
        m = math.floor(t * 1000.0) - 1
        while (m / 1000.0 <= t) if strict else (m / 1000.0 < t):
            m += 1
        while m > 0 and ((m - 1) / 1000.0 > t if strict else (m - 1) / 1000.0 >= t):
            m -= 1
        return m

    def index_after(self, t: float) -> int:
        """Index of the first opportunity strictly after ``t`` seconds.

        mm-link burns every opportunity due at or before "now" before it enqueues an arriving packet, so a
        packet arriving at t can use only opportunities after t.
        """
        return self._first_index_ms(self._first_ms(t, strict=True))

    def index_at_or_after(self, t: float) -> int:
        return self._first_index_ms(self._first_ms(t, strict=False))

    def count_between(self, t0: float, t1: float) -> int:
        """Number of opportunities in the interval (t0, t1] (seconds)."""
        return max(0, self.index_after(t1) - self.index_after(t0))

    def opportunities(self, start: float = 0.0) -> Iterator[float]:
        """Opportunity times (seconds) at or after ``start``, forever; take what you need."""
        a = self.index_at_or_after(start)
        while True:
            yield self.time_of(a)
            a += 1

    def times_between(self, t0: float, t1: float) -> np.ndarray:
        """All opportunity times in [t0, t1) as a float array (seconds), built period by period."""
        a, b = self.index_at_or_after(t0), self.index_at_or_after(t1)
        if b <= a:
            return np.empty(0)
        idx = np.arange(a, b, dtype=np.int64)
        c, i = np.divmod(idx, self._n)
        return (c * self.period_ms + self.times_ms[i]) / 1000.0


class _ShiftedTrace(Trace):
    """A trace seen from ``offset_ms`` into its schedule: opportunity a is the base's a + a0, ``offset_ms``
    earlier (a0 = the base's first opportunity at or after the offset). A subclass, so unshifted traces
    pay nothing for the feature."""

    __slots__ = ("offset_ms", "_a0", "_origin")

    def __init__(self, base: Trace, offset_ms: int):  # no re-validation: base is a valid trace
        self.name, self.times_ms, self.period_ms, self._ms, self._n, self.budget_bytes = (
            base.name, base.times_ms, base.period_ms, base._ms, base._n, base.budget_bytes)
        self.offset_ms = offset_ms
        self._a0 = Trace._first_index_ms(base, offset_ms)
        self._origin = base

    def time_ms(self, index: int) -> int:
        c, i = divmod(index + self._a0, self._n)
        return c * self.period_ms + self._ms[i] - self.offset_ms

    def time_of(self, index: int) -> float:
        return self.time_ms(index) / 1000.0

    def _first_index_ms(self, m: int) -> int:
        if m <= 0:
            return 0
        return Trace._first_index_ms(self, m + self.offset_ms) - self._a0

    def times_between(self, t0: float, t1: float) -> np.ndarray:
        a, b = self.index_at_or_after(t0), self.index_at_or_after(t1)
        if b <= a:
            return np.empty(0)
        c, i = np.divmod(np.arange(a + self._a0, b + self._a0, dtype=np.int64), self._n)
        return (c * self.period_ms + self.times_ms[i] - self.offset_ms) / 1000.0

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
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np

from miscnet.channel.errors import LinkConfigError


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

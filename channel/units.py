"""Parsing of link parameters the way tc(8) / tc-netem(8) read them.

Users already know these spellings from ``tc qdisc add ... netem``, so we accept the same units with the
same meaning (case-insensitive, as tc compares suffixes with strcasecmp):

- rates (tc's ``get_rate``): ``bit`` or a bare number = bit/s; ``kbit mbit gbit tbit`` are SI (1000);
  ``kibit mibit gibit tibit`` are binary (1024); ``bps kbps mbps gbps tbps`` are BYTES per second (SI) and
  ``kibps mibps gibps tibps`` binary bytes per second. ``parse_rate`` returns bit/s.
- times (tc's ``get_time``): ``s sec secs``, ``ms msec msecs``, ``us usec usecs``, ``ns nsec nsecs``; a
  bare number is MICROSECONDS, as in ``tc ... netem delay 100`` (100 us). ``parse_time`` returns seconds.
- sizes (tc's ``get_size``): a bare number or ``b`` = bytes; ``k kb`` = 1024, ``m mb`` = 1024^2,
  ``g gb`` = 1024^3 bytes; ``kbit mbit gbit`` = that many binary bits. Fractions are truncated to whole
  bytes, as tc's cast to an integer does. ``parse_size`` returns bytes.
- loss (netem's ``loss``): ``random P``, a bare ``P`` (netem's old syntax for random), ``gemodel P [R [1-H
  [1-K]]]`` and ``state P13 [P31 [P32 [P23 [P14]]]]``. Every probability is a PERCENTAGE with an
  optional ``%`` sign: ``random 5`` and ``random 5%`` both mean 5 %, ``random 0.05`` means 0.05 %.
  ``none`` (or an empty string, or a zero random loss) means no loss. A leading ``loss``/``drop`` keyword
  is ignored so a netem command line can be pasted.
- loss in time (ours, not netem's): ``fade GOOD BAD [LOSS_GOOD LOSS_BAD]``, a Gilbert-Elliott model whose
  states hold for exponential durations of mean GOOD and BAD (times WITH a unit: ``fade 20s 2s``; a bare
  number would be tc's microseconds, so it is refused), losing LOSS_GOOD and LOSS_BAD of the packets in
  each (percentages, default 0 % and 100 %; give both or neither): ``fade 20s 2s 1% 80%``.
- reorder (netem's ``reorder``): ``P [CORR] [gap N]``, percentages as for loss; ``gap`` defaults to 1.
"""

from __future__ import annotations

import math
import re

from miscnet.channel.errors import LinkConfigError
from miscnet.channel.loss import Bernoulli, FourState, GilbertElliott, LossModel, TimeGilbertElliott

__all__ = ["parse_loss", "parse_percent", "parse_rate", "parse_reorder", "parse_size", "parse_time"]


# A decimal number as strtod reads it, without hex, inf or nan (which make no sense for a link).
_NUMBER = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9]+(?:[eE][-+]?[0-9]+)?)(.*?)\s*")

_RATE_UNITS = {
    "": 1.0, "bit": 1.0,
    "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
    "kibit": 1024.0, "mibit": 1024.0**2, "gibit": 1024.0**3, "tibit": 1024.0**4,
    "bps": 8.0, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12,
    "kibps": 8 * 1024.0, "mibps": 8 * 1024.0**2, "gibps": 8 * 1024.0**3, "tibps": 8 * 1024.0**4,
}
_TIME_UNITS = {
    "": 1e-6,  # tc: a bare number is microseconds
    "s": 1.0, "sec": 1.0, "secs": 1.0,
    "ms": 1e-3, "msec": 1e-3, "msecs": 1e-3,
    "us": 1e-6, "usec": 1e-6, "usecs": 1e-6,
    "ns": 1e-9, "nsec": 1e-9, "nsecs": 1e-9,
}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3,
    "kbit": 1024 / 8, "mbit": 1024**2 / 8, "gbit": 1024**3 / 8,
}

_RATE_HELP = "use bit, kbit, mbit, gbit, tbit, kibit, mibit, bps, kbps, mbps (bytes/s) or a bare bit/s number"
_TIME_HELP = "use s, ms, us, ns, or a bare number of microseconds as tc does"
_SIZE_HELP = "use b, k/kb, m/mb, g/gb, kbit, mbit or a bare number of bytes"


def _split(text: object, kind: str, example: str) -> tuple[float, str]:
    """Number and lower-cased unit of ``text``; one-line error when there is no number."""
    if not isinstance(text, str):
        text = str(text)
    m = _NUMBER.fullmatch(text)
    if m is None:
        raise LinkConfigError(
            f"bad {kind} {text!r}: expected a non-negative number with a unit, e.g. {example}")
    if m.group(2)[:1].isspace():
        raise LinkConfigError(f"bad {kind} {text!r}: write the unit right after the number, e.g. {example}")
    value = float(m.group(1))
    if not math.isfinite(value):
        raise LinkConfigError(f"bad {kind} {text!r}: the number is too large")
    return value, m.group(2).lower()


def parse_rate(text: str | float) -> float:
    """A tc rate (``64kbit``, ``1.5mbit``, ``100kbps``) in bit/s; must be positive."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        value, unit = _split(text, "rate", "64kbit")
    scale = _RATE_UNITS.get(unit)
    if scale is None:
        hint = " (percent rates need a device; give an absolute rate)" if unit == "%" else ""
        raise LinkConfigError(f"unknown rate unit {unit!r} in {text!r} ({_RATE_HELP}){hint}")
    bps = value * scale
    if not (bps > 0 and math.isfinite(bps)):
        raise LinkConfigError(f"bad rate {text!r}: a link rate must be positive and finite")
    return bps


def parse_time(text: str | float) -> float:
    """A tc time (``40ms``, ``1.5s``, ``250us``; bare = microseconds) in seconds; may be zero."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        raise LinkConfigError(f"bad time {text!r}: give a string with a unit such as '40ms'")
    value, unit = _split(text, "time", "40ms")
    scale = _TIME_UNITS.get(unit)
    if scale is None:
        raise LinkConfigError(f"unknown time unit {unit!r} in {text!r} ({_TIME_HELP})")
    return value * scale


def parse_size(text: str | int) -> int:
    """A tc size (``1500``, ``64kb``, ``10k``, ``1mbit``) in whole bytes (fractions truncated, as tc)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise LinkConfigError(f"bad size {text!r}: must not be negative")
        return text
    value, unit = _split(text, "size", "64kb")
    scale = _SIZE_UNITS.get(unit)
    if scale is None:
        raise LinkConfigError(f"unknown size unit {unit!r} in {text!r} ({_SIZE_HELP})")
    return int(value * scale)


def parse_percent(token: str, what: str = "probability", spec: str | None = None) -> float:
    """netem's percentage: ``5`` or ``5%`` -> 0.05; must lie within 0..100 %."""
    where = f" in {spec!r}" if spec is not None else ""
    m = _NUMBER.fullmatch(token)
    if m is None or m.group(2) not in ("", "%"):
        raise LinkConfigError(f"bad {what} {token!r}{where}: expected a percentage such as 5 or 5%")
    value = float(m.group(1)) / 100.0
    if not 0.0 <= value <= 1.0:
        raise LinkConfigError(f"bad {what} {token!r}{where}: a percentage must lie within 0..100")
    return value


_LOSS_HELP = ("use none, random P, gemodel P [R [1-H [1-K]]], state P13 [P31 [P32 [P23 [P14]]]] or "
              "fade GOOD BAD [LOSS_GOOD LOSS_BAD]")


def parse_loss(text: str | None) -> LossModel | None:
    """A netem loss spec as a fresh loss model, or None for no loss.

    >>> parse_loss("gemodel 1% 30% 70% 0.1%")   # p, r, 1-h, 1-k
    GilbertElliott(p=0.01, r=0.3, one_minus_h=0.7, one_minus_k=0.001)
    """
    spec = "" if text is None else str(text)
    tokens = spec.split()
    if tokens and tokens[0].lower() in ("loss", "drop"):
        tokens = tokens[1:]
    if not tokens or (len(tokens) == 1 and tokens[0].lower() == "none"):
        return None
    head = tokens[0].lower()
    if head[0].isdigit() or head[0] == ".":  # netem: "loss 5%" is the old spelling of "loss random 5%"
        tokens = ["random", *tokens]
        head = "random"
    args = tokens[1:]
    if head == "random":
        if len(args) != 1:
            extra = " (netem's loss correlation is deprecated and not modelled)" if len(args) > 1 else ""
            raise LinkConfigError(
                f"bad loss {spec!r}: 'random' takes one percentage, e.g. 'random 5%'{extra}")
        p = parse_percent(args[0], "loss probability", spec)
        return None if p == 0.0 else Bernoulli(p)
    if head == "gemodel":
        if not 1 <= len(args) <= 4:
            raise LinkConfigError(f"bad loss {spec!r}: gemodel takes 1 to 4 percentages: P [R [1-H [1-K]]]")
        names = ("p", "r", "1-h", "1-k")
        p, *rest = (parse_percent(a, f"gemodel {n}", spec) for a, n in zip(args, names, strict=False))
        return GilbertElliott(p, *rest)
    if head == "state":
        if not 1 <= len(args) <= 5:
            raise LinkConfigError(
                f"bad loss {spec!r}: state takes 1 to 5 percentages: P13 [P31 [P32 [P23 [P14]]]]")
        names = ("p13", "p31", "p32", "p23", "p14")
        values = [parse_percent(a, f"state {n}", spec) for a, n in zip(args, names, strict=False)]
        return FourState(*values)
    if head == "fade":
        if len(args) not in (2, 4):
            raise LinkConfigError(f"bad loss {spec!r}: fade takes two mean durations and optionally the loss "
                                  "in good and in bad: 'fade 20s 2s' or 'fade 20s 2s 0% 100%'")
        durations = []
        for token, state in zip(args[:2], ("good", "bad"), strict=True):
            if not token[-1:].isalpha():
                raise LinkConfigError(f"bad loss {spec!r}: fade's mean {state} duration {token!r} needs a unit, "
                                      "e.g. 20s or 500ms")
            try:
                seconds = parse_time(token)
            except LinkConfigError:
                seconds = -1.0
            if seconds <= 0:
                raise LinkConfigError(f"bad loss {spec!r}: fade's mean {state} duration {token!r} must be a positive "
                                      "time such as 2s")
            durations.append(seconds)
        losses = [parse_percent(a, f"fade loss in {n}", spec) for a, n in zip(args[2:], ("good", "bad"),
                                                                                 strict=False)]
        return TimeGilbertElliott(*durations, *losses)
    if head == "ecn":
        raise LinkConfigError(
            f"bad loss {spec!r}: ecn marking is not modelled (packets are lost, not marked)")
    raise LinkConfigError(f"unknown loss model {tokens[0]!r} in {spec!r} ({_LOSS_HELP})")


def parse_reorder(text: str | None) -> tuple[float, float, int] | None:
    """netem's ``reorder P [CORR] [gap N]`` as (probability, correlation, gap), or None for no reordering.

    Percentages as in ``parse_loss``; ``gap`` defaults to 1 (tc's default when reorder is given). A leading
    ``reorder`` keyword is ignored; ``none`` / empty / a zero probability mean no reordering.

    >>> parse_reorder("25% 50% gap 5")
    (0.25, 0.5, 5)
    """
    spec = "" if text is None else str(text)
    tokens = spec.split()
    if tokens and tokens[0].lower() == "reorder":
        tokens = tokens[1:]
    if not tokens or (len(tokens) == 1 and tokens[0].lower() == "none"):
        return None
    gap = 1
    lowered = [tok.lower() for tok in tokens]
    if "gap" in lowered:
        k = lowered.index("gap")
        if k != len(tokens) - 2 or not tokens[k + 1].isdigit() or int(tokens[k + 1]) < 1:
            raise LinkConfigError(f"bad reorder {spec!r}: 'gap' takes a whole number >= 1 and comes last")
        gap = int(tokens[k + 1])
        tokens = tokens[:k]
    if not 1 <= len(tokens) <= 2:
        raise LinkConfigError(f"bad reorder {spec!r}: expected P [CORRELATION] [gap N], e.g. '25% 50%'")
    p = parse_percent(tokens[0], "reorder probability", spec)
    corr = parse_percent(tokens[1], "reorder correlation", spec) if len(tokens) == 2 else 0.0
    return None if p == 0.0 else (p, corr, gap)

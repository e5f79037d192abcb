"""argparse value types shared by the CLI modules: each rejects bad values with a one-line message."""

from __future__ import annotations

import argparse


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def float_in(lo: float, hi: float, lo_open: bool = False):
    """A float in [lo, hi] (or (lo, hi] when lo_open)."""

    def parse(text: str) -> float:
        value = _number(text, float)
        if not ((lo < value if lo_open else lo <= value) and value <= hi):
            raise argparse.ArgumentTypeError(f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}]: {text!r}")
        return value

    return parse


def host_port(text: str) -> str:
    """HOST:PORT (port 0..65535; [::1]:PORT for IPv6), kept as text. A bare port is refused here: taken as a
    gRPC target it is a host name, and the sender would wait out its connect timeout before failing."""
    host, sep, port = text.rpartition(":")
    if not sep or not host.strip("[]") or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"needs HOST:PORT, e.g. 127.0.0.1:50059, not {text!r}")
    return text

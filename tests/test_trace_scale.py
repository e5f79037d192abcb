"""Traces scaled to a mean rate: every opportunity kept (so every fade), each moving fewer bytes."""

import pytest

from miscnet.channel.errors import LinkConfigError
from miscnet.channel.link import LinkConfig, saturate
from miscnet.channel.trace import Trace


def _trace_with_gap() -> Trace:
    # one opportunity per ms (12 Mbit/s) except a 2 s gap from 3 s to 5 s; period 10 s
    return Trace([t for t in range(1, 10001) if not 3000 < t <= 5000], name="gap")


def test_scaled_trace_has_the_asked_mean_and_the_same_gaps():
    base = _trace_with_gap()
    scaled = base.scaled_to(64_000)
    assert scaled.capacity_bps() == pytest.approx(64_000, rel=0.01)
    assert list(scaled.times_between(0, 10)) == list(base.times_between(0, 10))  # same schedule
    assert "B per opportunity" in repr(scaled) and base.capacity_bps() == pytest.approx(9.6e6, rel=0.01)
    link = LinkConfig(trace=base, trace_rate_bps=64_000, name="up")
    result = saturate(link, 20, seed=0, packet_size=200)
    assert result["capacity_bps"] == pytest.approx(64_000, rel=0.01)
    assert result["utilization"] > 0.95


def test_scaling_commutes_with_offsets_and_keeps_the_unscaled_trace():
    base = _trace_with_gap()
    link = LinkConfig(trace=base, trace_rate_bps=64_000, trace_offset_s=4.0, name="up")
    assert link.trace is base  # the config keeps what it was given; links are built on the scaled view
    built = link.effective_trace(link.trace_offset_s)
    assert built.budget_bytes == base.scaled_to(64_000).budget_bytes
    assert built.time_of(0) == pytest.approx(1.001)  # 4 s in: the gap's last second is skipped
    assert link.with_(trace_rate_bps=None).capacity_bps() == pytest.approx(base.capacity_bps())
    assert LinkConfig.from_strings(trace=base, trace_rate="64kbit").describe()["trace_rate"] == "64000bit"


@pytest.mark.parametrize("rate", [0.0, -5.0, float("inf"), 100.0])
def test_impossible_scales_are_refused(rate):
    with pytest.raises(LinkConfigError):
        LinkConfig(trace=_trace_with_gap(), trace_rate_bps=rate, name="up")


def test_a_trace_rate_needs_a_trace():
    with pytest.raises(LinkConfigError, match="needs a trace"):
        LinkConfig(rate_bps=1e6, trace_rate_bps=64_000, name="up")

"""Deficit round robin on shared links (LinkConfig(discipline="drr")) and trace start offsets.

Real SimPy runs with fixed seeds; every number compared is virtual time or bytes.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import simpy

from miscnet.channel.elements import DrrPort, Port
from miscnet.channel.errors import LinkConfigError
from miscnet.channel.link import Link, LinkConfig
from miscnet.channel.link import Path as LinkPath
from miscnet.channel.trace import Trace

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
if not TRACES.is_dir():  # a checkout whose shared/ sits inside it
    TRACES = Path(__file__).resolve().parents[1] / "shared" / "traces"
UP = TRACES / "ATT-LTE-driving-2016.up"
needs_traces = pytest.mark.skipif(not UP.exists(), reason="shared/traces not present")


class Pkt:
    __slots__ = ("size", "seq", "flow")

    def __init__(self, size, seq=0, flow=None):
        self.size = size
        self.seq = seq
        self.flow = flow


class Bare:  # a packet without a flow attribute
    __slots__ = ("size", "seq")

    def __init__(self, size, seq=0):
        self.size = size
        self.seq = seq


def jain(xs):
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def steps(env, until=math.inf):
    n = 0
    while env.peek() < until:
        env.step()
        n += 1
    return n


def up_trace():
    if not UP.exists():
        pytest.skip("shared/traces not present")
    return Trace.load(UP)


# ---- always-busy senders ------------------------------------------------------------------------------------
def busy_run(cfg, flows, seconds, seed=0):
    """Flows {name: (packet size, window)} each keep ``window`` packets outstanding on one shared link
    (a new one at every delivery), so each flow's queue never runs dry. Returns (bytes delivered by
    ``seconds`` per flow, the link)."""
    env = simpy.Environment()
    cell = cfg.build(env, np.random.default_rng(seed), shared=True)
    got = dict.fromkeys(flows, 0)
    paths = {}
    for name, (size, _window) in flows.items():
        def deliver(p, name=name, size=size):
            got[name] += p.size
            paths[name].send(Pkt(size, flow=name))
        paths[name] = LinkPath(env, [cell], deliver, name=name)
    for name, (size, window) in flows.items():
        for _ in range(window):
            assert paths[name].send(Pkt(size, flow=name))
    env.run(until=seconds)
    return got, cell


@pytest.mark.parametrize("n", [2, 5, 10])
def test_always_busy_senders_share_a_drr_link_equally(n):
    rate, seconds = 10e6, 30.0
    cfg = LinkConfig(rate_bps=rate, name="cell", discipline="drr")
    got, cell = busy_run(cfg, {f"s{k}": (1500, 2 + k) for k in range(n)}, seconds)  # unequal windows
    share = rate / n
    for name, b in got.items():
        assert b * 8 / seconds == pytest.approx(share, rel=0.02), name
    assert jain(list(got.values())) >= 0.99
    assert sum(got.values()) * 8 / seconds == pytest.approx(rate, rel=0.001)  # work conserving
    assert cell.flow_bytes() == got  # no delay: what left the port is what was delivered
    assert cell.packets_dropped_queue == 0


@needs_traces
def test_always_busy_senders_share_a_drr_trace_link_equally():
    trace, seconds, n = up_trace(), 60.0, 5
    cfg = LinkConfig(trace=trace, name="cell", discipline="drr")
    got, cell = busy_run(cfg, {f"s{k}": (1500, 64) for k in range(n)}, seconds)
    total = sum(got.values())
    for b in got.values():
        assert b == pytest.approx(total / n, rel=0.02)
    assert jain(list(got.values())) >= 0.99
    # one 1500-byte packet per opportunity, none wasted: the queue never emptied
    assert total == trace.count_between(0.0, math.nextafter(seconds, 0.0)) * 1500


@pytest.mark.parametrize("quantum", [1500, 300])
def test_drr_shares_bytes_not_packets(quantum):
    rate, seconds = 4e6, 30.0
    cfg = LinkConfig(rate_bps=rate, name="cell", discipline="drr", quantum_bytes=quantum)
    got, cell = busy_run(cfg, {"small": (200, 30), "large": (1200, 5)}, seconds)
    assert got["small"] == pytest.approx(got["large"], rel=0.02)
    for b in got.values():
        assert b * 8 / seconds == pytest.approx(rate / 2, rel=0.02)
    assert cell.stats()["packets_delivered"] > 0


def test_fifo_shares_by_window_drr_by_flow():
    """Closed-loop senders through FIFO get shares in proportion to what they keep queued."""
    shares = {}
    for discipline in ("fifo", "drr"):
        got, _ = busy_run(LinkConfig(rate_bps=4e6, name="cell", discipline=discipline),
                          {"big": (1500, 40), "small": (1500, 2)}, 20.0)
        shares[discipline] = got["small"] / sum(got.values())
    assert shares["fifo"] < 0.06  # 2 of 42 packets queued are the small flow's
    assert shares["drr"] == pytest.approx(0.5, rel=0.01)


# ---- unequal offered loads: FIFO starves the light flow, DRR does not ----------------------------------------
def open_loop(discipline, seconds=40.0, rate=2e6, size=1000, queue="30kb"):
    """A heavy flow offering 2x the link and a light one offering 0.2x, Poisson, one shared queue limit."""
    env = simpy.Environment()
    cell = LinkConfig.from_strings(rate=f"{rate:g}bit", queue=queue, name="cell", discipline=discipline).build(
        env, np.random.default_rng(0), shared=True)
    got = {"heavy": 0, "light": 0}
    offered = {"heavy": 0, "light": 0}
    refused = {"heavy": 0, "light": 0}
    paths = {n: LinkPath(env, [cell], lambda p, n=n: got.__setitem__(n, got[n] + p.size)) for n in got}

    def sender(name, load, seed):
        src = np.random.default_rng(seed)
        mean_gap = size * 8 / (load * rate)
        while True:
            yield env.timeout(float(src.exponential(mean_gap)))
            offered[name] += size
            if not paths[name].send(Pkt(size, flow=name)):
                refused[name] += size
    env.process(sender("heavy", 2.0, 1))
    env.process(sender("light", 0.2, 2))
    env.run(until=seconds)
    return got, offered, refused, cell


def test_heavy_flow_starves_a_light_one_under_fifo_not_under_drr():
    fifo, offered_f, refused_f, _ = open_loop("fifo")
    drr, offered_d, refused_d, cell = open_loop("drr")
    assert offered_f == offered_d  # the same offered traffic
    light = offered_f["light"]
    assert fifo["light"] < 0.6 * light  # FIFO: the light flow loses about as large a fraction as the heavy one
    assert refused_f["light"] > 0.4 * light
    assert drr["light"] > 0.97 * light and refused_d["light"] == 0  # DRR: all of it (its share is 1/2)
    assert refused_d["heavy"] == cell.bytes_dropped_queue  # every drop is the heavy flow's
    assert (drr["heavy"] + drr["light"]) * 8 / 40.0 == pytest.approx(2e6, rel=0.01)  # the rest is heavy's


def test_a_flow_over_its_queue_is_dropped_others_are_not():
    rate, size, seconds, limit = 2e6, 1000, 30.0, 15000
    results = {}
    for discipline in ("fifo", "drr"):
        env = simpy.Environment()
        cell = LinkConfig(rate_bps=rate, queue_bytes=limit, name="cell", discipline=discipline).build(
            env, np.random.default_rng(0), shared=True)
        got = {"blast": 0, "calm": 0}
        refused = {"blast": 0, "calm": 0}

        paths: dict[str, LinkPath] = {}

        def send(name, paths=paths, refused=refused):
            if not paths[name].send(Pkt(size, flow=name)):
                refused[name] += 1

        def deliver(p, got=got, send=send):
            got[p.flow] += p.size
            if p.flow == "calm":
                send("calm")  # the calm flow keeps 5 packets outstanding
        paths.update(blast=LinkPath(env, [cell], deliver), calm=LinkPath(env, [cell], deliver))

        def blaster(env=env, send=send):
            while True:  # 3x the link, always over its queue limit
                yield env.timeout(size * 8 / (3 * rate))
                send("blast")
        for _ in range(5):  # 5000 bytes outstanding: never more than its limit
            send("calm")
        env.process(blaster())
        env.run(until=seconds)
        results[discipline] = (got, refused, cell)
    got, refused, cell = results["drr"]
    assert refused["calm"] == 0 and refused["blast"] > 0
    assert cell.packets_dropped_queue == refused["blast"]
    assert got["calm"] * 8 / seconds == pytest.approx(rate / 2, rel=0.02)  # the calm flow keeps its share
    assert got["blast"] * 8 / seconds == pytest.approx(rate / 2, rel=0.02)
    assert cell.flow_queued_bytes("blast") <= limit and cell.flow_queued_bytes("nobody") == 0
    got_f, refused_f, _ = results["fifo"]
    # one shared FIFO: the blaster's backlog takes the calm flow's share (its deliveries clock it into
    # freed slots, so it is not refused, but each of its packets waits behind the blaster's queue)
    assert got_f["calm"] < 0.7 * got["calm"] and got_f["blast"] > 1.3 * got["blast"]


# ---- one active flow: DRR is FIFO, exactly --------------------------------------------------------------------
def single_flow_run(cfg, schedule, packet=Pkt):
    env = simpy.Environment()
    out = []
    link = cfg.build(env, np.random.default_rng(3), lambda p: out.append((p.seq, env.now.hex())))
    results = []

    def source():
        for seq, (t, size) in enumerate(schedule):
            if t > env.now:
                yield env.timeout(t - env.now)
            results.append(link.send(packet(size, seq)))
    env.process(source())
    env.run()
    return out, results, link.stats()


def schedules():
    src = np.random.default_rng(7)
    n = 6000
    poisson = np.cumsum(src.exponential(0.003, n))
    grid = np.cumsum(src.integers(0, 4, n)) / 1000.0  # whole milliseconds: arrivals tie with departures
    sizes, mixed = src.integers(1, 1500, n), src.choice([200, 1000, 1500], n)
    return {"poisson-random-sizes": [(float(t), int(s)) for t, s in zip(poisson, sizes, strict=True)],
            "ms-grid-mixed-sizes": [(float(t), int(s)) for t, s in zip(grid, mixed, strict=True)]}


LINKS = {
    "rate-queue": dict(rate_bps=3e6, queue_bytes=6000, delay_s=0.02),
    "rate-bufferless": dict(rate_bps=2e6, queue_bytes=0),
    "rate-loss-jitter": dict(rate_bps=8e6, delay_s=0.03, jitter_s=0.005, loss="random 5%"),
    "trace-queue": dict(queue_bytes=15000, delay_s=0.01),
    "trace-unlimited-loss-first": dict(loss="random 3%", loss_before_queue=True),
}


@pytest.mark.parametrize("schedule", sorted(schedules()))
@pytest.mark.parametrize("name", sorted(LINKS))
def test_one_flow_drr_delivers_exactly_as_fifo(name, schedule):
    kwargs = dict(LINKS[name])
    if name.startswith("trace"):
        kwargs["trace"] = up_trace()
    plan = schedules()[schedule]
    fifo = single_flow_run(LinkConfig(**kwargs), plan)
    drr = single_flow_run(LinkConfig(**kwargs, discipline="drr"), plan)
    assert drr == fifo  # the same delivery times (exact floats), send results and counters
    assert sum(fifo[1]) > len(plan) // 4  # and there was traffic
    if kwargs.get("queue_bytes") is not None and "bufferless" not in name:
        assert fifo[2]["packets_dropped_queue"] > 0  # ... and drops, where a queue limit can bite
    assert single_flow_run(LinkConfig(**kwargs, discipline="drr"), plan, Bare) == fifo  # no .flow: one flow


def test_one_flow_drr_behind_a_private_edge_link_gets_a_gate_and_equals_fifo():
    plan = schedules()["poisson-random-sizes"]
    runs = []
    for discipline in ("fifo", "drr"):
        env = simpy.Environment()
        out = []
        edge = LinkConfig(rate_bps=20e6, delay_s=0.002, name="edge").build(env, np.random.default_rng(1))
        cell = LinkConfig(rate_bps=3e6, queue_bytes=8000, delay_s=0.01, name="cell",
                          discipline=discipline).build(env, np.random.default_rng(2))
        path = LinkPath(env, [edge, cell], lambda p, out=out, env=env: out.append((p.seq, env.now)))
        assert len(path.gates) == (2 if discipline == "drr" else 1)  # drr takes packets at their arrival

        def source(env=env, path=path):
            for seq, (t, size) in enumerate(plan):
                yield env.timeout(t - env.now)
                path.send(Pkt(size, seq))
        env.process(source())
        env.run()
        runs.append((out, cell.stats()))
    assert runs[0] == runs[1]


# ---- cost and counters ------------------------------------------------------------------------------------------
def test_drr_costs_one_event_per_departure():
    for discipline, per_packet in (("fifo", 1), ("drr", 2)):  # drr: its departure + the delivery gate's
        env = simpy.Environment()
        cell = Link(env, 1e6, delay=0.01, rng=np.random.default_rng(0), shared=True, discipline=discipline,
                    quantum_bytes=500)  # one packet a turn
        got = []
        a = LinkPath(env, [cell], lambda p, got=got: got.append(("a", p.seq)))
        b = LinkPath(env, [cell], lambda p, got=got: got.append(("b", p.seq)))
        for seq in range(50):
            a.send(Pkt(500, seq, "a"))
            b.send(Pkt(500, seq, "b"))
        assert cell.queued_packets == 99 and cell.queued_bytes == 99 * 500  # the first is in service
        assert steps(env) == per_packet * 100
        assert got == [(f, s) for s in range(50) for f in ("a", "b")]  # equal flows alternate


def test_drr_turns_send_a_quantum_of_bytes():
    env = simpy.Environment()
    cell = Link(env, 1e6, rng=np.random.default_rng(0), shared=True, discipline="drr", quantum_bytes=1500)
    got = []
    path = LinkPath(env, [cell], lambda p: got.append(p.flow + str(p.seq)))
    for seq in range(6):
        path.send(Pkt(500, seq, "a"))
    for seq in range(3):
        path.send(Pkt(1000, seq, "b"))
    path.send(Pkt(2000, 0, "c"))  # larger than a quantum: waits for a second turn's credit
    env.run()
    # a0 starts at once; a1.. wait, so the turns go a, b, c: a's 1500 sends a1-a3; b sends b0 and keeps
    # 500; c keeps its 1500; a sends a4, a5 and leaves; b with 2000 sends b1, b2; c with 3000 sends c0
    assert got == ["a0", "a1", "a2", "a3", "b0", "a4", "a5", "b1", "b2", "c0"]


def test_drr_counters_and_flow_bytes():
    env = simpy.Environment()
    cell = LinkConfig(rate_bps=1e6, queue_bytes=3000, name="cell", discipline="drr").build(
        env, np.random.default_rng(0), shared=True)
    path = LinkPath(env, [cell], lambda p: None)
    sent = [path.send(Pkt(1000, k, flow=k % 2)) for k in range(10)]  # at t=0: one starts, 3 + 3 wait
    assert sent == [True] * 7 + [False] * 3
    port = cell.port
    assert isinstance(port, DrrPort) and not isinstance(port, Port)
    assert (port.packets_in, port.bytes_in, port.packets_dropped, port.bytes_dropped) == (10, 10000, 3, 3000)
    assert (cell.queued_packets, cell.queued_bytes) == (6, 6000)
    assert cell.busy_until == pytest.approx(7 * 0.008)
    env.run(until=0.0161)  # two departures
    assert cell.flow_bytes() == {0: 1000, 1: 1000} and cell.queued_bytes == 4000
    env.run()
    assert cell.flow_bytes() == {0: 4000, 1: 3000} and cell.bytes_delivered == 7000
    assert cell.stats()["packets_dropped_queue"] == 3
    with pytest.raises(RuntimeError, match="arrival"):
        port.put(Pkt(100), env.now + 1.0, path.route, 0)  # ahead of the clock: refused
    with pytest.raises(LinkConfigError, match="drr"):
        LinkConfig(rate_bps=1e6).build(env, np.random.default_rng(0), lambda p: None).flow_bytes()


def test_drr_configuration():
    cfg = LinkConfig.from_strings(rate="1mbit", queue="10kb", discipline="drr", quantum="3000")
    assert (cfg.discipline, cfg.quantum_bytes, cfg.queue_bytes) == ("drr", 3000, 10240)
    assert cfg.describe()["discipline"] == "drr" and cfg.describe()["quantum"] == "3000b"
    plain = LinkConfig.from_strings(rate="1mbit")
    assert "discipline" not in plain.describe() and "quantum" not in plain.describe()
    assert plain.discipline == "fifo" and plain == LinkConfig(rate_bps=1e6)
    assert isinstance(plain.build(simpy.Environment(), np.random.default_rng(0), lambda p: None).port, Port)
    with pytest.raises(LinkConfigError, match="'wfq'"):
        LinkConfig(rate_bps=1e6, discipline="wfq")
    with pytest.raises(LinkConfigError, match="quantum_bytes"):
        LinkConfig(rate_bps=1e6, discipline="drr", quantum_bytes=0)
    with pytest.raises(LinkConfigError, match="'WFQ'"):
        LinkConfig.from_strings(rate="1mbit", discipline="WFQ")


# ---- trace start offsets -----------------------------------------------------------------------------------------
def trace_departures(trace, offset, start, n=3000, discipline="fifo"):
    """Departure milliseconds of packets sent from ``start`` on, at half-millisecond points (never on the
    trace's grid, so ``start`` + s and s are judged alike against it)."""
    env = simpy.Environment()
    out = []
    cfg = LinkConfig(trace=trace, queue_bytes=30000, trace_offset_s=offset, discipline=discipline)
    link = cfg.build(env, np.random.default_rng(0), lambda p: out.append((p.seq, round(env.now * 1000))))
    src = np.random.default_rng(5)
    gaps = src.integers(0, 12, n)
    sizes = src.integers(40, 1500, n)

    def source():
        ms = 0
        for seq in range(n):
            ms += int(gaps[seq])
            yield env.timeout(start + (ms + 0.5) / 1000.0 - env.now)
            link.send(Pkt(int(sizes[seq]), seq))
    env.process(source())
    env.run()
    return out, link


@needs_traces
@pytest.mark.parametrize("discipline", ["fifo", "drr"])
def test_trace_offset_delivers_as_the_trace_from_that_time(discipline):
    trace, x = up_trace(), 37.25
    shifted, link = trace_departures(trace, x, 0.0, discipline=discipline)
    base, _ = trace_departures(trace, 0.0, x, discipline=discipline)
    assert len(shifted) > 2000
    assert [(seq, ms + 37250) for seq, ms in shifted] == base
    assert link.trace.offset_ms == 37250 and link.trace.period_ms == trace.period_ms
    wrapped, _ = trace_departures(trace, x + 2 * trace.period_s, 0.0, discipline=discipline)
    assert wrapped == shifted  # the offset wraps with the period


@needs_traces
def test_trace_offset_zero_is_todays_link():
    trace = up_trace()
    plain, link = trace_departures(trace, 0.0, 0.0)
    assert link.trace is trace  # not even a copy
    cfg = LinkConfig(trace=trace, trace_offset_s=0.0)
    assert cfg == LinkConfig(trace=trace) and cfg.describe() == LinkConfig(trace=trace).describe()
    assert "trace_offset" not in cfg.describe()
    plan = schedules()["poisson-random-sizes"]
    kwargs = dict(trace=trace, queue_bytes=20000, delay_s=0.02, jitter_s=0.003, loss="gemodel 2% 30%")
    assert single_flow_run(LinkConfig(**kwargs, trace_offset_s=0.0), plan) == single_flow_run(
        LinkConfig(**kwargs), plan)
    assert trace.shifted(0.0) is trace and trace.shifted(trace.period_s) is trace


@needs_traces
def test_trace_offset_configuration():
    trace = up_trace()
    cfg = LinkConfig.from_strings(trace=trace, trace_offset="30s")
    assert cfg.trace_offset_s == 30.0 and cfg.describe()["trace_offset"] == "30000ms"
    assert LinkConfig(trace=trace, trace_offset_s=1.0004).trace_offset_s == 1.0  # the trace's millisecond grid
    assert LinkConfig(trace=trace, trace_offset_s=trace.period_s + 2.0).trace_offset_s == 2.0  # wraps
    shifted = trace.shifted(10.0)
    assert shifted.shifted(5.0).offset_ms == 15000 and shifted.shifted(trace.period_s - 10.0) is trace
    assert shifted.capacity_bps() == trace.capacity_bps() and len(shifted) == len(trace)
    times = shifted.times_between(0.0, 130.0)
    assert np.array_equal(times, [shifted.time_of(a) for a in range(len(times))])
    assert np.array_equal(np.round(times * 1000) + 10000, np.round(trace.times_between(10.0, 140.0) * 1000))
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(LinkConfigError, match="trace_offset_s"):
            LinkConfig(trace=trace, trace_offset_s=bad)
    with pytest.raises(LinkConfigError, match="needs a trace"):
        LinkConfig(rate_bps=1e6, trace_offset_s=5.0)
    # saturate measures the shifted schedule
    from miscnet.channel.link import saturate
    out = saturate(LinkConfig(trace=trace, trace_offset_s=50.0, discipline="drr"), 5.0, seed=1)
    assert out["utilization"] == pytest.approx(1.0, abs=0.01)
    assert out["capacity_bps"] == trace.shifted(50.0).count_between(0.0, 5.0) * 1500 * 8 / 5.0

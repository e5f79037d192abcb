"""The link model against the tools it imitates: netem's rate recursion and loss models, mm-link's traces."""

import math
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import simpy
import simpy.rt

from miscnet.channel.errors import LinkConfigError
from miscnet.channel.link import DuplexConfig, Link, LinkConfig, saturate
from miscnet.channel.loss import Bernoulli, FourState, GilbertElliott, _chain_stats
from miscnet.channel.trace import Trace
from miscnet.channel.units import parse_loss, parse_rate, parse_size, parse_time
from miscnet.core.errors import MiscError

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
if not TRACES.is_dir():  # a checkout whose shared/ sits inside it
    TRACES = Path(__file__).resolve().parents[1] / "shared" / "traces"
UP = TRACES / "ATT-LTE-driving-2016.up"
DOWN = TRACES / "ATT-LTE-driving-2016.down"
needs_traces = pytest.mark.skipif(not UP.exists(), reason="shared/traces not present")


class Pkt:
    __slots__ = ("size", "seq")

    def __init__(self, size, seq=0):
        self.size = size
        self.seq = seq


def draws(model, n, seed):
    rng = np.random.default_rng(seed)
    return np.fromiter((model.lost(rng) for _ in range(n)), dtype=bool, count=n)


def burst_lengths(lost):
    edges = np.diff(np.concatenate(([0], lost.astype(np.int8), [0])))
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


# ---- units -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,bps", [
    ("64kbit", 64e3), ("1.5mbit", 1.5e6), ("1Mbit", 1e6), ("2gbit", 2e9), ("1tbit", 1e12), ("9600", 9600.0),
    ("100bit", 100.0), ("100kbps", 800e3), ("1mbps", 8e6), ("1kibit", 1024.0), ("1mibit", 1024.0**2),
    ("1kibps", 8192.0), (" 64kbit ", 64e3), (".5mbit", 5e5),
])
def test_parse_rate(text, bps):
    assert parse_rate(text) == pytest.approx(bps, rel=1e-15)


@pytest.mark.parametrize("text,fragment", [
    ("64kbits", "'kbits'"), ("", "bad rate"), ("fast", "bad rate"), ("-5kbit", "bad rate"),
    ("0kbit", "positive"), ("10%", "percent"), ("64 kbit", "right after the number"),
])
def test_parse_rate_errors(text, fragment):
    with pytest.raises(LinkConfigError) as err:
        parse_rate(text)
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg
    assert isinstance(err.value, MiscError)


def test_rate_error_lists_units():
    with pytest.raises(LinkConfigError) as err:
        parse_rate("64kbits")
    assert "kbit" in str(err.value) and "'64kbits'" in str(err.value)


@pytest.mark.parametrize("text,seconds", [
    ("40ms", 0.04), ("1.5s", 1.5), ("2sec", 2.0), ("250us", 250e-6), ("100", 100e-6), ("10ns", 1e-8),
    ("0", 0.0), ("3msecs", 0.003), ("1S", 1.0),
])
def test_parse_time(text, seconds):
    assert parse_time(text) == pytest.approx(seconds, rel=1e-15)


@pytest.mark.parametrize("text", ["40 mins", "ms", "-1ms", "40m", "", "1h"])
def test_parse_time_errors(text):
    with pytest.raises(LinkConfigError, match="time"):
        parse_time(text)


@pytest.mark.parametrize("text,nbytes", [
    ("1500", 1500), ("1500b", 1500), ("64kb", 65536), ("10k", 10240), ("1m", 1048576), ("1mb", 1048576),
    ("1g", 1024**3), ("1kbit", 128), ("1mbit", 131072), ("1.5k", 1536), ("0", 0), (3000, 3000),
])
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["10q", "", "-1", "kb", "1.5 kbytes"])
def test_parse_size_errors(text):
    with pytest.raises(LinkConfigError, match="size"):
        parse_size(text)


def test_parse_loss_follows_netem():
    for spec in ("random 5%", "random 5", "5%", "5", "loss random 5%", "drop 5%"):
        model = parse_loss(spec)
        assert isinstance(model, Bernoulli) and model.p == pytest.approx(0.05), spec
    assert parse_loss("random 0.05").p == pytest.approx(0.0005)  # a bare number is a percentage
    for spec in ("none", "", None, "0", "0%", "random 0", "NONE"):
        assert parse_loss(spec) is None, spec
    ge = parse_loss("gemodel 1% 30% 70% 0.1%")
    assert isinstance(ge, GilbertElliott)
    assert (ge.p, ge.r, ge.one_minus_h, ge.one_minus_k) == pytest.approx((0.01, 0.3, 0.7, 0.001))
    ge = parse_loss("gemodel 1%")  # tc's defaults: r = 1 - p, 1-h = 100%, 1-k = 0%
    assert (ge.p, ge.r, ge.one_minus_h, ge.one_minus_k) == pytest.approx((0.01, 0.99, 1.0, 0.0))
    ge = parse_loss("gemodel 1% 10%")
    assert (ge.r, ge.one_minus_h, ge.one_minus_k) == pytest.approx((0.1, 1.0, 0.0))
    st = parse_loss("state 2%")  # tc's defaults: p31 = 1 - p13, p32 = 0, p23 = 100%, p14 = 0
    assert isinstance(st, FourState)
    assert (st.p13, st.p31, st.p32, st.p23, st.p14) == pytest.approx((0.02, 0.98, 0.0, 1.0, 0.0))
    st = parse_loss("state 1% 30% 10% 5% 0.5%")
    assert (st.p13, st.p31, st.p32, st.p23, st.p14) == pytest.approx((0.01, 0.3, 0.1, 0.05, 0.005))
    assert parse_loss(ge.spec).r == ge.r  # the spec round-trips


@pytest.mark.parametrize("spec,fragment", [
    ("random", "one percentage"), ("random 5% 25%", "correlation"), ("random 150%", "0..100"),
    ("gemodel", "1 to 4"), ("gemodel 1 2 3 4 5", "1 to 4"), ("pareto 5%", "unknown loss model 'pareto'"),
    ("random 5x", "'5x'"), ("state 60 50 60", "p31 + p32"), ("gemodel 1% ecn", "'ecn'"), ("ecn", "ecn"),
    ("state", "1 to 5"),
])
def test_parse_loss_errors(spec, fragment):
    with pytest.raises(LinkConfigError) as err:
        parse_loss(spec)
    assert fragment in str(err.value) and "\n" not in str(err.value)


# ---- loss models -----------------------------------------------------------------------------------------
N = 200_000


@pytest.mark.parametrize("spec", ["gemodel 1% 30% 70% 0.1%", "gemodel 5% 20%", "gemodel 2% 40% 50%"])
def test_gilbert_elliott_loss_rate_matches_formula(spec):
    model = parse_loss(spec)
    p, r, h1, k1 = model.p, model.r, model.one_minus_h, model.one_minus_k
    formula = (r * k1 + p * h1) / (p + r)
    assert model.mean_loss() == pytest.approx(formula, rel=1e-12)
    assert _chain_stats(*model._chain(), start=0)[0] == pytest.approx(formula, rel=1e-9)
    lost = draws(model, N, seed=11)
    assert abs(lost.mean() - formula) < 4 * model.loss_rate_stderr(N)


def test_gemodel_1_30_70_01_values():
    model = parse_loss("gemodel 1% 30% 70% 0.1%")
    assert model.mean_loss() == pytest.approx((0.3 * 0.001 + 0.01 * 0.7) / 0.31)


@pytest.mark.parametrize("spec,burst", [("gemodel 5% 20%", 5.0), ("gemodel 1% 50%", 2.0),
                                        ("gemodel 3%", 1 / 0.97)])
def test_gilbert_mean_burst_is_one_over_r(spec, burst):
    model = parse_loss(spec)
    assert model.mean_burst() == pytest.approx(burst)
    runs = burst_lengths(draws(model, N, seed=5))
    se = runs.std(ddof=1) / math.sqrt(len(runs))
    assert abs(runs.mean() - burst) < 4 * se


def test_general_mean_burst_and_four_state_by_simulation():
    for spec in ("gemodel 1% 30% 70% 0.1%", "state 1% 30% 10% 5% 0.5%"):
        model = parse_loss(spec)
        lost = draws(model, N, seed=3)
        assert abs(lost.mean() - model.mean_loss()) < 4 * model.loss_rate_stderr(N), spec
        runs = burst_lengths(lost)
        assert abs(runs.mean() - model.mean_burst()) < 4 * runs.std(ddof=1) / math.sqrt(len(runs)), spec


def test_gemodel_with_only_p_is_bernoulli():
    model = parse_loss("gemodel 10%")
    lost = draws(model, N, seed=9)
    assert abs(lost.mean() - 0.1) < 4 * math.sqrt(0.1 * 0.9 / N)
    # independence: the chance of a loss right after a loss is still p
    after = lost[1:][lost[:-1]]
    assert abs(after.mean() - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(after))
    assert model.loss_rate_stderr(N) == pytest.approx(Bernoulli(0.1).loss_rate_stderr(N), rel=1e-6)


def test_bernoulli_rate():
    model = Bernoulli(0.05)
    lost = draws(model, N, seed=1)
    assert abs(lost.mean() - 0.05) < 4 * model.loss_rate_stderr(N)
    assert model.mean_burst() == pytest.approx(1 / 0.95)


def test_loss_models_use_the_generator_given():
    a = draws(parse_loss("gemodel 1% 30% 70% 0.1%"), 20_000, seed=4)
    b = draws(parse_loss("gemodel 1% 30% 70% 0.1%"), 20_000, seed=4)
    c = draws(parse_loss("gemodel 1% 30% 70% 0.1%"), 20_000, seed=5)
    assert (a == b).all() and not (a == c).all()


# ---- constant-rate link: netem's recursion ---------------------------------------------------------------
def run_schedule(link_kwargs, schedule, t0=0.0):
    """Send (time, size) packets; return (send times, delivery times by seq, results, link)."""
    env = simpy.Environment(initial_time=t0)
    got = {}
    link = Link(env, rng=np.random.default_rng(0), deliver=lambda p: got.setdefault(p.seq, env.now),
                **link_kwargs)
    sent_at, results = [], []

    def source():
        for seq, (t, size) in enumerate(schedule):
            if t0 + t > env.now:
                yield env.timeout(t0 + t - env.now)
            sent_at.append(env.now)
            results.append(link.send(Pkt(size, seq)))

    env.process(source())
    env.run()
    return sent_at, got, results, link


def test_constant_rate_reproduces_netem_departures_exactly():
    rate, delay = 1_000_000.0, 0.0137
    # back-to-back bursts, a packet arriving mid-serialisation, idle gaps, odd sizes
    schedule = [(0.0, 1500), (0.0, 1500), (0.0, 40), (0.0051, 1000), (0.1, 576), (0.1003, 1500),
                (0.2, 1), (0.2, 1499), (0.2, 1500), (0.35, 9000), (0.35, 64), (0.4, 1500), (1.7, 1500)]
    for t0 in (0.0, 1000.3):  # far from zero too, where naive float scheduling drifts
        sent_at, got, results, link = run_schedule({"rate": rate, "delay": delay}, schedule, t0)
        assert all(results)
        prev = -math.inf
        for seq, ((_, size), now) in enumerate(zip(schedule, sent_at, strict=True)):
            prev = max(prev, now) + 8 * size / rate  # netem: max(prev_send_time, now) + 8 * size / rate
            assert got[seq] == prev + delay, seq  # exact, not approximate
        assert link.packets_delivered == len(schedule) and link.in_flight == 0


def test_delivery_lands_on_the_computed_time():
    # now + (t - now) != t for a few percent of these: the link must still deliver at exactly t
    for i in range(1, 120):
        for delay in (0.77, 3.3):
            sent_at, got, _, _ = run_schedule({"rate": 1e6, "delay": delay}, [(i * 0.01 + 0.003, 125)])
            assert got[0] == (sent_at[0] + 8 * 125 / 1e6) + delay, (i, delay)


def test_full_queue_drops_exactly():
    burst = [(0.0, 1500)] * 10
    # constant rate: the first packet starts at once, two more fit the 3000 bytes
    _, got, results, link = run_schedule({"rate": 1e6, "queue_bytes": 3000}, burst)
    assert results == [True] * 3 + [False] * 7
    assert link.packets_dropped_queue == 7 and link.bytes_dropped_queue == 7 * 1500
    assert sorted(got) == [0, 1, 2] and got[2] == pytest.approx(0.036)
    # odd sizes: 1000 in service, 3 x 1000 queued, the 5th does not fit, a 0-byte one does
    _, _, results, _ = run_schedule({"rate": 1e6, "queue_bytes": 3000}, [(0.0, 1000)] * 5 + [(0.0, 0)])
    assert results == [True] * 4 + [False, True]
    # room frees up as packets start: after the first leaves, one more fits
    _, _, results, _ = run_schedule({"rate": 1e6, "queue_bytes": 3000}, burst[:4] + [(0.012, 1500)])
    assert results == [True, True, True, False, True]


@needs_traces
def test_full_queue_drops_on_a_trace_link():
    # mm-link queues every arrival until the next opportunity: only two fit
    _, got, results, link = run_schedule({"rate": Trace.load(UP), "queue_bytes": 3000}, [(0.0, 1500)] * 10)
    assert results == [True] * 2 + [False] * 8 and link.packets_dropped_queue == 8 and len(got) == 2


def test_zero_queue_is_bufferless():
    _, got, results, _ = run_schedule({"rate": 1e6, "queue_bytes": 0}, [(0.0, 100), (0.0, 100), (0.001, 100)])
    assert results == [True, False, True]


def test_delay_and_jitter_never_reorder():
    env = simpy.Environment()
    order, times = [], []
    link = Link(env, 10e6, delay=0.05, jitter=0.02, rng=np.random.default_rng(2),
                deliver=lambda p: (order.append(p.seq), times.append(env.now)))
    rng = np.random.default_rng(3)
    gaps = rng.exponential(0.002, 3000)

    def source():
        for seq, gap in enumerate(gaps):
            yield env.timeout(gap)
            link.send(Pkt(int(rng.integers(40, 1500)), seq))

    env.process(source())
    env.run()
    assert order == list(range(len(gaps)))
    assert all(b >= a for a, b in zip(times, times[1:], strict=False))


def test_jitter_is_uniform_around_the_delay():
    env = simpy.Environment()
    delays = []
    link = Link(env, 1e9, delay=0.05, jitter=0.01, rng=np.random.default_rng(8),
                deliver=lambda p: delays.append(env.now - p.seq))

    def source():
        for _ in range(2000):  # spaced far apart, so FIFO clipping never applies
            yield env.timeout(0.1)
            link.send(Pkt(125, env.now))

    env.process(source())
    env.run()
    d = np.array(delays) - 125 * 8 / 1e9
    assert d.min() >= 0.04 - 1e-12 and d.max() <= 0.06 + 1e-12
    assert abs(d.mean() - 0.05) < 4 * 0.01 / math.sqrt(3 * len(d))
    assert d.std() == pytest.approx(0.01 / math.sqrt(3), rel=0.1)


# ---- traces ----------------------------------------------------------------------------------------------
def test_trace_schedule_index_arithmetic():
    tr = Trace.parse("0\n2\n", "t")
    assert tr.period_ms == 2 and len(tr) == 2
    assert list(islice(tr.opportunities(0.0), 6)) == [0.0, 0.002, 0.002, 0.004, 0.004, 0.006]
    assert tr.index_after(0.0) == 1 and tr.index_after(0.002) == 3 and tr.index_after(-1.0) == 0
    assert tr.time_of(10**9) == 1e6  # index arithmetic far ahead: 5e8 periods of 2 ms
    tr = Trace.parse("1\n1\n3\n5\n", "t")
    assert [tr.time_ms(a) for a in range(9)] == [1, 1, 3, 5, 6, 6, 8, 10, 11]
    assert tr.index_after(0.0045) == 3 and tr.index_after(0.005) == 4 and tr.index_at_or_after(0.005) == 3
    assert tr.count_between(0.0, 0.010) == 8
    assert tr.times_between(0.003, 0.009).tolist() == [0.003, 0.005, 0.006, 0.006, 0.008]


def test_trace_link_carries_bytes_and_wastes_idle_budget():
    tr = Trace.parse("1\n1\n3\n5\n", "t")  # opportunities at 1, 1, 3, 5 | 6, 6, 8, 10 | ... ms
    schedule = [(0.0, 3000),   # 3004 with mm-link's header: opp 1ms (1504) + opp 1ms (1500), 4 left
                (0.0, 100),    # 104 > 4 left: carries into 3 ms
                (0.003, 100),  # arrives at 3 ms: that opportunity is burnt, so 5 ms (leftover wasted)
                (0.0055, 1500),  # idle at 5.5 ms: 6 ms, exactly one full opportunity
                (0.0055, 1)]   # nothing left at that opportunity: the other 6 ms one
    _, got, results, _ = run_schedule({"rate": tr}, schedule)
    assert all(results)
    assert [got[i] for i in range(5)] == [0.001, 0.003, 0.005, 0.006, 0.006]


@needs_traces
def test_shared_traces_capacity():
    up, down = Trace.load(UP), Trace.load(DOWN)
    assert (len(up), up.period_ms, len(down), down.period_ms) == (19101, 120002, 45604, 120002)
    assert up.capacity_bps() == pytest.approx(19101 * 1500 * 8 / 120.002)
    assert up.capacity_bps() / 1e6 == pytest.approx(1.91, abs=0.005)
    assert down.capacity_bps() / 1e6 == pytest.approx(4.56, abs=0.005)


@needs_traces
@pytest.mark.parametrize("path", [UP, DOWN], ids=["up", "down"])
@pytest.mark.parametrize("size", [1500, 1000])
def test_saturated_trace_link_delivers_its_capacity(path, size):
    res = saturate(LinkConfig.from_strings(trace=path, delay="20ms"), seconds=40, seed=1, packet_size=size)
    assert 0.97 <= res["utilization"] <= 1.0
    assert res["capacity_bps"] == pytest.approx(
        Trace.load(path).count_between(0, 40) * 1500 * 8 / 40)
    # crossing the period boundary: the schedule repeats
    res = saturate(LinkConfig.from_strings(trace=path), seconds=130, seed=1, packet_size=size)
    assert 0.97 <= res["utilization"] <= 1.0


@pytest.mark.parametrize("text,fragment", [
    ("10\n\n20\n", "t.txt:2: empty line"),
    ("10\n5\n", "t.txt:2: timestamp 5 is before the previous one (10)"),
    ("", "no valid timestamps"),
    ("\n", "t.txt:1: empty line"),
    ("0\n0\n", "last timestamp is 0"),
    ("10\n1.5\n", "t.txt:2: '1.5' is not"),
    ("abc\n", "t.txt:1:"),
    ("10\n-3\n", "t.txt:2:"),
    ("10\n12 \n", "t.txt:2:"),
    ("10\r\n20\r\n", "CRLF"),
])
def test_trace_parse_errors(tmp_path, text, fragment):
    path = tmp_path / "t.txt"
    path.write_text(text, newline="")
    with pytest.raises(LinkConfigError) as err:
        Trace.load(path)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_trace_load_accepts_mm_link_input(tmp_path):
    path = tmp_path / "ok.trace"
    path.write_text(" 7\n7\n9")  # leading blanks (strtol skips them), no final newline
    tr = Trace.load(path)
    assert tr.times_ms.tolist() == [7, 7, 9] and tr.period_ms == 9
    with pytest.raises(LinkConfigError, match="not found"):
        Trace.load(tmp_path / "missing")


# ---- seeds, configs, clocks ------------------------------------------------------------------------------
def lossy_run(seed):
    env = simpy.Environment()
    arrivals = []
    link = LinkConfig.from_strings(rate="2mbit", delay="30ms", jitter="5ms", loss="gemodel 2% 30% 80% 0.5%",
                                   queue="20kb").build(env, np.random.default_rng(seed),
                                                       lambda p: arrivals.append((p.seq, env.now)))

    def source():
        for seq in range(5000):
            link.send(Pkt(1200, seq))
            yield env.timeout(0.005)

    env.process(source())
    env.run()
    return arrivals, link.stats()


def test_seeded_runs_reproduce_and_seeds_differ():
    a, sa = lossy_run(42)
    b, sb = lossy_run(42)
    c, sc = lossy_run(43)
    assert a == b and sa == sb
    assert sa["packets_lost"] > 0 and a != c and sa["packets_lost"] != sc["packets_lost"]
    assert sa["packets_sent"] == sa["packets_delivered"] + sa["packets_lost"] + sa["packets_dropped_queue"]


def test_link_counts_losses_and_bursts():
    cfg = LinkConfig.from_strings(rate="100mbit", loss="gemodel 5% 20%")
    res = saturate(cfg, seconds=24, seed=7)  # ~200k packets
    model = parse_loss(cfg.loss)
    n = 24 * 100e6 / (1500 * 8)
    assert abs(res["loss_rate"] - 0.2) < 4 * model.loss_rate_stderr(n)
    assert res["mean_burst"] == pytest.approx(5.0, rel=0.05)
    assert res["utilization"] == pytest.approx(1 - res["loss_rate"], abs=1e-3)  # lost packets used the link


def test_loss_before_queue_is_netems_order():
    base = LinkConfig.from_strings(rate="10mbit", loss="random 50%")
    after = saturate(base, seconds=50, seed=1)  # ~42k packets: the loss rate's sigma is 0.0025
    before = saturate(base.with_(loss_before_queue=True), seconds=50, seed=1)
    assert after["loss_rate"] == pytest.approx(0.5, abs=0.02)
    assert before["loss_rate"] == pytest.approx(0.5, abs=0.02)
    assert after["utilization"] == pytest.approx(1 - after["loss_rate"], abs=1e-3)
    assert before["utilization"] == pytest.approx(1.0, abs=1e-3)  # netem: lost packets take no capacity


def test_link_config_from_strings():
    cfg = LinkConfig.from_strings(rate="64kbit", delay="40ms", jitter="2ms", loss="random 5", queue="10k")
    assert (cfg.rate_bps, cfg.delay_s, cfg.jitter_s, cfg.loss, cfg.queue_bytes) == (
        64e3, pytest.approx(0.04), pytest.approx(0.002), "random 5%", 10240)
    assert LinkConfig.from_strings(rate="1mbit", queue="none").queue_bytes is None
    assert cfg.describe()["loss"] == "random 5%"
    for kwargs, fragment in [({}, "give a rate"), ({"rate": "1mbit", "trace": "x"}, "not both"),
                             ({"rate": "1mbit", "loss": "gemodel"}, "1 to 4"),
                             ({"trace": "/nonexistent/trace"}, "not found"),
                             ({"rate": "1mbit", "delay": "40 ms"}, "'40 ms'")]:
        with pytest.raises(LinkConfigError, match=fragment):
            LinkConfig.from_strings(**kwargs)


def test_duplex_defaults_and_independent_directions():
    fwd = LinkConfig.from_strings(rate="64kbit", delay="40ms", loss="random 10%")
    duplex = DuplexConfig(fwd)
    rev = duplex.reverse
    assert (rev.rate_bps, rev.delay_s, rev.loss, rev.queue_bytes, rev.name) == (1e6, fwd.delay_s, "none",
                                                                                None, "downlink")
    env = simpy.Environment()
    got = {"f": [], "r": []}
    links = duplex.build(env, np.random.default_rng(1), lambda p: got["f"].append(env.now),
                         lambda p: got["r"].append(env.now))
    links.forward.send(Pkt(1500))
    links.reverse.send(Pkt(100))
    env.run()
    assert got["r"] == [pytest.approx(0.04 + 800 / 1e6)]
    assert len(got["f"]) + links.forward.packets_lost == 1


def test_runs_on_the_realtime_environment():
    env = simpy.rt.RealtimeEnvironment(factor=0.01, strict=False)  # 1 simulated s = 10 ms of wall clock
    got = []
    link = Link(env, 1e6, delay=0.04, rng=np.random.default_rng(0), deliver=lambda p: got.append(env.now))
    for _ in range(3):
        link.send(Pkt(1250))
    env.run(until=1.0)
    assert got == [pytest.approx(0.05), pytest.approx(0.06), pytest.approx(0.07)]

"""Links built from elements: the old fused link's exact output, multi-hop paths, shared links, reordering."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import simpy

from miscnet.channel.elements import Port, Reorder, Wire
from miscnet.channel.errors import LinkConfigError
from miscnet.channel.link import DuplexConfig, Link, LinkConfig, PathConfig
from miscnet.channel.link import Path as LinkPath
from miscnet.channel.units import parse_reorder

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
if not TRACES.is_dir():  # a checkout whose shared/ sits inside it
    TRACES = Path(__file__).resolve().parents[1] / "shared" / "traces"
UP = TRACES / "ATT-LTE-driving-2016.up"


class Pkt:
    __slots__ = ("size", "seq")

    def __init__(self, size, seq=0):
        self.size = size
        self.seq = seq


def steps(env):
    """Run ``env`` to the end, counting the events it processes."""
    n = 0
    while env.peek() < math.inf:
        env.step()
        n += 1
    return n


# ---- a single link gives what the fused link gave ---------------------------------------------------------
def poisson_run(build, seed=11, n=4000):
    """Random sizes at Poisson times; (delivery order with exact times, send results, the link)."""
    env = simpy.Environment()
    out = []
    link = build(env, np.random.default_rng(seed), lambda p: out.append((p.seq, env.now.hex())))
    src = np.random.default_rng(seed + 1)
    gaps, sizes = src.exponential(0.004, n), src.integers(0, 1500, n)
    results = []

    def source():
        for seq in range(n):
            yield env.timeout(float(gaps[seq]))
            results.append(link.send(Pkt(int(sizes[seq]), seq)))

    env.process(source())
    env.run()
    return out, results, link


# What the fused Link (before it was rebuilt from elements) gave for these configurations: the first 16
# hex digits of sha256(json [delivery order and times, send results, link.stats()]) of poisson_run.
FUSED = {
    "gemodel-jitter-queue": (dict(rate="2mbit", delay="30ms", jitter="5ms", loss="gemodel 2% 30% 80% 0.5%",
                                  queue="8kb"), "07fccd84e4c22b3a"),
    "before-queue": (dict(rate="2mbit", delay="30ms", jitter="5ms", loss="random 10%", queue="8kb",
                          loss_before_queue=True), "2a58ddd0b82c4b35"),
    "bufferless": (dict(rate="1mbit", delay="10ms", queue="0"), "7830af22cd43bd59"),
    "trace": (dict(trace=UP, delay="20ms", jitter="3ms", loss="state 2% 40%", queue="30kb"), "96f8d402df6c9757"),
}


@pytest.mark.parametrize("name", sorted(FUSED))
def test_single_link_from_elements_is_the_fused_link(name):
    kwargs, expected = FUSED[name]
    if "trace" in kwargs and not UP.exists():
        pytest.skip("shared/traces not present")
    cfg = LinkConfig.from_strings(**kwargs)
    out, results, link = poisson_run(cfg.build)
    assert hashlib.sha256(json.dumps([out, results, link.stats()]).encode()).hexdigest()[:16] == expected
    s = link.stats()
    assert s["packets_sent"] == s["packets_delivered"] + s["packets_lost"] + s["packets_dropped_queue"]
    assert s["packets_dropped_queue"] > 0 and link.in_flight == 0
    # a one-link path is that link, draw for draw
    assert poisson_run(PathConfig((cfg,)).build)[:2] == (out, results)


def test_a_single_link_costs_one_event_per_delivery():
    env = simpy.Environment()
    times = []
    link = LinkConfig.from_strings(rate="1mbit", delay="20ms", jitter="2ms").build(
        env, np.random.default_rng(0), lambda p: times.append(env.now))
    for seq in range(500):
        link.send(Pkt(200 + seq % 7, seq))
    # packets the jitter clips onto the one ahead arrive with it and share its event
    assert steps(env) == len(set(times)) and len(times) == 500 and len(set(times)) > 300


# ---- two hops -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r1,r2", [(2e6, 1e6), (1e6, 5e6)], ids=["second-slower", "first-slower"])
def test_two_hop_path_is_two_serialisations_and_delays(r1, r2):
    d1, d2 = 0.0137, 0.031
    env = simpy.Environment()
    got = {}
    edge = Link(env, r1, delay=d1, rng=np.random.default_rng(1), name="edge")
    backhaul = Link(env, r2, delay=d2, rng=np.random.default_rng(2), name="backhaul")
    path = LinkPath(env, [edge, backhaul], lambda p: got.setdefault(p.seq, env.now))
    schedule = [(0.0, 1500), (0.0, 1500), (0.0, 40), (0.0051, 1000), (0.1, 576), (0.1003, 1500), (0.2, 1),
                (0.2, 1499), (0.2, 1500), (0.35, 9000), (0.35, 64), (0.4, 1500), (1.7, 1500)]
    sent_at = []

    def source():
        for seq, (t, size) in enumerate(schedule):
            if t > env.now:
                yield env.timeout(t - env.now)
            sent_at.append(env.now)
            assert path.send(Pkt(size, seq))

    env.process(source())
    events = steps(env)
    p1 = p2 = -math.inf
    for seq, ((_, size), now) in enumerate(zip(schedule, sent_at, strict=True)):
        p1 = max(p1, now) + 8 * size / r1  # netem's recursion on the first hop ...
        p2 = max(p2, p1 + d1) + 8 * size / r2  # ... and on the second, fed at the first one's arrivals
        assert got[seq] == p2 + d2, seq  # exact
    assert path.packets_delivered == len(schedule) and path.in_flight == 0
    assert edge.packets_delivered == backhaul.packets_sent == len(schedule)
    # no event between two private hops: the source's start, timeouts and end, then one per delivery
    assert events == 1 + len({t for t, _ in schedule if t > 0}) + len(set(got.values())) + 1


def test_path_config_builds_hops_with_their_own_streams_and_counts_drops_downstream():
    cfg = PathConfig((LinkConfig.from_strings(rate="10mbit", delay="5ms", loss="random 10%", name="edge"),
                      LinkConfig.from_strings(rate="1mbit", delay="20ms", queue="6000", name="cell"),
                      LinkConfig.from_strings(rate="100mbit", delay="2ms", loss="random 10%", name="backhaul")))
    assert cfg.capacity_bps() == 1e6 and cfg.delay_s == pytest.approx(0.027)
    assert cfg.describe()["links"] == "edge -> cell -> backhaul" and cfg.describe()["1:cell.queue"] == "6000b"
    env = simpy.Environment()
    got = []
    path = cfg.build(env, np.random.default_rng(3), got.append)
    for seq in range(400):
        assert path.send(Pkt(1000, seq))  # the edge queue is unlimited; drops happen further on
    env.run()
    edge, cell, backhaul = path.links
    assert cell.packets_dropped_queue > 0
    assert 0 < edge.packets_lost < 80 and 0 < backhaul.packets_lost < 80
    assert len(got) == path.packets_delivered == 400 - edge.packets_lost - cell.packets_dropped_queue - \
        backhaul.packets_lost
    assert [p.seq for p in got] == sorted(p.seq for p in got)


def test_links_join_paths_only_as_built():
    env = simpy.Environment()
    rng = np.random.default_rng(0)
    private = Link(env, 1e6, rng=rng)
    LinkPath(env, [private], lambda p: None)
    with pytest.raises(LinkConfigError, match="shared=True"):
        LinkPath(env, [private], lambda p: None)
    own = Link(env, 1e6, rng=rng, deliver=lambda p: None)
    with pytest.raises(LinkConfigError, match="without deliver"):
        LinkPath(env, [own], lambda p: None)
    with pytest.raises(LinkConfigError, match="through its Path"):
        private.send(Pkt(1))
    with pytest.raises(LinkConfigError, match="at least one"):
        LinkPath(env, [], lambda p: None)


# ---- one link, several flows --------------------------------------------------------------------------------
def test_shared_link_serves_two_flows_fifo_and_delivers_each_to_its_own():
    env = simpy.Environment()
    rate, d_cell = 1e6, 0.01
    cell = Link(env, rate, delay=d_cell, rng=np.random.default_rng(0), name="cell", shared=True)
    got = {"a": {}, "b": {}}
    flows = {}
    for name, edge_delay, edge_rate in (("a", 0.001, 8e6), ("b", 0.0013, 5e6)):
        edge = Link(env, edge_rate, delay=edge_delay, rng=np.random.default_rng(1), name=f"edge-{name}")
        flows[name] = (LinkPath(env, [edge, cell], lambda p, n=name: got[n].setdefault(p.seq, env.now)),
                       edge_rate, edge_delay)
    src = np.random.default_rng(5)
    plan = []  # (send time, flow, seq, size)
    for name in flows:
        t = 0.0
        for seq in range(300):
            t += float(src.exponential(0.006))
            plan.append((t, name, seq, int(src.integers(40, 1500))))
    plan.sort()

    def source():
        for t, name, seq, size in plan:
            if t > env.now:
                yield env.timeout(t - env.now)
            flows[name][0].send(Pkt(size, seq))

    env.process(source())
    env.run()
    # the closed form: each flow's edge on its own, then the cell's recursion in order of arrival at it
    at_cell = []
    for name, (_, edge_rate, edge_delay) in flows.items():
        prev = -math.inf
        for t, n, seq, size in plan:
            if n == name:
                prev = max(prev, t) + 8 * size / edge_rate
                at_cell.append((prev + edge_delay, name, seq, size))
    at_cell.sort()
    assert len({a[0] for a in at_cell}) == len(at_cell)  # no ties: the FIFO order is the time order
    prev, expected = -math.inf, {"a": {}, "b": {}}
    for t, name, seq, size in at_cell:
        prev = max(prev, t) + 8 * size / rate
        expected[name][seq] = prev + d_cell
    assert got == expected  # FIFO across flows, exact times, and each packet at its own flow's deliver
    assert cell.packets_sent == 600 and cell.packets_delivered == 600
    assert [len(e) for e in (got["a"], got["b"])] == [300, 300]


def test_two_saturating_flows_share_the_capacity():
    env = simpy.Environment()
    rate, size, seconds = 1e6, 1000, 60.0
    cell = LinkConfig.from_strings(rate="1mbit", delay="10ms", queue="20kb", name="cell").build(
        env, np.random.default_rng(0), shared=True)
    delivered = {"a": 0, "b": 0}
    window = seconds + 0.01 + 0.002  # what left the cell by `seconds`, after its and the edges' delays
    paths = {}
    for name, delay in (("a", "1ms"), ("b", "2ms")):
        edge = LinkConfig.from_strings(rate="100mbit", delay=delay, name=f"edge-{name}").build(
            env, np.random.default_rng(1))

        def deliver(p, n=name):
            if env.now <= window:
                delivered[n] += p.size
        paths[name] = LinkPath(env, [edge, cell], deliver)

    def sender(name, seed):
        src = np.random.default_rng(seed)
        while env.now < seconds:  # each offers 0.75 of the cell: together 1.5 times its capacity
            yield env.timeout(float(src.exponential(size * 8 / (0.75 * rate))))
            paths[name].send(Pkt(size))

    env.process(sender("a", 10))
    env.process(sender("b", 11))
    env.run()
    total = (delivered["a"] + delivered["b"]) * 8 / seconds
    assert total == pytest.approx(rate, rel=0.005)  # the cell never idles: combined = its capacity
    for name in delivered:
        assert delivered[name] * 8 / seconds == pytest.approx(rate / 2, rel=0.05)  # equal demand, equal share
    assert cell.packets_dropped_queue > 0
    assert paths["a"].in_flight == paths["b"].in_flight == 0


def test_senders_straight_into_a_shared_link_need_no_extra_event():
    env = simpy.Environment()
    cell = Link(env, 1e6, delay=0.01, rng=np.random.default_rng(0), shared=True)
    got = []
    a = LinkPath(env, [cell], lambda p: got.append(("a", p.seq)))
    b = LinkPath(env, [cell], lambda p: got.append(("b", p.seq)))
    for seq in range(50):
        a.send(Pkt(500, seq))
        b.send(Pkt(500, seq))
    assert steps(env) == 100  # one per delivery
    assert got == [(f, s) for s in range(50) for f in ("a", "b")]


# ---- reordering ---------------------------------------------------------------------------------------------
def reorder_run(reorder, seed=4, n=20000, loss="none", gap_s=0.001):
    env = simpy.Environment()
    order = []
    cfg = LinkConfig.from_strings(rate="100mbit", delay="50ms", loss=loss, reorder=reorder)
    link = cfg.build(env, np.random.default_rng(seed), lambda p: order.append(p.seq))

    def source():
        for seq in range(n):
            link.send(Pkt(1000, seq))
            yield env.timeout(gap_s)

    env.process(source())
    env.run()
    return order, link


def test_reorder_is_off_by_default():
    order, link = reorder_run("none", n=2000)
    assert order == list(range(2000)) and link.reorderer is None
    assert "reorder" not in LinkConfig.from_strings(rate="1mbit").describe()
    assert "packets_reordered" not in link.stats()


def test_reorder_picks_at_the_configured_rate_and_overtakes():
    order, link = reorder_run("25%")
    n = len(order)
    picked = link.packets_reordered
    assert abs(picked / n - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    # a picked packet skips the 50 ms delay: it overtakes the ~50 sent before it that are still on the wire
    position = {seq: k for k, seq in enumerate(order)}
    jumped = sum(1 for seq in range(n) if position[seq] < seq - 10)
    assert jumped == pytest.approx(picked, rel=0.02)
    assert sorted(order) == list(range(n)) and link.in_flight == 0
    assert LinkConfig.from_strings(rate="1mbit", delay="5ms", reorder="25%").describe()["reorder"] == "25% 0%"


def test_reorder_is_seeded_and_leaves_the_loss_draws_alone():
    a, _ = reorder_run("10% 30%", seed=9, n=3000, loss="random 5%")
    b, _ = reorder_run("10% 30%", seed=9, n=3000, loss="random 5%")
    c, _ = reorder_run("10% 30%", seed=10, n=3000, loss="random 5%")
    off, _ = reorder_run("none", seed=9, n=3000, loss="random 5%")
    assert a == b and a != c
    assert sorted(a) == off  # the same packets lost with reordering on or off
    assert a != off


def test_reorder_gap_and_correlation():
    order, link = reorder_run("100% gap 5", n=200)
    picked = [seq for seq in range(200) if order.index(seq) < seq]
    assert link.packets_reordered == 40 and picked[:3] == [4, 9, 14]  # every 5th
    model = Reorder(0.3, 0.6, rng=np.random.default_rng(1))
    picks = np.array([model.picks() for _ in range(100_000)], dtype=float)
    assert picks.mean() == pytest.approx(0.3, abs=0.01)
    assert np.corrcoef(picks[:-1], picks[1:])[0, 1] == pytest.approx(0.6, abs=0.02)


@pytest.mark.parametrize("spec,fragment", [("25% 10% 5%", "CORRELATION"), ("25% gap", "gap"),
                                           ("25% gap 0", "gap"), ("120%", "0..100"), ("x", "percentage")])
def test_reorder_spec_errors(spec, fragment):
    with pytest.raises(LinkConfigError, match=fragment):
        parse_reorder(spec)


def test_reorder_needs_a_delay_and_elements_check_their_parameters():
    with pytest.raises(LinkConfigError, match="needs a delay"):
        LinkConfig.from_strings(rate="1mbit", reorder="10%")
    with pytest.raises(LinkConfigError, match="gap"):
        Reorder(0.1, gap=0, rng=np.random.default_rng(0))
    with pytest.raises(LinkConfigError, match="rate"):
        Port(simpy.Environment(), -1.0)
    with pytest.raises(LinkConfigError, match="jitter"):
        Wire(0.01, -0.001)


def test_a_reordering_hop_before_another_feeds_it_in_time_order():
    env = simpy.Environment()
    got = []
    first = LinkConfig.from_strings(rate="100mbit", delay="30ms", reorder="20%", name="radio").build(
        env, np.random.default_rng(2))
    second = LinkConfig.from_strings(rate="50mbit", delay="5ms", name="core").build(env, np.random.default_rng(3))
    path = LinkPath(env, [first, second], lambda p: got.append((env.now, p.seq)))

    def source():
        for seq in range(2000):
            path.send(Pkt(1000, seq))
            yield env.timeout(0.001)

    env.process(source())
    env.run()
    times = [t for t, _ in got]
    assert times == sorted(times) and sorted(s for _, s in got) == list(range(2000))
    assert [s for _, s in got] != list(range(2000)) and first.packets_reordered > 0


def test_duplex_over_a_path_with_reordering_runs_the_transport():
    from miscnet.channel.transport import TransportConfig
    from miscnet.core.config import EncoderConfig
    from miscnet.core.image_io import load_image
    from miscnet.core.samples import sample_image_path, sample_sidecar_path
    from miscnet.core.semantics import load_semantics
    from miscnet.experiments.simulate import Scenario, SimImage, simulate
    from miscnet.sender.encoder import encode_image

    image = load_image(sample_image_path("astronaut"))
    sem, _ = load_semantics(sample_sidecar_path("astronaut"))
    item = SimImage("astronaut", encode_image(image, sem, EncoderConfig(budget_bytes=2000)).encoded, image)
    forward = PathConfig((LinkConfig.from_strings(rate="256kbit", delay="20ms", reorder="30%", name="edge"),
                          LinkConfig.from_strings(rate="64kbit", delay="20ms", loss="random 10%", name="cell")))
    link = DuplexConfig(forward)
    assert link.reverse.delay_s == pytest.approx(0.04)
    (r,) = simulate([item], Scenario(link=link, transport=TransportConfig(mode="arq", mtu=200), seed=3,
                                     quality=False))
    assert r["completed"] and r["bit_exact"]

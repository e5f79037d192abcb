"""Loss in time: the Gilbert-Elliott fade whose states last seconds, and outage files; closed forms, the
link, every place a link is configured (CLI, scenario, fleet) and the live relay."""

import math
import re
from dataclasses import dataclass

import numpy as np
import pytest
import simpy

from miscnet.channel.errors import LinkConfigError
from miscnet.channel.link import DuplexConfig, Link, LinkConfig, LinkSpec
from miscnet.channel.loss import Bernoulli, Outages, TimeGilbertElliott
from miscnet.channel.trace import Trace
from miscnet.channel.units import parse_loss
from miscnet.cli.main import main


@dataclass
class Pkt:
    seq: int
    size: int = 100


def run_link(link_kwargs, send_times, size=100, seed=0, config=None):
    """Send one packet at each time; returns (link, delivered seqs)."""
    env = simpy.Environment()
    got = []
    rng = np.random.default_rng(seed)
    if config is not None:
        link = config.build(env, rng, deliver=lambda p: got.append(p.seq))
    else:
        link = Link(env, rng=rng, deliver=lambda p: got.append(p.seq), **link_kwargs)

    def sender():
        for k, t in enumerate(send_times):
            if t > env.now:
                yield env.timeout(t - env.now)
            link.send(Pkt(k, size))

    env.process(sender())
    env.run()
    return link, set(got)


def in_any(t, intervals):
    return any(s <= t < e for s, e in intervals)


# ---- the fade: closed forms ---------------------------------------------------------------------------------
def bad_fraction_and_durations(model, seed, horizon):
    bad_time, bad, good = 0.0, [], []
    for start, end, is_bad in model.segments(np.random.default_rng(seed)):
        if start >= horizon:
            break
        (bad if is_bad else good).append(end - start)
        if is_bad:
            bad_time += min(end, horizon) - start
    return bad_time / horizon, np.array(good), np.array(bad)


def test_fade_long_run_fraction_in_bad_is_bad_over_good_plus_bad():
    model = parse_loss("fade 20s 2s")
    assert isinstance(model, TimeGilbertElliott)
    horizon = 1e6  # about 45 000 good/bad cycles
    fraction, good, bad = bad_fraction_and_durations(model, seed=11, horizon=horizon)
    expected = 2 / 22
    assert model.fraction_bad() == pytest.approx(expected)
    assert model.mean_loss() == pytest.approx(expected)
    # delta method for the ratio of renewal sums: var per cycle of (1-f) B - f G, exponential variances
    cycles = len(bad)
    stderr = math.sqrt(((1 - expected) ** 2 * 2**2 + expected**2 * 20**2) / cycles) / 22
    assert abs(fraction - expected) < 4 * stderr
    assert abs(fraction - expected) / expected < 0.03  # within a few per cent, as the issue asks


def test_fade_mean_durations_are_the_given_means():
    model = parse_loss("fade 500ms 100ms")
    _, good, bad = bad_fraction_and_durations(model, seed=5, horizon=6000.0)  # about 10 000 cycles
    assert abs(bad.mean() - 0.1) < 4 * 0.1 / math.sqrt(len(bad))
    assert abs(good.mean() - 0.5) < 4 * 0.5 / math.sqrt(len(good))


def test_fade_starts_in_its_stationary_law():
    # time 0 is in a fade with probability bad / (good + bad), so a short transfer at time 0 meets fades
    model = parse_loss("fade 18s 2s")
    n = 4000
    first_bad = sum(next(model.segments(np.random.default_rng(seed)))[2] for seed in range(n))
    assert abs(first_bad / n - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)


def test_fade_partial_losses_in_each_state():
    model = parse_loss("fade 1s 1s 10% 60%")
    assert model.mean_loss() == pytest.approx(0.35)
    rng = np.random.default_rng(2)
    times = np.arange(0, 20000, 0.05)
    lost = np.fromiter((model.lost_at(t, rng) for t in times), dtype=bool, count=len(times))
    states = model.schedule(times[-1] + 1)
    bad = np.array([s[2] for s in states])
    edges = np.array([s[0] for s in states])
    in_bad = bad[np.searchsorted(edges, times, side="right") - 1]
    for mask, p in ((in_bad, 0.6), (~in_bad, 0.1)):
        n = mask.sum()
        assert abs(lost[mask].mean() - p) < 4 * math.sqrt(p * (1 - p) / n)


# ---- the fade on a link -------------------------------------------------------------------------------------
@pytest.mark.parametrize("pace", [0.5, 0.01])
def test_fade_drops_every_packet_sent_in_bad_and_none_in_good_whatever_the_pace(pace):
    times = np.arange(0, 600, pace).tolist()
    link, got = run_link(dict(rate=1e9, loss=parse_loss("fade 20s 3s"), loss_before_queue=True), times, seed=4)
    states = link.loss.schedule(600)
    bad = [(s, e) for s, e, b in states if b]
    assert bad, "600 s of 20 s / 3 s fades has fades"
    expected_lost = {k for k, t in enumerate(times) if in_any(t, bad)}
    assert set(range(len(times))) - got == expected_lost
    assert link.packets_lost == len(expected_lost)


def test_fade_schedule_depends_on_the_seed_not_on_the_traffic():
    slow, _ = run_link(dict(rate=1e9, loss=parse_loss("fade 5s 1s")), np.arange(0, 300, 0.7).tolist(), seed=9)
    fast, _ = run_link(dict(rate=1e9, loss=parse_loss("fade 5s 1s")), np.arange(0, 300, 0.003).tolist(), seed=9)
    other, _ = run_link(dict(rate=1e9, loss=parse_loss("fade 5s 1s")), np.arange(0, 300, 0.7).tolist(), seed=10)
    assert slow.loss.schedule(300) == fast.loss.schedule(300)
    assert slow.loss.schedule(300) != other.loss.schedule(300)


def test_fade_is_deterministic_with_a_seed():
    times = np.arange(0, 200, 0.01).tolist()
    kw = dict(rate=1e9, loss=None)
    runs = [run_link({**kw, "loss": parse_loss("fade 2s 500ms 1% 90%")}, times, seed=s)[1] for s in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_fade_loss_rate_of_a_steady_sender_is_the_time_fraction():
    # saturate drives the link at its rate, so packets sample time uniformly
    from miscnet.channel.link import saturate

    config = LinkConfig.from_strings(rate="1mbit", loss="fade 1s 250ms")
    rates = [saturate(config, 400.0, seed)["loss_rate"] for seed in range(4)]
    assert abs(np.mean(rates) - 0.2) < 0.02  # 4 x 320 cycles: the stderr of the mean is about 0.004


# ---- outages --------------------------------------------------------------------------------------------------
OUTAGE_TEXT = """\
# two fades, a gap between them
1.0 1.5
2.25 4   # a longer one
"""


def test_outage_file_parses_and_reports():
    out = Outages.parse(OUTAGE_TEXT, "fades.txt")
    assert out.starts == (1.0, 2.25) and out.ends == (1.5, 4.0) and out.period_s is None
    assert out.total_s() == pytest.approx(2.25)
    assert out.mean_duration_s() == pytest.approx(1.125)
    assert Outages.parse(out.to_text()).starts == out.starts
    assert [out.down_at(t) for t in (0.99, 1.0, 1.49, 1.5, 2.25, 3.99, 4.0, 1000.0)] == [
        False, True, True, False, True, True, False, False]


@pytest.mark.parametrize("loss_before_queue", [True, False])
def test_packets_in_an_outage_are_all_lost_and_no_others(tmp_path, loss_before_queue):
    path = tmp_path / "fades.txt"
    path.write_text(OUTAGE_TEXT)
    rate = 1e6  # a 100-byte packet takes 0.8 ms, so an idle link's departure is the send time + 0.8 ms
    config = LinkConfig.from_strings(rate="1mbit", outage=str(path), loss_before_queue=loss_before_queue)
    times = np.arange(0, 6, 0.01).tolist()
    link, got = run_link({}, times, config=config)
    when = [t if loss_before_queue else t + 800 / rate for t in times]
    intervals = [(1.0, 1.5), (2.25, 4.0)]
    expected_lost = {k for k, t in enumerate(when) if in_any(t, intervals)}
    assert len(expected_lost) == pytest.approx(225, abs=2)
    assert set(range(len(times))) - got == expected_lost
    assert link.packets_lost == link.packets_lost_outage == len(expected_lost)
    assert link.stats()["packets_lost_outage"] == len(expected_lost)
    assert config.describe()["outage"] == "fades.txt"


def test_an_outage_loses_what_the_queue_sends_into_it():
    # a radio link: the queue drains at its rate through the outage and what leaves then is lost, not held
    out = Outages([(1.0, 1.5)])
    times = [0.0] * 20  # 20 x 1000 bytes at 64 kbit/s: departures at 0.125 s, 0.25 s, ... 2.5 s
    link, got = run_link(dict(rate=64000.0, outages=out), times, size=1000)
    assert set(range(20)) - got == {7, 8, 9, 10}  # departures at 1.0, 1.125, 1.25, 1.375 s


def test_an_outage_on_a_shared_link_takes_every_flow(tmp_path):
    from miscnet.channel.link import Path as LinkPath

    env = simpy.Environment()
    rng = np.random.default_rng(0)
    cell = LinkConfig(rate_bps=1e7, outages=Outages([(1.0, 2.0)]), name="cell").build(env, rng, shared=True)
    got = {0: [], 1: []}
    paths = []
    for flow in (0, 1):
        access = LinkConfig(rate_bps=1e8, delay_s=0.001 * (flow + 1), name=f"a{flow}").build(env, rng)
        paths.append(LinkPath(env, [access, cell], lambda p, f=flow: got[f].append(p.seq)))

    def sender():
        for k in range(300):
            for path in paths:
                path.send(Pkt(k))
            yield env.timeout(0.01)

    env.process(sender())
    env.run()
    for flow in (0, 1):  # a packet leaves the cell 8 us + 1 or 2 ms + 80 us after it is sent (no contention)
        when = [k * 0.01 + 8e-6 + 0.001 * (flow + 1) + 8e-5 for k in range(300)]
        expected = {k for k, t in enumerate(when) if 1.0 <= t < 2.0}
        assert len(expected) == 100
        assert set(range(300)) - set(got[flow]) == expected
    assert cell.packets_lost_outage == 200


def test_outages_keep_the_per_packet_model_pattern():
    """The loss model is asked for every packet, so an outage file adds losses and changes no other."""
    times = np.arange(0, 10, 0.005).tolist()
    plain, got_plain = run_link(dict(rate=1e9, loss=Bernoulli(0.1)), times, seed=8)
    out = Outages([(2.0, 3.0), (6.0, 6.5)])
    both, got_both = run_link(dict(rate=1e9, loss=Bernoulli(0.1), outages=out), times, seed=8)
    outside = {k for k, t in enumerate(times) if not in_any(t + 1e-9 * 800, [(2.0, 3.0), (6.0, 6.5)])}
    assert got_both == got_plain & outside
    assert both.packets_lost_outage == len(times) - len(outside)


def test_a_period_repeats_the_schedule_and_without_one_the_link_comes_back():
    periodic = Outages.parse("period 10\n1 4\n")
    once = Outages.parse("1 4\n")
    for k in range(5):
        assert periodic.down_at(10 * k + 2) and not periodic.down_at(10 * k + 5)
    assert once.down_at(2) and not once.down_at(12)
    assert periodic.fraction_down() == pytest.approx(0.3)


def test_offsets_shift_the_schedule_and_wrap_around_the_period(tmp_path):
    path = tmp_path / "o.txt"
    path.write_text("period 10\n1 4\n")
    config = LinkConfig.from_strings(rate="1mbit", outage=str(path), trace_offset="13s")
    assert config.trace_offset_s == pytest.approx(3.0)  # modulo the file's period
    assert config.offset_period_s() == 10.0
    link = config.build(simpy.Environment(), np.random.default_rng(0), deliver=lambda p: None)
    # link time t is file time t + 3: down for t in [0, 1) and [8, 11), ...
    assert [link.outages.down_at(t) for t in (0.0, 0.99, 1.0, 7.99, 8.0, 10.99, 11.0)] == [
        True, True, False, False, True, True, False]
    # without a period the offset is not wrapped
    once = LinkConfig(rate_bps=1e6, outages=Outages([(1.0, 4.0)]), trace_offset_s=13.0)
    assert once.trace_offset_s == 13.0 and once.offset_period_s() is None
    assert not once.build(simpy.Environment(), np.random.default_rng(0)).outages.down_at(0.0)


def test_a_trace_offset_moves_a_trace_and_its_outages_together(tmp_path):
    trace = Trace([0, 10, 20, 3000, 3010, 6000])  # a gap of 2.98 s at 20 ms
    outages = Outages.from_trace(trace, 1.0)
    assert outages.starts == (0.02, 3.01) and outages.ends == (3.0, 6.0) and outages.period_s == 6.0
    config = LinkConfig(trace=trace, outages=outages, trace_offset_s=1.0)
    link = config.build(simpy.Environment(), np.random.default_rng(0))
    # file times 1.0 (in the first gap), 3.005 (between the two opportunities at 3 s) and 3.5 (the second gap)
    assert [link.outages.down_at(t) for t in (0.0, 2.005, 2.5)] == [True, False, True]
    assert link.trace.time_of(0) == pytest.approx(2.0)  # the trace's first opportunity after 1.0 s is at 3 s


def test_miscnet_outages_prints_a_file_of_a_traces_gaps(tmp_path, capsys):
    path = tmp_path / "t.trace"
    path.write_text("\n".join(str(ms) for ms in [5, 6, 1500, 1501, 1502, 4000]) + "\n")
    assert main(["outages", str(path), "--min-gap", "1s"]) == 0
    text = capsys.readouterr().out
    parsed = Outages.parse(text)
    assert parsed.starts == (0.006, 1.502) and parsed.ends == (1.5, 4.0) and parsed.period_s == 4.0
    assert main(["outages", str(path), "--min-gap", "2s"]) == 0
    assert Outages.parse(capsys.readouterr().out).starts == (1.502,)


# ---- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, words", [
    ("fadex 20s 2s", "unknown loss model 'fadex'"),
    ("fade 20s", "two mean durations"),
    ("fade 20s 2s 5%", "two mean durations"),
    ("fade 0s 2s", "good duration '0s' must be a positive"),
    ("fade 20s -2s", "bad duration '-2s' must be a positive"),
    ("fade 20 2", "needs a unit"),
    ("fade 20s 2s 0% 101%", "within 0..100"),
])
def test_bad_fade_specs_are_one_line_errors(spec, words):
    with pytest.raises(LinkConfigError, match=words) as info:
        parse_loss(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, words", [
    ("1 2\n0.5 3\n", "f.txt:2: outage at 0.5 s goes backwards"),
    ("1 3\n2 4\n", "f.txt:2: outage 2 4 overlaps the previous one"),
    ("1 1\n", "f.txt:1: outage 1 1 lasts 0 s"),
    ("2 1\n", "f.txt:1: outage 2 1 lasts -1 s"),
    ("-1 2\n", "f.txt:1: start '-1' must be a finite number"),
    ("1s 2s\n", "f.txt:1: start '1s' is not a number of seconds"),
    ("1 2 3\n", "f.txt:1: expected 'START END'"),
    ("period 0\n", "f.txt:1: period 0.0 must be a positive"),
    ("period 5\nperiod 6\n", "f.txt:2: the period is given twice"),
    ("period 5\n1 6\n", "f.txt:1: the last outage ends at 6 s, after the period"),
    ("inf 2\n", "f.txt:1: start 'inf' must be a finite"),
])
def test_bad_outage_files_are_one_line_errors_naming_the_line(text, words):
    with pytest.raises(LinkConfigError, match=words) as info:
        Outages.parse(text, "f.txt")
    assert "\n" not in str(info.value)


def test_unreadable_outage_files(tmp_path):
    with pytest.raises(LinkConfigError, match="missing.txt: outage file not found"):
        Outages.load(tmp_path / "missing.txt")
    with pytest.raises(LinkConfigError, match="cannot read outage file"):
        Outages.load(tmp_path)  # a directory
    (tmp_path / "bin").write_bytes(b"\xff\xfe1 2\n")
    with pytest.raises(LinkConfigError, match="bin: cannot read outage file"):
        Outages.load(tmp_path / "bin")


def test_the_cli_reports_a_bad_outage_file_in_one_line(tmp_path, capsys):
    path = tmp_path / "o.txt"
    path.write_text("3 4\n1 2\n")
    assert main(["link", "--outage", str(path), "--saturate", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"miscnet: {path}:2: outage at 1 s goes backwards (the previous one starts at 3 s); list " \
                  "outages in time order"
    assert main(["link", "--loss", "fade 0s 1s", "--saturate", "1"]) == 2
    assert "fade's mean good duration" in capsys.readouterr().err


def test_the_cli_link_command_measures_an_outage(tmp_path, capsys):
    path = tmp_path / "o.txt"
    path.write_text("period 10\n2 5\n")
    assert main(["link", "--rate", "1mbit", "--outage", str(path), "--saturate", "100", "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["loss_rate"] == pytest.approx(0.3, abs=0.002)


# ---- scenarios and fleets -----------------------------------------------------------------------------------
def test_a_scenario_takes_an_outage_file_relative_to_itself(tmp_path):
    from miscnet.experiments.scenario import ScenarioError, load_scenario

    (tmp_path / "fades.txt").write_text("period 30\n5 8\n")
    (tmp_path / "s.toml").write_text('name = "s"\n[images]\nsamples = ["astronaut"]\n[link]\nrate = "64kbit"\n'
                                     'outage = "fades.txt"\nloss = "fade 20s 2s"\n')
    scenario = load_scenario(tmp_path / "s.toml")
    (config,) = scenario.configs
    duplex = config.link_config()
    assert duplex.forward.outages.starts == (5.0,)
    assert duplex.forward.loss == "fade 20s 2s 0% 100%"
    (tmp_path / "bad.toml").write_text('name = "s"\n[images]\nsamples = ["astronaut"]\n[link]\n'
                                       'outage = "nothere.txt"\n')
    with pytest.raises(ScenarioError, match="bad.toml: link: .*nothere.txt: outage file not found"):
        load_scenario(tmp_path / "bad.toml")


FLEET = """
name = "fades"
duration = "5s"
seed = 3
[encoder]
budget = 1200
[[group]]
name = "cams"
count = 6
images = ["astronaut"]
arrival = "every 100s"
start = "0s"
access = {{ rate = "64kbit", delay = "20ms", outage = "o.txt"{offset} }}
path = []
protection = {{ mode = "arq" }}
[receiver]
workers = 1
profile = "classical-cpu"
[report]
deadlines = ["2s", "15s"]
"""


@pytest.fixture(scope="module")
def fleet_images():
    from miscnet.experiments.fleet import prepare_images

    return prepare_images({"astronaut"}, 1200)


def test_fleet_senders_on_one_outage_file_with_random_offsets_do_not_fade_together(tmp_path, fleet_images):
    from miscnet.experiments.fleet import load_fleet, run_fleet

    (tmp_path / "o.txt").write_text("period 20\n0 10\n")  # down for the first half of every 20 s
    results = {}
    for label, offset in (("lockstep", ""), ("random", ', trace_offset = "random"')):
        path = tmp_path / f"{label}.toml"
        path.write_text(FLEET.format(offset=offset))
        spec = load_fleet(path)
        assert spec.groups[0].access.outages.period_s == 20.0
        results[label] = [row["first_picture_s"] for row in run_fleet(spec, fleet_images)["rows"]]
    assert all(t is not None and t >= 10.0 for t in results["lockstep"])  # all wait out the same outage
    random = results["random"]
    assert all(t is not None for t in random)
    assert min(random) < 1.0 < max(random)  # some start in the up half, some in a fade (seed 3 draws both)


def test_fleet_shared_links_take_outage_files_and_name_bad_ones(tmp_path):
    from miscnet.experiments.fleet import FleetError, load_fleet

    (tmp_path / "o.txt").write_text("period 60\n10 12\n")
    shared = '[[link]]\nname = "cell"\nrate = "2mbit"\noutage = "{}"\n'
    text = FLEET.format(offset="").replace("path = []", 'path = ["cell"]')
    (tmp_path / "f.toml").write_text(text + shared.format("o.txt"))
    spec = load_fleet(tmp_path / "f.toml")
    assert spec.links["cell"].outages.starts == (10.0,)
    (tmp_path / "bad.txt").write_text("10 12\n11 13\n")
    (tmp_path / "g.toml").write_text(text + shared.format("bad.txt"))
    with pytest.raises(FleetError, match=r"g.toml: link.cell: .*bad.txt:2: outage 11 13 overlaps"):
        load_fleet(tmp_path / "g.toml")


# ---- the live relay -----------------------------------------------------------------------------------------
def test_live_relay_applies_an_outage_file(tmp_path, fleet_images):
    """The relay's link is the simulator's, outages included; an outage over the relay's whole run keeps the
    check to counters (which packets fall where in a shorter one would depend on the machine's speed)."""
    from live_nodes import Receiver, wait_for

    from miscnet.channel.relay import RelayOptions, serve_relay
    from miscnet.channel.transport import TransportConfig
    from miscnet.sender.node import SenderOptions, send_images

    path = tmp_path / "o.txt"
    path.write_text("# the radio is down for the relay's first day\n0 86400\n")
    link = LinkSpec(rate="64kbit", delay="10ms", outage=str(path)).build()
    assert isinstance(link, DuplexConfig) and link.forward.outages is not None
    rx = Receiver(tmp_path)
    server, node, port = serve_relay(RelayOptions(listen="127.0.0.1:0", forward=rx.target, link=link, seed=1))
    try:
        images = [("astronaut", fleet_images["astronaut"].encoded)]
        (result,) = send_images(images, SenderOptions(target=f"127.0.0.1:{port}",
                                                      transport=TransportConfig(mode="none"), linger_s=0.2))
        sent = lambda: node.link_total("forward", "packets_sent")  # noqa: E731
        assert wait_for(lambda: sent() > 0 and node.link_total("forward", "packets_lost") == sent())
    finally:
        server.stop(grace=1).wait()
        node.close()
        rx.stop()
    assert not result.complete
    assert node.link_total("forward", "packets_lost_outage") == sent() > 0
    assert node.link_total("forward", "packets_delivered") == 0
    assert node.link_total("reverse", "packets_lost_outage") == 0  # the file is the forward link's
    assert not any(e.get("digest") for e in rx.events())


def test_live_relay_starts_each_stream_where_it_asks_in_the_outage_file(tmp_path, fleet_images):
    """With --stream-offsets a stream's access link starts where the sender asks (sender --trace-offset), so
    live senders on one file fade at different times: down for the first day, up for the second."""
    from live_nodes import Receiver, wait_for

    from miscnet.channel.relay import RelayOptions, serve_relay
    from miscnet.channel.transport import TransportConfig
    from miscnet.sender.node import SenderOptions, send_images

    path = tmp_path / "o.txt"
    path.write_text("period 172800\n0 86400\n")
    link = LinkSpec(rate="256kbit", delay="10ms", outage=str(path)).build()
    rx = Receiver(tmp_path)
    server, node, port = serve_relay(RelayOptions(listen="127.0.0.1:0", forward=rx.target, link=link, seed=1,
                                                  stream_offsets=True))
    images = [("astronaut", fleet_images["astronaut"].encoded)]
    options = dict(target=f"127.0.0.1:{port}", transport=TransportConfig(mode="none"), linger_s=0.2)
    try:
        (up,) = send_images(images, SenderOptions(**options, trace_offset_s=86400.0))
        sent = lambda: node.link_total("forward", "packets_sent")  # noqa: E731
        assert wait_for(lambda: node.link_total("forward", "packets_delivered") == sent() > 0)
        assert node.link_total("forward", "packets_lost_outage") == 0
        first = sent()
        (down,) = send_images(images, SenderOptions(**options))  # no offset: the relay's, in the outage
        assert wait_for(lambda: node.link_total("forward", "packets_lost_outage") == sent() - first > 0)
    finally:
        server.stop(grace=1).wait()
        node.close()
        rx.stop()
    assert up.complete and not down.complete


@pytest.mark.parametrize("allowed, value, message", [
    (False, "1000", "FAILED_PRECONDITION.*does not take per-stream trace offsets"),
    (True, "-5", "INVALID_ARGUMENT.*one whole number of milliseconds"),
    (True, "1e3", "INVALID_ARGUMENT.*one whole number of milliseconds"),
])
def test_relay_refuses_stream_offsets_it_cannot_honour(tmp_path, allowed, value, message):
    import grpc
    from live_nodes import Receiver

    from miscnet.channel.grpc_util import STREAM_OFFSET_KEY
    from miscnet.channel.relay import RelayOptions, serve_relay
    from miscnet.v1 import services_pb2 as spb
    from miscnet.v1 import services_pb2_grpc as sgrpc

    (tmp_path / "o.txt").write_text("period 10\n0 1\n")
    link = LinkSpec(rate="64kbit", outage=str(tmp_path / "o.txt")).build()
    rx = Receiver(tmp_path)
    server, node, port = serve_relay(RelayOptions(listen="127.0.0.1:0", forward=rx.target, link=link,
                                                  stream_offsets=allowed))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = sgrpc.LinkStub(channel).Exchange(iter([spb.LinkMessage()]), metadata=[(STREAM_OFFSET_KEY, value)])
            with pytest.raises(grpc.RpcError) as refused:
                list(call)
        assert re.search(message, f"{refused.value.code().name} {refused.value.details()}")
    finally:
        server.stop(grace=1).wait()
        node.close()
        rx.stop()

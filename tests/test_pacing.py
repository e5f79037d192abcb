"""Pacing (channel/pacing.py): the pacer against closed forms, senders sharing a bottleneck, fleets, live."""

import threading

import pytest
from live_nodes import Receiver, encoded_samples

from miscnet.channel.link import DuplexConfig, LinkConfig
from miscnet.channel.pacing import PROBE_TOKEN, Pacer, PacingConfig, PacingError, pacing_config
from miscnet.channel.packet import POLL, Datagram, Packet, decode_packet
from miscnet.channel.relay import RelayOptions, serve_relay
from miscnet.channel.transport import TransportConfig, TransportReceiver
from miscnet.experiments.bench_pacing import bench_image, jain, run_bottleneck
from miscnet.experiments.fleet import FleetError, parse_fleet
from miscnet.sender.node import SenderOptions, send_images

PACKET = 1212


def data(n, size=PACKET, image_id=1):
    return [Datagram(Packet(0, image_id, 0, s, n, bytes(size - 12)).encode(), "source", image_id) for s in range(n)]


@pytest.fixture(scope="module")
def image():
    return bench_image()


# ---- the pacer on its own ---------------------------------------------------------------------------------

def test_bad_settings_are_one_line_errors():
    with pytest.raises(PacingError, match="pacing 'bbr' unknown"):
        pacing_config("bbr")
    with pytest.raises(PacingError, match="target_delay_s"):
        PacingConfig(target_delay_s=0)
    assert pacing_config("off") is None and pacing_config("aimd").mode == "aimd"
    raw = {"group": [{"name": "cams", "images": ["astronaut"], "pacing": "fast"}]}
    with pytest.raises(FleetError, match=r"group\.cams\.pacing: pacing 'fast' unknown"):
        parse_fleet(raw, "f.toml", None)


def test_releases_at_the_rate_after_the_initial_burst():
    pacer = Pacer(PacingConfig(initial_rate_bps=PACKET * 8 * 10, initial_burst=4, probe_bytes=10**6))
    pacer.push(data(10), 0.0)
    assert len(pacer.release(0.0)) == 5  # the initial burst ahead of the schedule, the schedule's first
    times = []
    while pacer.queue:
        t = pacer.next_release_at()
        times += [t for d in pacer.release(t) if d.role == "source"]  # (and a probe behind the last)
    assert times == pytest.approx([0.1 * k for k in range(1, 6)])  # then one packet per 1/10 s
    assert pacer.backlog_bytes == 0 and pacer.stats.bytes == 10 * PACKET + 12  # the probe's 12 bytes


def test_probe_is_answered_by_a_real_receiver_and_times_the_path():
    pacer, receiver = Pacer(), TransportReceiver()
    pacer.push(data(3), 0.0)
    out = pacer.release(0.0)
    polls = [decode_packet(d.data) for d in out if d.role == "poll"]
    # after probe_bytes of data, and behind the tail: token 0, an image id the stream does not use
    assert [p.symbol for p in polls] == [PROBE_TOKEN, PROBE_TOKEN]
    assert all(p.kind == POLL and p.image_id >= 0xF000 for p in polls)
    answers = [fb for d in out if d.role == "poll" for fb in receiver.on_datagram(d.data).feedback]
    assert receiver.images == {}  # a probe makes no state at the receiver
    assert [pacer.on_feedback(fb, 0.08) for fb in answers] == [True, True]
    assert pacer.min_rtt == pytest.approx(0.08) and pacer.stats.rtt_samples == 2


def test_the_queueing_delay_decreases_the_rate_and_headroom_increases_it():
    """A backlogged pacer whose POLLs a real receiver answers after a given RTT, in virtual time."""
    pacer = Pacer(PacingConfig(initial_rate_bps=PACKET * 8 * 40, probe_bytes=2 * PACKET))
    pacer.state = "steady"
    receiver, answers, t = TransportReceiver(), [], 0.0

    def run_until(end, rtt):
        nonlocal t
        while t < end:
            if len(pacer.queue) < 20:
                pacer.push(data(20), t)
            due = max(t, pacer.next_release_at())  # -inf: something may leave now
            t = min(due, answers[0][0] if answers else end)
            while answers and answers[0][0] <= t:
                pacer.on_feedback(answers.pop(0)[1], t)
            for d in pacer.release(t):
                answers.extend((t + rtt, fb) for fb in receiver.on_datagram(d.data).feedback)

    run_until(1.0, 0.05)
    before = pacer.rate
    run_until(2.0, 0.05)
    assert pacer.rate > before and pacer.stats.decreases == 0  # no queueing: additive increase
    high = pacer.rate
    run_until(2.5, 0.05 + 0.1)  # 100 ms of queueing, four times the target
    assert pacer.rate < high and pacer.stats.decreases >= 1


# ---- senders on one bottleneck (real transport senders, real link elements) ---------------------------------

def test_two_paced_senders_converge_to_half_the_bottleneck_each(image):
    rate = 8e6
    row = run_bottleneck(2, paced=True, rate_bps=rate, duration_s=40, warmup_s=20, image=image)
    (shares,) = row["shares"]  # bytes/s of each over the last 20 s
    for share in shares:  # whole images of 12 kB each: a 20 s window ends mid-image, so about 10 % either way
        assert share * 8 == pytest.approx(rate / 2, rel=0.12)
    assert row["utilization"] >= 0.95 and row["jain"] >= 0.99 and row["dropped_queue"] == 0


def test_pacing_bounds_the_queueing_delay_that_unpaced_senders_fill(image):
    kw = dict(rate_bps=8e6, duration_s=12, image=image)
    paced, unpaced = run_bottleneck(8, paced=True, **kw), run_bottleneck(8, paced=False, **kw)
    assert paced["queue_p95_s"] < 0.1 and paced["dropped_queue"] == 0 and paced["utilization"] >= 0.9
    assert unpaced["queue_p95_s"] > 0.1 and unpaced["dropped_queue"] > 0  # the drop-tail queue full
    assert paced["jain"] >= 0.95


def test_a_rate_change_in_the_bottleneck_is_followed(image):
    row = run_bottleneck(2, paced=True, rate_bps=8e6, duration_s=40, warmup_s=10, image=image,
                         rate_changes=((20.0, 4e6),))
    before, after = row["shares"]
    assert sum(before) * 8 >= 0.9 * 8e6
    assert 0.9 * 4e6 <= sum(after) * 8 <= 4e6 * 1.001  # the halved link kept full ...
    assert all(s * 8 == pytest.approx(2e6, rel=0.12) for s in after)  # ... and shared
    assert row["queue_p95_s"] < 0.1 and row["dropped_queue"] == 0  # its queue stayed short


def test_same_seed_same_run(image):
    kw = dict(paced=True, rate_bps=8e6, duration_s=8, image=image, seed=5)
    assert run_bottleneck(3, **kw) == run_bottleneck(3, **kw)


def test_jain_index():
    assert jain([1, 1, 1]) == 1.0 and jain([1, 0, 0, 0]) == pytest.approx(0.25)


# ---- live: paced senders through the relay's shared bottleneck ----------------------------------------------

def test_live_paced_senders_leave_the_shared_queue_without_drops(tmp_path):
    """Three streams through one small FIFO bottleneck at the relay: unpaced, their images overflow its
    queue; paced, nothing is dropped and every image arrives (counters, no clock)."""
    images = encoded_samples(("astronaut", "coffee"), 12000)

    def run(pacing, out):
        receiver = Receiver(out)
        shared = LinkConfig.from_strings(rate="512kbit", delay="5ms", queue="24000", name="shared")
        server, node, port = serve_relay(RelayOptions(
            listen="127.0.0.1:0", forward=receiver.target, shared=shared,
            link=DuplexConfig(LinkConfig.from_strings(rate="4mbit", delay="10ms"))))
        results, errors = [], []

        def sender(i):
            try:
                results.extend(send_images([(f"{n}-{i}", e) for n, e in images], SenderOptions(
                    target=f"127.0.0.1:{port}", transport=TransportConfig("arq"), pacing=pacing)))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=sender, args=(i,)) for i in range(3)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            drops = node.counters.value("shared_packets_dropped_queue")
        finally:
            server.stop(grace=1).wait()
            node.close()
            receiver.stop()
        # delivered under arq: the receiver confirmed each image stored
        assert not errors and len(results) == 6 and all(r.delivered and r.complete for r in results)
        return drops

    assert run(None, tmp_path / "unpaced") > 0
    # a start below the 170 kbit/s share (the default 1 Mbit/s would overshoot this small queue for a
    # round trip before the first answers came back)
    assert run(PacingConfig(initial_rate_bps=128e3, initial_burst=2), tmp_path / "paced") == 0


# ---- fleets: the group key, and a fleet sharing one FIFO cell --------------------------------------------------

FLEET = """
name = "paced"
duration = "12s"
seed = 2
[encoder]
budget = 6000
[[group]]
name = "cams"
count = 8
images = ["astronaut", "coffee"]
arrival = "every 0.25s"
start = "random"
access = {{ rate = "4mbit", delay = "10ms" }}
path = ["cell"]
protection = {{ mode = "arq" }}
{pacing}
[[link]]
name = "cell"
rate = "1mbit"
delay = "10ms"
queue = "30000"
[receiver]
workers = 4
profile = "classical-cpu"
"""


def test_fleet_senders_pace_by_default_and_keep_the_shared_queue(tmp_path):
    """Eight cameras offering about 1.4 Mbit/s to a 1 Mbit/s FIFO cell: unpaced, their images overflow its
    30 kB queue; paced (the default), the backlog waits at the cameras and the cell drops far less."""
    from miscnet.experiments.fleet import load_fleet, prepare_images, run_fleet

    images = prepare_images({"astronaut", "coffee"}, 6000)
    results = {}
    for name, line in (("default", ""), ("off", 'pacing = "off"')):
        path = tmp_path / f"{name}.toml"
        path.write_text(FLEET.format(pacing=line))
        spec = load_fleet(path)
        assert (spec.groups[0].pacing is None) == (name == "off")
        results[name] = run_fleet(spec, images, drain_s=20)
    paced, unpaced = (results[k]["links"]["cell"] for k in ("default", "off"))
    assert unpaced["packets_dropped_queue"] > 100
    assert paced["packets_dropped_queue"] < unpaced["packets_dropped_queue"] / 10
    assert paced["utilization"] > unpaced["utilization"]  # fewer bytes wasted on drops and their resends
    done = {k: results[k]["summary"]["complete"] for k in results}
    assert done["default"] > done["off"]

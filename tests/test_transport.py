"""Transport endpoints and the virtual-time runner: packets, blocks, FEC, ARQ, reassembly."""

import hashlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from miscnet.channel.link import DuplexConfig, LinkConfig
from miscnet.channel.packet import DATA, HEADER_BYTES, Packet, PacketError, decode_packet
from miscnet.channel.transport import ImageSender, TransportConfig, TransportReceiver, make_blocks
from miscnet.cli.main import main
from miscnet.core.container import layer_name
from miscnet.core.image_io import load_image
from miscnet.core.samples import sample_image_path, sample_sidecar_path
from miscnet.core.semantics import load_semantics
from miscnet.experiments.simulate import Scenario, SimImage, simulate
from miscnet.sender.encoder import EncoderConfig, encode_image


@pytest.fixture(scope="module")
def encoded_samples():
    out = []
    for name in ("astronaut", "chelsea"):
        image = load_image(sample_image_path(name))
        sem, _ = load_semantics(sample_sidecar_path(name))
        enc = encode_image(image, sem, EncoderConfig(budget_bytes=2000)).encoded
        out.append(SimImage(name, enc, image))
    return out


def layer_hashes(encoded):
    return {layer_name(ly): hashlib.sha256(ly.SerializeToString()).hexdigest() for ly in encoded.layers}


def test_packet_header_is_12_bytes_and_checked():
    p = Packet(DATA, 513, 2, 7, 9, b"payload")
    data = p.encode()
    assert len(data) == HEADER_BYTES + 7 and decode_packet(data) == p
    for bad in (data[:-1], data[:11], bytes([data[0] ^ 0x80]) + data[1:], data[:12] + b"x" + data[13:]):
        with pytest.raises(PacketError):
            decode_packet(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_hostile_packets_are_counted_never_crash(data):
    rx = TransportReceiver()
    received = rx.on_datagram(data)
    assert received.arrivals == [] and received.image_id is None and rx.stats.packets_received == 1


def test_small_layers_share_one_packet(encoded_samples):
    blocks = make_blocks(encoded_samples[0].encoded, TransportConfig())
    assert blocks[0].layers == ("semantic", "map") and blocks[0].k == 1
    assert [b.layers for b in blocks[1:]] == [("pixel.0",), ("pixel.1",)]


@pytest.mark.parametrize("mode", ["none", "fec", "arq", "hybrid"])
def test_reassembly_survives_duplication_and_reordering(encoded_samples, mode):
    enc = encoded_samples[0].encoded
    sender = ImageSender(5, enc, TransportConfig(mode=mode, mtu=200))
    packets = [d.data for d in sender.start(0.0)]
    rng = np.random.default_rng(0)
    data = [p for p in packets if decode_packet(p).kind == DATA]
    shuffled = [packets[i] for i in rng.permutation(len(packets))] + data[:3]
    rx = TransportReceiver()
    got = {}
    for data in shuffled:
        for arrival in rx.on_datagram(data).arrivals:
            got[layer_name(arrival.layer)] = hashlib.sha256(arrival.layer.SerializeToString()).hexdigest()
    assert got == layer_hashes(enc) and rx.image_complete(5)
    assert rx.stats.packets_duplicate >= 3


def test_fec_repairs_losses_without_feedback(encoded_samples):
    enc = encoded_samples[0].encoded
    cfg = TransportConfig(mode="fec", mtu=200, strong_rate=0.5, pixel_rate=0.6)
    datagrams = ImageSender(1, enc, cfg).start(0.0)
    repairs = [d for d in datagrams if d.role == "repair"]
    assert repairs
    # drop one source symbol of every block: the repair symbols must stand in for them
    dropped, rx = set(), TransportReceiver()
    for d in datagrams:
        p = decode_packet(d.data)
        if d.role == "source" and p.block not in dropped:
            dropped.add(p.block)
            continue
        rx.on_datagram(d.data)
    assert rx.image_complete(1)


def _scenario(loss, mode, seed=1, rate="64kbit", mtu=1200):
    link = DuplexConfig(LinkConfig.from_strings(rate=rate, delay="40ms", loss=loss))
    return Scenario(link=link, transport=TransportConfig(mode=mode, mtu=mtu), seed=seed)


def test_arq_delivers_bit_exact_under_20_percent_burst_loss(encoded_samples):
    # gemodel p=10% r=40%: mean loss p/(p+r) = 20% in bursts of mean length 2.5
    lost = 0
    for seed in range(5):
        results = simulate(encoded_samples, _scenario("gemodel 10% 40%", "arq", seed, mtu=200))
        for r in results:
            assert r["completed"] and r["bit_exact"] and r["sender_state"] == "done", r
            lost += r["totals"]["packets_lost"]
    assert lost >= 10  # the loss really happened and was repaired


def test_none_still_decodes_the_stages_that_completed(encoded_samples):
    lost_some = False
    for seed in range(10):
        (r,) = simulate(encoded_samples[:1], _scenario("random 30%", "none", seed))
        stages = [e["stage"] for e in r["events"]]
        if not r["completed"]:
            lost_some = True
        assert stages == sorted(stages, key=["semantic", "map", "pixel.0", "pixel.1"].index)
        for e in r["events"]:
            assert (e["psnr"] is None) == (not e["stage"].startswith("pixel"))
    assert lost_some


def test_same_seed_same_events_and_different_seed_differs(encoded_samples):
    a = simulate(encoded_samples, _scenario("gemodel 5% 30%", "hybrid", seed=4))
    b = simulate(encoded_samples, _scenario("gemodel 5% 30%", "hybrid", seed=4))
    assert json.dumps(a) == json.dumps(b)
    others = [simulate(encoded_samples, _scenario("gemodel 5% 30%", "hybrid", seed=s)) for s in range(5, 9)]
    assert any(json.dumps(o) != json.dumps(a) for o in others)


def test_deadline_gives_up_and_reports(encoded_samples):
    link = DuplexConfig(LinkConfig.from_strings(rate="64kbit", delay="40ms", loss="random 100%"))
    scenario = Scenario(link=link, transport=TransportConfig(mode="arq", deadline_s=2.0), seed=0)
    (r,) = simulate(encoded_samples[:1], scenario)
    # the link loses everything, the final POLL included: the sender gives up and cannot learn more
    assert not r["completed"] and r["sender_state"] == "unconfirmed" and "deadline" in r["failure"]


def test_simulate_and_link_cli(capsys, tmp_path):
    trace = "../shared/traces/ATT-LTE-driving-2016.up"
    from pathlib import Path

    if not Path(trace).exists():
        trace = None
    argv = ["simulate", "sample:rocket", "--delay", "40ms", "--loss", "gemodel 1% 30% 70% 0.1%",
            "--protect", "hybrid", "--seed", "3", "--json", "-o", str(tmp_path)]
    if trace:
        argv += ["--trace", trace]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    (img,) = report["images"]
    assert img["completed"] and img["events"][-1]["stage"] == "pixel.1"
    for key in ("wire_bytes", "retransmitted_bytes", "fec_bytes", "packets_sent", "packets_lost"):
        assert key in report["totals"]
    for e in img["events"]:
        assert set(e) >= {"stage", "time_s", "payload_bytes", "wire_bytes", "psnr", "ms_ssim"}
    assert (tmp_path / "simulate.json").exists() and list((tmp_path / "rocket").glob("*.png"))

    assert main(["link", "--rate", "64kbit", "--saturate", "20", "--json"]) == 0
    link = json.loads(capsys.readouterr().out)
    assert link["capacity_bps"] == 64000 and 0.97 <= link["utilization"] <= 1.0

    for bad in (["link", "--rate", "64kbits", "--saturate", "1"], ["link", "--loss", "gemodel x", "--saturate", "1"]):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("miscnet: ") and err.count("\n") == 1


# ---------------------------------------------------------------- recovery, interleaving, adaptation, deadlines

from miscnet.channel.packet import POLL  # noqa: E402
from miscnet.channel.transport import PathEstimate, block_failure, parse_feedback  # noqa: E402


def _deliver(rx, datagrams, drop=lambda p: False):
    """Datagrams through the receiver (those ``drop`` picks are lost); the replies, parsed."""
    replies = []
    for d in datagrams:
        if drop(decode_packet(d.data)):
            continue
        replies += [parse_feedback(f)[1] for f in rx.on_datagram(d.data).feedback]
    return replies


def test_a_burst_of_n_losses_is_recovered_in_one_round_trip(encoded_samples):
    enc = encoded_samples[0].encoded
    sender = ImageSender(3, enc, TransportConfig(mode="arq", mtu=100))
    first = sender.start(0.0)
    data = [decode_packet(d.data) for d in first if decode_packet(d.data).kind == DATA]
    burst = {(p.block, p.symbol) for p in data[4:12]}  # 8 consecutive packets lost
    rx = TransportReceiver()
    replies = _deliver(rx, first, lambda p: p.kind == DATA and (p.block, p.symbol) in burst)
    assert len(replies) == 2 and not rx.image_complete(3)  # the early POLL and the last one were answered
    out = sender.on_feedback(replies[0], 0.1) + sender.on_feedback(replies[1], 0.3)
    resent = {(p.block, p.symbol) for p in map(decode_packet, (d.data for d in out)) if p.kind == DATA}
    assert resent == burst  # every hole at once, nothing else
    assert decode_packet(out[-1].data).kind == POLL
    (final,) = _deliver(rx, out)
    assert sender.on_feedback(final, 0.5) == [] and sender.state == "done" and rx.image_complete(3)
    assert sender.stats.rounds == 1 and sender.stats.probes == 0


def _probe_trains(sender, probes: int) -> tuple[list[int], list[float]]:
    """Let ``probes`` probe timers fire with nothing ever answered: the trains sent and the gaps between."""
    trains, gaps, now = [], [], 0.0
    for _ in range(probes):
        gaps.append(sender.timer_at - now)
        now = sender.timer_at
        out = sender.on_timer(now)
        assert all(decode_packet(d.data).kind == POLL for d in out)
        trains.append(len(out))
    return trains, gaps


def test_unanswered_probes_grow_into_poll_trains_then_back_off(encoded_samples):
    path = PathEstimate()
    path.rtt_sample(0.1)  # the path has answered before (an earlier image of the stream)
    sender = ImageSender(4, encoded_samples[0].encoded, TransportConfig(mode="arq"), path=path)
    sender.start(0.0)
    trains, gaps = _probe_trains(sender, 7)
    assert trains == [1, 4, 16, 32, 16, 16, 16]
    # the first probe 2 * SRTT after the data; the trains then at a bare 1.25 round trips (nothing of ours is
    # queued ahead of them), steady for four trains, then backing off
    assert gaps[0] == pytest.approx(0.2) and gaps[1:4] == [pytest.approx(0.125)] * 3
    assert gaps[4] > gaps[3] and gaps[5] > gaps[4]
    assert all(g <= 1.0 + 1e-9 for g in gaps), gaps  # rto_max: a link that recovers is noticed within a second
    # a path that never answered may just be a long queue: short trains, from 0.3 s
    sender = ImageSender(5, encoded_samples[0].encoded, TransportConfig(mode="arq"))
    sender.start(0.0)
    trains, gaps = _probe_trains(sender, 5)
    assert trains == [1, 4, 16, 16, 16] and gaps[0] == pytest.approx(0.3) and max(gaps) <= 1.0


def _isolated_path(loss: float) -> PathEstimate:
    path = PathEstimate()
    path.observe(([True] + [False] * (round(1 / loss) - 1)) * 40)  # isolated losses at this rate
    return path


def test_fec_symbols_interleave_round_robin_across_blocks(encoded_samples):
    enc = encoded_samples[0].encoded
    sender = ImageSender(1, enc, TransportConfig(mode="fec", mtu=1200), path=_isolated_path(0.05))
    assert all(b.k > 1 for b in sender.blocks if b.length >= 128)  # losses are isolated: blocks are cut finer
    packets = [decode_packet(d.data) for d in sender.start(0.0)]
    sources = [p for p in packets if p.symbol < p.k]
    expected = [(b.index, s) for s in range(max(b.k for b in sender.blocks)) for b in sender.blocks if s < b.k]
    assert [(p.block, p.symbol) for p in sources] == expected
    assert packets[: len(sources)] == sources  # sources first, then the repairs, also round-robin
    repairs = [p.block for p in packets[len(sources):]]
    assert repairs[: len(sender.blocks)] == [b.index for b in sender.blocks]
    # bursty or unknown loss: whole packets, so a burst meets as few packets as possible
    assert all(b.k == -(-b.length // 1200) for b in ImageSender(1, enc, TransportConfig(mode="fec")).blocks)


def test_code_rate_follows_the_reported_loss(encoded_samples):
    enc = encoded_samples[0].encoded

    def repairs(mode: str, path: PathEstimate | None) -> int:
        return sum(d.role == "repair" for d in ImageSender(2, enc, TransportConfig(mode=mode), path=path).start(0.0))

    assert repairs("hybrid", None) == 0  # nothing known: ARQ's rounds cost less than repair every time
    assert repairs("hybrid", _isolated_path(0.02)) == 0
    assert repairs("hybrid", _isolated_path(0.3)) > 0
    assert repairs("fec", _isolated_path(0.3)) > repairs("fec", _isolated_path(0.02)) > 0
    assert block_failure(4, 2, 0.1, burst=8) > block_failure(4, 2, 0.1, burst=1)


def test_the_path_estimate_learns_loss_and_bursts_from_feedback(encoded_samples):
    path = PathEstimate()
    for image_id in range(6):
        sender = ImageSender(image_id, encoded_samples[0].encoded, TransportConfig(mode="arq", mtu=100), path=path)
        first = sender.start(0.0)
        rx = TransportReceiver()
        lost = {5, 6, 7}  # three consecutive source packets of each image
        datas = [i for i, d in enumerate(first) if decode_packet(d.data).kind == DATA]
        replies = [parse_feedback(f)[1] for i, d in enumerate(first) if i not in {datas[j] for j in lost}
                   for f in rx.on_datagram(d.data).feedback]
        for fb in replies:
            sender.on_feedback(fb, 0.2)
    assert path.loss_rate is not None and 0.05 < path.loss_rate < 0.3
    assert path.mean_burst == pytest.approx(3.0)
    assert path.srtt == pytest.approx(0.2)


def test_a_deadline_stops_pixel_refinement_that_cannot_arrive(encoded_samples):
    enc = encoded_samples[0].encoded
    path = PathEstimate(srtt=0.1, min_rtt=0.1, rate_bps=8000.0)  # about 1 kB a second
    sender = ImageSender(6, enc, TransportConfig(mode="arq"), path=path, deadline_s=0.8)
    sent = {decode_packet(d.data).block for d in sender.start(0.0) if decode_packet(d.data).kind == DATA}
    assert 0 in sent and len(sent) < len(sender.blocks)  # semantic + map first; the last level is not sent
    assert sender.stats.blocks_dropped == len(sender.blocks) - len(sent)
    # the receiver gets what was sent: the sender settles the image instead of waiting for the rest
    rx = TransportReceiver()
    out = []
    for d in ImageSender(6, enc, TransportConfig(mode="arq"), path=path, deadline_s=0.8).start(0.0):
        out += [parse_feedback(f)[1] for f in rx.on_datagram(d.data).feedback]
    closing = sender.on_feedback(out[-1], 0.3)
    assert sender.state == "closing" and "could not arrive in time" in sender.failure
    assert [decode_packet(d.data).symbol for d in closing] == [0xFFFF]


def test_late_bytes_are_counted(encoded_samples):
    link = DuplexConfig(LinkConfig.from_strings(rate="8kbit", delay="40ms"))
    scenario = Scenario(link=link, transport=TransportConfig(mode="none", deadline_s=0.5), seed=0, quality=False)
    (r,) = simulate(encoded_samples[:1], scenario)
    assert 0 < r["totals"]["late_bytes"] < r["totals"]["delivered_bytes"]

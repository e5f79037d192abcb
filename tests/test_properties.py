"""Packet-level properties (hypothesis): any order, duplicates, losses, corruptions and hostile fields.

Against the transport receiver and a live receiver node: no exception escapes, state stays within its
bounds, and every image that completes is bit-exact. Hostile packets carry valid checksums (the CRC is
an error check, not authentication), so they use image ids of their own: a peer can spoil only what it
sends itself, which is what a per-sender stream guarantees.
"""

import json
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from miscnet.channel.packet import DATA, FEEDBACK, POLL, Packet
from miscnet.channel.transport import MAX_BLOCKS, ImageSender, TransportConfig, TransportReceiver
from miscnet.core.config import EncoderConfig
from miscnet.core.container import layer_name, layers_digest
from miscnet.core.image_io import load_image
from miscnet.core.samples import sample_image_path, sample_sidecar_path
from miscnet.core.semantics import load_semantics
from miscnet.receiver.classical import ClassicalDecoder
from miscnet.receiver.node import ReceiverOptions, serve_receiver
from miscnet.sender.encoder import encode_image
from miscnet.v1 import services_pb2 as spb
from miscnet.v1 import services_pb2_grpc as sgrpc

IMAGE_ID = 7
MODES = ("none", "fec")


@pytest.fixture(scope="module")
def encoded():
    image = load_image(sample_image_path("chelsea"))
    sem, _ = load_semantics(sample_sidecar_path("chelsea"))
    return encode_image(image, sem, EncoderConfig(budget_bytes=900)).encoded


_PACKETS: dict = {}


def packets_for(encoded, mode: str, mtu: int) -> list[bytes]:
    key = (mode, mtu)
    if key not in _PACKETS:
        _PACKETS[key] = [d.data for d in ImageSender(IMAGE_ID, encoded, TransportConfig(mode, mtu=mtu)).start(0.0)]
    return _PACKETS[key]


hostile_packet = st.builds(
    lambda kind, image_id, block, symbol, k, payload: Packet(kind, image_id, block, symbol, k, payload).encode(),
    st.sampled_from([DATA, DATA, DATA, POLL, FEEDBACK]),
    st.integers(0, 0xFFFF).filter(lambda i: i != IMAGE_ID),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.binary(max_size=300),
)


def run_schedule(rx: TransportReceiver, packets: list[bytes], order: list[int], lost: set[int],
                 corrupt: dict[int, int], hostile: list[bytes]) -> dict[str, bytes]:
    got: dict[str, bytes] = {}
    stream = [i for i in order if i not in lost]
    items: list[bytes] = []
    for i in stream:
        data = packets[i]
        if i in corrupt:
            pos = corrupt[i] % len(data)
            data = data[:pos] + bytes([data[pos] ^ 0x5A]) + data[pos + 1 :]
        items.append(data)
    # interleave the hostile packets deterministically through the stream
    for j, h in enumerate(hostile):
        items.insert((j * 7919) % (len(items) + 1), h)
    for data in items:
        received = rx.on_datagram(data)
        for arrival in received.arrivals:
            if arrival.image_id == IMAGE_ID:
                got[layer_name(arrival.layer)] = arrival.layer.SerializeToString(deterministic=True)
        assert rx.buffered_bytes <= rx.max_buffered_bytes and len(rx.images) <= rx.max_images
    return got


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_transport_receiver_properties(encoded, data):
    mode = data.draw(st.sampled_from(MODES), label="mode")
    mtu = data.draw(st.sampled_from([64, 100, 333, 1200]), label="mtu")
    packets = packets_for(encoded, mode, mtu)
    n = len(packets)
    order = data.draw(st.permutations(range(n)), label="order")
    dups = data.draw(st.lists(st.integers(0, n - 1), max_size=8), label="duplicates")
    lost = data.draw(st.sets(st.integers(0, n - 1), max_size=n), label="lost")
    corrupt = data.draw(st.dictionaries(st.integers(0, n - 1), st.integers(0, 4096), max_size=4), label="corrupt")
    hostile = data.draw(st.lists(hostile_packet, max_size=12), label="hostile")
    rx = TransportReceiver(max_images=8, max_buffered_bytes=256 * 1024)
    got = run_schedule(rx, packets, list(order) + dups, lost, corrupt, hostile)
    want = {layer_name(ly): ly.SerializeToString(deterministic=True) for ly in encoded.layers}
    for name, layer in got.items():
        assert layer == want[name]  # whatever arrives is bit-exact
    clean = {i for i in range(n) if i not in lost and i not in corrupt}
    source = [i for i, p in enumerate(packets) if (p[4] << 8 | p[5]) < (p[6] << 8 | p[7])]
    if set(source) <= clean and len(rx.images) < rx.max_images:
        assert rx.image_complete(IMAGE_ID) and got == want  # every source packet once: complete
    assert all(block < MAX_BLOCKS for image in rx.images.values() for block in image.blocks)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    out = tmp_path_factory.mktemp("rx")
    options = ReceiverOptions(out_dir=out, listen="127.0.0.1:0", max_images_per_stream=8)
    server, node, port = serve_receiver(options, ClassicalDecoder())
    yield node, f"127.0.0.1:{port}", out / "events.jsonl"
    server.stop(grace=1).wait()
    node.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_live_receiver_properties(encoded, live, data):
    node, target, events_path = live
    mode = data.draw(st.sampled_from(MODES), label="mode")
    packets = packets_for(encoded, mode, 333)
    n = len(packets)
    order = data.draw(st.permutations(range(n)), label="order")
    dups = data.draw(st.lists(st.integers(0, n - 1), max_size=4), label="duplicates")
    corrupt = data.draw(st.dictionaries(st.integers(0, n - 1), st.integers(0, 4096), max_size=3), label="corrupt")
    hostile = data.draw(st.lists(hostile_packet, max_size=10), label="hostile")
    items = [packets[i] for i in list(order) + dups]
    for i, pos in corrupt.items():
        bad = bytearray(packets[i])
        bad[pos % len(bad)] ^= 0x5A
        items.insert(pos % (len(items) + 1), bytes(bad))
    for j, h in enumerate(hostile):
        items.insert((j * 7919) % (len(items) + 1), h)
    before = node.counters.value("streams_total")
    with grpc.insecure_channel(target) as channel:  # every real packet arrives at least once, clean
        list(sgrpc.LinkStub(channel).Exchange(iter([spb.LinkMessage(packet=p) for p in items]), timeout=30))
    stream = f"s{int(before) + 1:04d}"
    digest = layers_digest(encoded.layers)

    def complete_event():
        for line in events_path.read_text().splitlines():
            e = json.loads(line)
            if e["stream"] == stream and e["image_id"] == IMAGE_ID and e.get("digest"):
                return e
        return None

    end = time.monotonic() + 30
    while complete_event() is None and time.monotonic() < end:
        time.sleep(0.05)
    assert complete_event()["digest"] == digest
    while node.counters.value("streams_open") and time.monotonic() < end:  # the stream's state is released
        time.sleep(0.05)
    assert node.counters.value("streams_open") == 0 and node.scheduler.pending <= 8

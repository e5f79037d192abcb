"""When the sender probes: the answer to a POLL queued behind its own batch, and probe POLLs' fates."""

import pytest

from miscnet.channel.packet import POLL, decode_packet
from miscnet.channel.transport import ImageSender, PathEstimate, TransportConfig, TransportReceiver, parse_feedback
from miscnet.core.image_io import load_image
from miscnet.core.samples import sample_image_path, sample_sidecar_path
from miscnet.core.semantics import load_semantics
from miscnet.sender.encoder import EncoderConfig, encode_image


@pytest.fixture(scope="module")
def encoded():
    image = load_image(sample_image_path("astronaut"))
    sem, _ = load_semantics(sample_sidecar_path("astronaut"))
    return encode_image(image, sem, EncoderConfig(budget_bytes=2000)).encoded


def test_an_answer_is_due_after_the_bare_round_trip_and_the_batch_at_the_rate():
    path = PathEstimate()
    assert path.answer_due(1000) is None
    path.queue_sample(3000, 0.46)  # no rate yet: scaled by the bytes, at least the least round trip seen,
    path.queue_sample(12, 0.2)  # and only for batches no larger than a sampled one
    assert path.answer_due(1500) == pytest.approx(0.23) and path.answer_due(600) == pytest.approx(0.2)
    assert path.answer_due(6000) is None
    path.rate_bps = 64000.0
    path.queue_sample(200, 0.105)  # 200 bytes take 25 ms at 64 kbit/s: the bare round trip is 80 ms
    assert path.answer_due(2000) == pytest.approx(0.08 + 0.25)


def test_the_first_probe_waits_for_the_batch_not_for_an_srtt_its_queue_inflated(encoded):
    path = PathEstimate(rate_bps=64000.0)
    path.rtt_sample(0.83)  # an earlier image's POLL waited 0.83 s behind 6 kB: 0.75 s of it the queue
    path.queue_sample(6000, 0.83)
    sender = ImageSender(1, encoded, TransportConfig(mode="arq"), path=path)
    out = sender.start(0.0)
    due = 0.08 + sum(d.size for d in out) * 8 / 64000
    assert sender.timer_at == pytest.approx(1.25 * due) and sender.timer_at < 0.83  # 2 * SRTT: 1.66 s


def test_probe_trains_do_not_count_in_the_loss_the_path_measures(encoded):
    sender = ImageSender(2, encoded, TransportConfig(mode="arq"))
    rx = TransportReceiver()
    first = sender.start(0.0)
    data = [d for d in first if decode_packet(d.data).kind != POLL]
    for d in data[:-1]:  # the last data packet and both POLLs are lost
        rx.on_datagram(d.data)
    trains = [sender.on_timer(sender.timer_at) for _ in range(3)]  # 1 + 4 + 16 POLLs, all lost
    now = sender.timer_at
    (answer,) = rx.on_datagram(sender.on_timer(now)[0].data).feedback  # the fourth train's first POLL arrives
    resent = sender.on_feedback(parse_feedback(answer)[1], now + 0.1)
    assert [len(t) for t in trains] == [1, 4, 16]
    assert [d.data for d in resent if decode_packet(d.data).kind != POLL] == [data[-1].data]
    # the first send's packets count (its last data packet and two POLLs lost); the 21 probe POLLs do not
    assert sender.path.lost == 3 and sender.path.delivered == len(data) - 1


def test_probe_trains_keep_to_a_queue_the_streams_other_images_keep_standing(encoded):
    path = PathEstimate()
    path.rtt_sample(0.1)  # long ago the path was empty ...
    for _ in range(8):  # ... now every answer waits 2 s behind the other images of the stream
        path.rtt_sample(2.0)
        path.queue_sample(12, 2.0)
    assert path.bare_rtt() == pytest.approx(2.0) and path.min_rtt == pytest.approx(0.1)
    sender = ImageSender(3, encoded, TransportConfig(mode="arq"), path=path)
    sender.start(0.0)
    first = sender.timer_at
    assert len(sender.on_timer(first)) == 1
    # the next train 1.25 bare round trips later (2.5 s), not 1.25 * 0.1 s, which would pile POLLs on the queue
    assert sender.timer_at - first == pytest.approx(2.5)

"""Runs images through the transport and the link in virtual time (SimPy), decoding each stage.

One SimPy environment holds a duplex link (forward for data, reverse for feedback), a sender process that
sends the images one after another (the next starts when the previous one is done or given up), and a
receiver that reassembles layers and reconstructs every new stage with the classical decoder as it
completes. Everything random draws from generators seeded by the scenario's seed, so the same scenario
and seed give the same events, byte for byte.

The scenario's seed drives the link and the transport alone. A diffusion decoder's noise has its own
seed, ``--decoder-seed`` (default 0: the DiffusionConfig's, as a scenario's ``decoder.seed``), so runs
over several link seeds differ by their losses, not by their noise.

Event fields: ``stage``, ``time_s`` (since the image's first packet), ``payload_bytes`` (layer payload
bytes the stage uses), ``wire_bytes`` (forward bytes of this image delivered so far: packet headers,
repair and retransmissions included), and the stage's quality against the reference: ``psnr``,
``ms_ssim``, ``ssimulacra2``, ``flip`` (experiments/metrics.py QUALITY_METRICS; null for stages without
pixels, and for metrics ``Scenario.metrics`` leaves out: by default the perceptual two).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import simpy

from miscnet.channel.link import DuplexConfig
from miscnet.channel.packet import Datagram, PacketError
from miscnet.channel.transport import ImageSender, PathEstimate, TransportConfig, TransportReceiver, parse_feedback
from miscnet.core.container import EncodedImage, layer_name, to_bytes
from miscnet.experiments import jpeg_progressive  # noqa: F401  (registers the baseline codec: its points decode here)
from miscnet.experiments.metrics import QUALITY_METRICS
from miscnet.receiver.assembly import ImageAssembly
from miscnet.receiver.classical import ClassicalDecoder


@dataclass(frozen=True)
class Scenario:
    link: DuplexConfig
    transport: TransportConfig = field(default_factory=TransportConfig)
    seed: int = 0
    quality: bool = True  # compute the quality of pixel stages (needs the reference image)
    # which (experiments/metrics.py quality_report); the others are None. PSNR and MS-SSIM by default: the
    # perceptual two cost about a second per stage, and the command line asks for them (QUALITY_METRICS)
    metrics: tuple[str, ...] = ("psnr", "ms_ssim")


@dataclass
class SimImage:
    name: str
    encoded: EncodedImage
    reference: np.ndarray | None = None


class _QualityCache:
    """Stage quality depends only on the image and the layers used, not on the link: compute it once."""

    def __init__(self, decoder=None, metrics: tuple[str, ...] = QUALITY_METRICS) -> None:
        self.decoder = decoder or ClassicalDecoder()
        self.metrics = metrics
        self._cache: dict[tuple, tuple] = {}

    def __call__(self, item: SimImage, stage, want_image: bool = False):
        """(the stage's metrics, or None without pixels or a reference; its image when ``want_image``)."""
        key = (id(item), stage.layers)
        hit = self._cache.get(key)
        if hit is not None and hit[2] is not item:  # an id recycled after its item was freed
            hit = None
        if hit is None or (want_image and hit[1] is None):
            image = self.decoder.render(stage)
            metrics = None
            if stage.has_pixels and item.reference is not None:
                from miscnet.experiments.metrics import quality_report

                metrics = quality_report(item.reference, image, self.metrics)
            hit = (metrics, image if want_image else None, item)  # holding item keeps its id unique
            self._cache[key] = hit
        return hit[:2]


def simulate(items: list[SimImage], scenario: Scenario, keep_images: bool = False,
             quality_cache: _QualityCache | None = None, decoder=None) -> list[dict]:
    """Run the scenario; ``decoder`` (default classical) reconstructs each stage for its quality figures."""
    env = simpy.Environment()
    rng = np.random.default_rng(scenario.seed)
    quality = quality_cache or _QualityCache(decoder, scenario.metrics)
    no_quality = dict.fromkeys(QUALITY_METRICS)
    receiver = TransportReceiver()
    senders: dict[int, ImageSender] = {}
    start: dict[int, float] = {}
    inboxes = {i: simpy.Store(env) for i in range(len(items))}
    assemblies: dict[int, ImageAssembly] = {}
    events: dict[int, list[dict]] = {i: [] for i in range(len(items))}
    images: dict[int, list] = {i: [] for i in range(len(items))}
    delivered_bytes = dict.fromkeys(range(len(items)), 0)
    delivered_packets = dict.fromkeys(range(len(items)), 0)
    late_bytes = dict.fromkeys(range(len(items)), 0)  # delivered after the image's deadline: too late to use
    deadline = scenario.transport.deadline_s
    path = PathEstimate()  # what the sender learns of the link, carried from image to image
    done_at: dict[int, float] = {}

    def on_forward(dg: Datagram) -> None:
        image_id = dg.image_id
        if image_id in delivered_bytes:
            delivered_bytes[image_id] += dg.size
            delivered_packets[image_id] += 1
            if deadline is not None and env.now - start[image_id] > deadline:
                late_bytes[image_id] += dg.size
        received = receiver.on_datagram(dg.data)
        for fb in received.feedback:
            link.reverse.send(Datagram(fb, "feedback", image_id))
        by_image: dict[int, list] = {}
        for arrival in received.arrivals:  # layers of one packet make one stage, not several
            by_image.setdefault(arrival.image_id, []).append(arrival)
        for i, group in by_image.items():
            if i not in delivered_bytes:
                continue
            assembly = assemblies.get(i)
            if assembly is None:
                assembly = assemblies[i] = ImageAssembly(group[0].header)
            stage = assembly.add(*(a.layer for a in group))
            if stage is None:
                continue
            metrics, img = quality(items[i], stage, keep_images) if scenario.quality else (None, None)
            events[i].append({"stage": stage.name, "layers": list(stage.layers), "time_s": env.now - start[i],
                              "payload_bytes": stage.payload_bytes, "wire_bytes": delivered_bytes[i],
                              **no_quality, **(metrics or {})})
            if keep_images:
                images[i].append((stage.name, img if img is not None else quality.decoder.render(stage)))
            if assembly.complete:
                done_at[i] = env.now - start[i]

    def on_reverse(dg: Datagram) -> None:
        try:
            image_id, feedback = parse_feedback(dg.data)
        except PacketError:
            return
        if image_id in inboxes:
            inboxes[image_id].put(feedback)

    link = scenario.link.build(env, rng, on_forward, on_reverse)

    def send_all(datagrams) -> None:
        for dg in datagrams:
            link.forward.send(dg)

    def sender_process():
        for i, item in enumerate(items):
            sender = ImageSender(i, item.encoded, scenario.transport, path=path)
            senders[i], start[i] = sender, env.now
            send_all(sender.start(env.now))
            get = inboxes[i].get()
            while not sender.finished:
                wait = max(0.0, (sender.timer_at or env.now) - env.now)
                fired = yield get | env.timeout(wait)
                if get in fired:
                    send_all(sender.on_feedback(fired[get], env.now))
                    get = inboxes[i].get()
                else:
                    send_all(sender.on_timer(env.now))

    env.process(sender_process())
    env.run()

    results = []
    for i, item in enumerate(items):
        sender = senders[i]
        s = sender.stats
        complete = i in done_at
        received = assemblies[i].layers if i in assemblies else {}
        sent = {layer_name(ly): ly.SerializeToString() for ly in item.encoded.layers}
        bit_exact = complete and all(received[n].SerializeToString() == b for n, b in sent.items())
        sent_packets = s.packets_sent
        results.append({
            "image": item.name, "width": item.encoded.width, "height": item.encoded.height,
            "bytes": len(to_bytes(item.encoded)), "payload_bytes": item.encoded.payload_bytes(),
            "completed": complete, "bit_exact": bit_exact, "sender_state": sender.state, "failure": sender.failure,
            "events": events[i],
            "totals": {
                "wire_bytes": s.wire_bytes, "retransmitted_bytes": s.retransmitted_bytes,
                "fec_bytes": s.fec_bytes, "control_bytes": s.control_bytes, "packets_sent": sent_packets,
                "packets_lost": sent_packets - delivered_packets[i], "rounds": s.rounds,
                "delivered_bytes": delivered_bytes[i], "late_bytes": late_bytes[i],
                "completion_time_s": done_at.get(i),
                "first_stage_time_s": events[i][0]["time_s"] if events[i] else None,
            },
            **({"stage_images": images[i]} if keep_images else {}),
        })
    return results

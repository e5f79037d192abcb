"""Transport endpoints, sans I/O: the same state machines run in virtual time (SimPy) and live (gRPC).

Sender side (``ImageSender``): an encoded image becomes *blocks*. Block 0 carries the tiny, most
important units (header, semantic, map) so they share one packet; each pixel level is a block of its own,
in stream order. Every block starts with the image header, so any block that arrives is decodable even if
block 0 is lost. A block is cut into k source symbols of one size; FEC adds repair symbols from RaptorQ
(RFC 6330, Apache-2.0 ``raptorq`` package), with unequal protection (``strong_rate`` for block 0,
``pixel_rate`` for pixel blocks, as code rates k/n).

Error control modes:
  none    send every source symbol once; the receiver uses what completes.
  fec     source + repair symbols once, no feedback.
  arq     source once, then a 12-byte POLL; the receiver answers with Feedback (selective NACKs); lost
          source symbols are sent again, until complete, ``max_rounds`` or ``deadline_s``.
  hybrid  fec's first round, then arq's rounds, asking for fresh repair symbols (any k of a block decode).
Round-trip times from POLL to Feedback drive the retransmission timer (RFC 6298: SRTT, RTTVAR, backoff).

Receiver side (``TransportReceiver``): verifies packets (checksum first, sizes, limits), reassembles blocks
(loss, duplication and reordering tolerated), decodes FEC, parses units and reports each layer once;
answers POLLs with Feedback.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import raptorq
from google.protobuf.message import DecodeError

from miscnet.channel.packet import DATA, FEEDBACK, POLL, Datagram, Packet, PacketError, decode_packet
from miscnet.core import leb128
from miscnet.core.container import KIND_ORDER, EncodedImage, layer_name, validate_header, validate_layer
from miscnet.core.errors import BitstreamError, MiscError
from miscnet.v1 import bitstream_pb2 as pb
from miscnet.v1 import transport_pb2 as tpb

MODES = ("none", "arq", "fec", "hybrid")
FEC_ALIGN = 8  # RaptorQ symbols are multiples of 8 bytes in the raptorq package
# raptorq 2.0 gives repair symbols 4 bytes longer than the source symbols below 64 bytes (and its decoder
# then panics): FEC symbols are never smaller, and a receiver refuses smaller ones.
MIN_FEC_SYMBOL = 64
MAX_BLOCKS = 64
MAX_SYMBOLS = 4096
MAX_SYMBOL_ID = 0xFFFF  # the header's 16-bit symbol field: repair ids stop here
MAX_FEEDBACK_MISSING = 8192  # missing ids one Feedback lists at most (it stays far under a packet's size)
FINAL_TOKEN = 0xFFFF  # the POLL that ends an image: round tokens never take this value
POLL_ASK, POLL_FINAL = 0, 1  # a POLL's k field: ask what arrived; or end the image (abandon it if incomplete)
FINAL_TRIES = 3  # final POLLs a sender sends before it calls the outcome unconfirmed
REMEMBERED_IMAGES = 4096  # outcomes of finished images a receiver keeps per stream (ids wrap at 65536)
MAX_BLOCK_BYTES = 4 * 1024 * 1024  # one block (k symbols) at most: bounds a block's memory and FEC work
MAX_UNIT_BYTES = MAX_BLOCK_BYTES


@dataclass(frozen=True)
class TransportConfig:
    mode: str = "none"
    mtu: int = 1200  # payload bytes per packet (the 12-byte header comes on top)
    strong_rate: float = 0.5  # code rate k/n of block 0 (header + semantic + map) under fec / hybrid
    pixel_rate: float = 0.8  # code rate of pixel blocks
    fec_min_symbols: int = 4  # small blocks are cut into this many symbols so one repair is not a whole copy
    max_rounds: int = 12  # ARQ rounds after the first
    deadline_s: float | None = None  # give up this long after the first packet
    rto_initial_s: float = 1.0
    rto_min_s: float = 0.2
    rto_max_s: float = 4.0  # short of RFC 6298's 60 s: a stalled image should give up or recover soon

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise MiscError(f"unknown protection '{self.mode}' (use {', '.join(MODES)})")
        if not 64 <= self.mtu <= 65000:
            raise MiscError(f"MTU must be 64..65000 bytes of payload, not {self.mtu}")
        for name in ("strong_rate", "pixel_rate"):
            value = getattr(self, name)
            if not 0.05 <= value <= 1.0:
                raise MiscError(f"{name.replace('_', '-')} must be a code rate in [0.05, 1], not {value}")
        if not 1 <= self.fec_min_symbols <= 64:
            raise MiscError(f"fec symbols must be 1..64, not {self.fec_min_symbols}")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise MiscError(f"deadline must be positive, not {self.deadline_s}")

    @property
    def uses_fec(self) -> bool:
        return self.mode in ("fec", "hybrid")

    @property
    def uses_feedback(self) -> bool:
        return self.mode in ("arq", "hybrid")


# ---------------------------------------------------------------- units and blocks

def pack_units(header: pb.Header, layers: Iterable[pb.Layer]) -> bytes:
    """Block payload: length-prefixed Header, then length-prefixed Layers; a zero length ends it."""
    parts = [header.SerializeToString(), *(ly.SerializeToString() for ly in layers)]
    return b"".join(leb128.encode(len(p)) + p for p in parts)


def unpack_units(data: bytes) -> tuple[pb.Header, list[pb.Layer]]:
    units, pos = [], 0
    while pos < len(data):
        n, pos = leb128.decode(data, pos, "length in block")
        if n == 0:  # FEC padding
            break
        if n > MAX_UNIT_BYTES or pos + n > len(data):
            raise BitstreamError("unit length runs past the block")
        units.append(data[pos : pos + n])
        pos += n
    if not units:
        raise BitstreamError("empty block")
    try:
        header = pb.Header.FromString(units[0])
        layers = [pb.Layer.FromString(u) for u in units[1:]]
    except (DecodeError, RecursionError, ValueError) as exc:
        raise BitstreamError(f"malformed unit in block: {exc}") from None
    validate_header(header)
    for layer in layers:
        validate_layer(layer)
    return header, layers


@dataclass
class Block:
    index: int
    layers: tuple[str, ...]
    strong: bool
    length: int  # unpadded bytes
    symbols: list[bytes]  # k source symbols
    fec: bool
    _encoder: object | None = None
    _repairs: list[bytes] = field(default_factory=list)

    @property
    def k(self) -> int:
        return len(self.symbols)

    def repair(self, index: int) -> bytes:
        """Repair symbol ``index`` (0-based; its symbol id is k + index), from RaptorQ."""
        if index >= len(self._repairs):
            want = max(index + 1, 2 * len(self._repairs), 4)
            if self._encoder is None:
                t = len(self.symbols[0])
                # max packet size t + 4 (RFC 6330 payload id + symbol) makes raptorq pick symbol size t
                self._encoder = raptorq.Encoder.with_defaults(b"".join(self.symbols), t + 4)
            packets = self._encoder.get_encoded_packets(want)
            self._repairs = [p[4:] for p in packets[self.k :]]
        return self._repairs[index]


def make_blocks(image: EncodedImage, config: TransportConfig) -> list[Block]:
    header = image.header()
    ordered = sorted(image.layers, key=lambda ly: (KIND_ORDER[ly.kind], ly.level))
    groups = [[ly for ly in ordered if ly.kind != pb.LAYER_KIND_PIXEL]]
    groups += [[ly] for ly in ordered if ly.kind == pb.LAYER_KIND_PIXEL]
    groups = [g for g in groups if g]
    if len(groups) > MAX_BLOCKS:
        raise MiscError(f"{len(groups)} blocks, over the transport's limit of {MAX_BLOCKS}")
    blocks = []
    for index, group in enumerate(groups):
        data = pack_units(header, group)
        strong = group[0].kind != pb.LAYER_KIND_PIXEL
        blocks.append(_cut(index, tuple(layer_name(ly) for ly in group), strong, data, config))
    return blocks


def _cut(index: int, names: tuple[str, ...], strong: bool, data: bytes, config: TransportConfig) -> Block:
    n = len(data)
    if not config.uses_fec:
        t = min(config.mtu, n)
        symbols = [data[i : i + t] for i in range(0, n, t)]  # the last one may be short: no padding
    else:
        mtu = config.mtu - config.mtu % FEC_ALIGN
        k = math.ceil(n / mtu)
        if k < config.fec_min_symbols:  # finer symbols: one repair covers one loss without a full copy
            k = max(k, min(config.fec_min_symbols, n // MIN_FEC_SYMBOL))
        t = max(MIN_FEC_SYMBOL, math.ceil(math.ceil(n / k) / FEC_ALIGN) * FEC_ALIGN)
        k = math.ceil(n / t)
        data = data + bytes(k * t - n)  # zero padding reads as the end-of-units marker
        symbols = [data[i * t : (i + 1) * t] for i in range(k)]
    if len(data) > MAX_BLOCK_BYTES:
        raise MiscError(f"block of {n} bytes is over the transport's limit of {MAX_BLOCK_BYTES} bytes")
    if len(symbols) > MAX_SYMBOLS:
        raise MiscError(f"block of {n} bytes needs {len(symbols)} symbols, over {MAX_SYMBOLS}; raise --mtu")
    return Block(index, names, strong, n, symbols, config.uses_fec)


def repair_count(k: int, rate: float) -> int:
    return 0 if rate >= 1.0 else max(1, math.ceil(k / rate) - k)


# ---------------------------------------------------------------- sender

@dataclass
class SenderStats:
    packets_sent: int = 0
    wire_bytes: int = 0
    source_bytes: int = 0
    fec_bytes: int = 0
    retransmitted_bytes: int = 0
    control_bytes: int = 0  # POLLs
    rounds: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class ImageSender:
    """Sends one image. Call ``start(now)``, then ``on_feedback`` / ``on_timer``; each returns Datagrams."""

    def __init__(self, image_id: int, image: EncodedImage, config: TransportConfig):
        if not 0 <= image_id <= 0xFFFF:
            raise MiscError(f"image id {image_id} out of range")
        self.image_id = image_id
        self.config = config
        self.blocks = make_blocks(image, config)
        self.payload_bytes = image.payload_bytes()
        self.stats = SenderStats()
        # idle -> waiting (feedback modes) -> done | failed; a sender that gives up goes through "closing":
        # it sends the final POLL and takes the receiver's answer as the outcome, so both sides agree;
        # "unconfirmed" when even that exchange failed (the one case where the two may differ, said so).
        self.state = "idle"
        self.failure = ""
        self.started_at = 0.0
        self.timer_at: float | None = None
        self._repairs_sent = [0] * len(self.blocks)
        self._token = 0
        self._poll_times: dict[int, float] = {}
        self._repairs_at_poll: dict[int, list[int]] = {}
        self._round_first_token = 0
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rto = config.rto_initial_s
        self._probes = 0
        self._final_tries = 0

    # -- packets
    def _data(self, block: Block, symbol: int, role: str) -> Datagram:
        payload = block.symbols[symbol] if symbol < block.k else block.repair(symbol - block.k)
        data = Packet(DATA, self.image_id, block.index, symbol, block.k, payload).encode()
        s = self.stats
        s.packets_sent += 1
        s.wire_bytes += len(data)
        if role == "source":
            s.source_bytes += len(data)
        elif role == "repair":
            s.fec_bytes += len(data)
        else:
            s.retransmitted_bytes += len(data)
        return Datagram(data, role, self.image_id)

    def _fresh_repairs(self, block: Block, count: int, role: str) -> list[Datagram]:
        """Up to ``count`` repair symbols never sent before; fewer once the 16-bit symbol ids run out."""
        first = block.k + self._repairs_sent[block.index]
        count = max(0, min(count, MAX_SYMBOL_ID + 1 - first))
        self._repairs_sent[block.index] += count
        return [self._data(block, s, role) for s in range(first, first + count)]

    def _poll(self, now: float) -> Datagram:
        self._token = self._token % (FINAL_TOKEN - 1) + 1  # 1 .. 0xFFFE
        self._poll_times[self._token] = now
        self._repairs_at_poll[self._token] = list(self._repairs_sent)
        self.timer_at = now + self._rto
        return self._control(Packet(POLL, self.image_id, 0, self._token, POLL_ASK))

    def _control(self, packet: Packet) -> Datagram:
        data = packet.encode()
        self.stats.packets_sent += 1
        self.stats.wire_bytes += len(data)
        self.stats.control_bytes += len(data)
        return Datagram(data, "poll", self.image_id)

    def _give_up(self, now: float, why: str) -> list[Datagram]:
        """Stop sending the image: the final POLL asks the receiver to settle it (complete, or abandoned)."""
        self.state, self.failure = "closing", why
        return self._final_poll(now)

    def _final_poll(self, now: float) -> list[Datagram]:
        if self._final_tries >= FINAL_TRIES:  # no common outcome could be reached: say so, claim nothing
            self.state, self.timer_at = "unconfirmed", None
            self.failure += "; unconfirmed: the final POLL was not answered, the receiver may still complete it"
            return []
        self._final_tries += 1
        self.timer_at = now + max(self._rto, self.config.rto_min_s)
        return [self._control(Packet(POLL, self.image_id, 0, FINAL_TOKEN, POLL_FINAL))]

    # -- events
    def start(self, now: float) -> list[Datagram]:
        self.started_at = now
        # Every source symbol first, in layer order, so each stage completes as early as the rate allows
        # when nothing is lost; the repair symbols follow (most important block first) and only cost
        # time when they are needed.
        out = [self._data(block, s, "source") for block in self.blocks for s in range(block.k)]
        if self.config.uses_feedback:
            # hybrid polls before its repairs: the answer comes back while they drain, and only what
            # they cannot cover is sent again (see on_feedback), saving most of a round trip.
            self.state = "waiting"
            self._round_first_token = self._token % (FINAL_TOKEN - 1) + 1
            out.append(self._poll(now))
        else:
            self.state = "done"
        if self.config.uses_fec:
            for block in self.blocks:
                rate = self.config.strong_rate if block.strong else self.config.pixel_rate
                out += self._fresh_repairs(block, repair_count(block.k, rate), "repair")
        return out

    def on_timer(self, now: float) -> list[Datagram]:
        """The retransmission timer fired: back off and probe with a fresh POLL."""
        if self.state not in ("waiting", "closing") or self.timer_at is None or now < self.timer_at:
            return []
        if self.state == "closing":
            return self._final_poll(now)
        if (late := self._out_of_time(now)) is not None:
            return self._give_up(now, late)
        self._probes += 1
        if self._probes > 2 * self.config.max_rounds:
            return self._give_up(now, f"no feedback after {self._probes - 1} probes")
        self._rto = min(self._rto * 2, self.config.rto_max_s)
        return [self._poll(now)]

    def on_feedback(self, feedback: tpb.Feedback, now: float) -> list[Datagram]:
        if self.state == "closing":
            if feedback.token == FINAL_TOKEN:  # the receiver's word settles it
                self.timer_at = None
                if feedback.complete:
                    self.state, self.failure = "done", ""
                else:
                    self.state, self.failure = "failed", self.failure + "; the receiver abandoned the image"
            return []
        if self.state != "waiting":
            return []
        sent_at = self._poll_times.get(feedback.token)
        if sent_at is None or not self._in_current_round(feedback.token):
            return []  # stale: a newer round already acted on fresher news
        self._sample_rtt(now - sent_at)
        self._probes = 0
        self._final_tries = 0
        if feedback.complete:
            self.state, self.timer_at = "done", None
            return []
        if (late := self._out_of_time(now)) is not None:
            return self._give_up(now, late)
        if self.stats.rounds >= self.config.max_rounds:
            return self._give_up(now, f"not complete after {self.stats.rounds} retransmission rounds")
        self.stats.rounds += 1
        status = {b.block: b for b in feedback.blocks if b.block < len(self.blocks)}
        sent_at_poll = self._repairs_at_poll[feedback.token]
        out: list[Datagram] = []
        for block in self.blocks:
            st = status.get(block.index)
            if st is not None and st.decoded:
                continue
            if block.fec:
                have = st.received if st is not None else 0
                # repairs sent after that POLL are still on their way: count them as coming
                in_flight = self._repairs_sent[block.index] - sent_at_poll[block.index]
                need = block.k - have - in_flight
                if need > 0:
                    fresh = self._fresh_repairs(block, need, "retransmit")
                    if len(fresh) < need and st is not None:  # ids used up: the missing source symbols again
                        fresh += [self._data(block, s, "retransmit") for s in st.missing[: need - len(fresh)]
                                  if s < block.k]
                    out += fresh
            else:
                missing = sorted({m for m in st.missing if m < block.k}) if st is not None else range(block.k)
                if st is not None and not st.missing:
                    missing = range(block.k)  # nothing named missing yet not decoded: resend all
                out += [self._data(block, s, "retransmit") for s in missing]
        self._round_first_token = self._token % (FINAL_TOKEN - 1) + 1
        out.append(self._poll(now))
        return out

    # -- helpers
    def _in_current_round(self, token: int) -> bool:
        return ((token - self._round_first_token) & 0xFFFF) <= ((self._token - self._round_first_token) & 0xFFFF)

    def _sample_rtt(self, rtt: float) -> None:  # RFC 6298
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        self._rto = min(max(self._srtt + 4 * self._rttvar, self.config.rto_min_s), self.config.rto_max_s)

    def _out_of_time(self, now: float) -> str | None:
        deadline = self.config.deadline_s
        if deadline is not None and now - self.started_at >= deadline:
            return f"deadline of {deadline:g} s passed"
        return None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "unconfirmed")


# ---------------------------------------------------------------- receiver

# Why a packet or a block was dropped: the keys of ReceiverStats.drops (proto/PROTOCOL.md, "Limits").
PACKET_DROPS = ("short", "oversize", "checksum", "version", "kind", "fields", "images", "memory", "symbol-size",
                "duplicate", "redundant")
BLOCK_DROPS = ("units", "header-mismatch", "fec")


def _is_native_panic(exc: BaseException) -> bool:
    # pyo3's PanicException (a Rust assertion inside raptorq) derives from BaseException, so a plain
    # ``except Exception`` lets it end the thread; it is the one BaseException we take as a bad block.
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


@dataclass
class _BlockState:
    k: int
    symbols: dict[int, bytes] = field(default_factory=dict)
    held: int = 0  # bytes in symbols
    decoded: bool = False
    fec_size: int | None = None  # the one symbol size once a repair symbol has been seen
    decoder: object | None = None


@dataclass
class LayerArrival:
    image_id: int
    header: pb.Header
    layer: pb.Layer


@dataclass
class Received:
    """What one datagram did: the verified image id it counted for (None if dropped), layers, replies."""

    image_id: int | None
    arrivals: list[LayerArrival]
    feedback: list[bytes]
    dropped: str | None = None  # why the packet was dropped (PACKET_DROPS), if it was
    block_bad: str | None = None  # why the block it completed was dropped (BLOCK_DROPS), if it was
    abandoned: bool = False  # a final POLL ended this (incomplete) image: its state is gone


@dataclass
class ReceiverStats:
    packets_received: int = 0
    bytes_received: int = 0
    feedback_sent: int = 0
    feedback_bytes: int = 0
    drops: dict[str, int] = field(default_factory=dict)  # packet drops by reason (PACKET_DROPS)
    blocks_bad: dict[str, int] = field(default_factory=dict)  # blocks that passed packet checks, by reason

    @property
    def packets_bad(self) -> int:
        """Packets dropped for anything but being a duplicate or redundant."""
        return sum(n for reason, n in self.drops.items() if reason not in ("duplicate", "redundant"))

    @property
    def packets_duplicate(self) -> int:
        return self.drops.get("duplicate", 0) + self.drops.get("redundant", 0)

    def as_dict(self) -> dict:
        return {"packets_received": self.packets_received, "bytes_received": self.bytes_received,
                "feedback_sent": self.feedback_sent, "feedback_bytes": self.feedback_bytes,
                "drops": dict(self.drops), "blocks_bad": dict(self.blocks_bad)}


class _ImageState:
    def __init__(self) -> None:
        self.blocks: dict[int, _BlockState] = {}
        self.header: pb.Header | None = None
        self.layers: dict[str, pb.Layer] = {}

    @property
    def complete(self) -> bool:
        return self.header is not None and len(self.layers) >= self.header.layer_count


class TransportReceiver:
    """Reassembles the images of one sender stream; ``on_datagram`` returns what one datagram did.

    The work and memory one packet can cause are bounded: the checksum is checked before any state is
    touched, a block holds at most MAX_BLOCK_BYTES, all undecoded blocks together ``max_buffered_bytes``,
    and a packet is fed to the FEC decoder once (the decoder keeps its state between packets).
    """

    def __init__(self, max_images: int = 256, max_symbol_bytes: int = 65000,
                 max_buffered_bytes: int = 64 * 1024 * 1024, require_ack: bool = False):
        self.images: dict[int, _ImageState] = {}  # images in flight; finished ones are released
        # outcome of the most recent finished images ("complete" / "abandoned"): late packets are redundant
        # and POLLs are answered from it, with no state kept
        self.finished: OrderedDict[int, str] = OrderedDict()
        # require_ack: "complete" is reported only after acknowledge(image_id), i.e. once the node has
        # stored the image; until then the image is held as it is
        self.require_ack = require_ack
        self.stats = ReceiverStats()
        self.max_images = max_images
        self.max_symbol_bytes = max_symbol_bytes
        self.max_buffered_bytes = max_buffered_bytes  # symbols of undecoded blocks, all images together
        self.buffered_bytes = 0

    def _drop(self, reason: str, image_id: int | None = None) -> Received:
        self.stats.drops[reason] = self.stats.drops.get(reason, 0) + 1
        return Received(image_id, [], [], dropped=reason)

    def on_datagram(self, data: bytes) -> Received:
        self.stats.packets_received += 1
        self.stats.bytes_received += len(data)
        try:
            packet = decode_packet(data)
        except PacketError as exc:
            return self._drop(exc.reason)
        if packet.kind == POLL:  # counted for an image only if it has one: a POLL creates no state
            return self._on_poll(packet)
        if packet.kind != DATA:
            return self._drop("kind")
        return self._on_data(packet)

    def image_complete(self, image_id: int) -> bool:
        """Complete, and acknowledged where that is required."""
        return self.finished.get(image_id) == "complete"

    def forget(self, image_id: int) -> None:
        state = self.images.pop(image_id, None)
        if state is not None:
            self.buffered_bytes -= sum(b.held for b in state.blocks.values())

    def acknowledge(self, image_id: int) -> None:
        """The node has stored the complete image: report it complete from now on, and release its state."""
        state = self.images.get(image_id)
        if state is not None and state.complete:
            self._finish(image_id, "complete")

    def _finish(self, image_id: int, outcome: str) -> None:
        self.forget(image_id)
        self.finished[image_id] = outcome
        self.finished.move_to_end(image_id)
        while len(self.finished) > REMEMBERED_IMAGES:
            self.finished.popitem(last=False)

    def _on_poll(self, poll: Packet) -> Received:
        image_id, abandoned = poll.image_id, False
        state = self.images.get(image_id)
        if poll.k == POLL_FINAL and state is not None and not (state.complete and self.require_ack):
            # the sender has given up: settle the image now, so both sides report the same outcome
            # (a complete image still awaiting its acknowledgement is the node's to settle)
            abandoned = not state.complete
            self._finish(image_id, "abandoned" if abandoned else "complete")
        known = image_id if image_id in self.images or image_id in self.finished else None
        return Received(known, [], [self._feedback(poll)], abandoned=abandoned)
    def _on_data(self, p: Packet) -> Received:
        size = len(p.payload)
        if (p.block >= MAX_BLOCKS or not 1 <= p.k <= MAX_SYMBOLS or size == 0
                or size > self.max_symbol_bytes):
            return self._drop("fields")
        if p.image_id in self.finished:  # a late or extra symbol of an image already settled
            return self._drop("redundant", p.image_id)
        image = self.images.get(p.image_id)
        if image is None:
            if len(self.images) >= self.max_images:
                return self._drop("images")
            image = self.images[p.image_id] = _ImageState()
        block = image.blocks.get(p.block)
        if block is None:
            block = image.blocks[p.block] = _BlockState(p.k)
        elif block.k != p.k:
            return self._drop("fields", p.image_id)
        if block.decoded:  # a repair (or a resend) that arrived after its block was rebuilt: expected
            return self._drop("redundant", p.image_id)
        if p.symbol in block.symbols:
            return self._drop("duplicate", p.image_id)
        if p.symbol >= p.k or block.fec_size is not None:  # a repair symbol: this is a FEC block
            if not _fec_symbol_ok(p.k, size) or block.fec_size not in (None, size):
                return self._drop("symbol-size", p.image_id)
            if block.fec_size is None:  # every symbol of a FEC block has this size: evict any other
                block.fec_size = size
                for sid in [s for s, v in block.symbols.items() if len(v) != size]:
                    self._evict(block, sid)
        if block.held + size > MAX_BLOCK_BYTES or self.buffered_bytes + size > self.max_buffered_bytes:
            return self._drop("memory", p.image_id)  # memory stays bounded whatever a sender claims
        block.symbols[p.symbol] = p.payload
        block.held += size
        self.buffered_bytes += size
        data = self._try_decode(block, p.symbol)
        if data is None:
            return Received(p.image_id, [], [])
        self.buffered_bytes -= block.held
        block.symbols, block.held, block.decoder = {}, 0, None  # free memory; the units live on in image.layers
        if data is _FAILED:  # start the block afresh: feedback asks for it again, and a resend can rebuild it
            block.fec_size = None
            return self._block_bad(p.image_id, "fec")
        block.decoded = True
        try:
            header, layers = unpack_units(data)
        except BitstreamError:
            return self._block_bad(p.image_id, "units")
        if image.header is None:
            image.header = header
        elif header.SerializeToString() != image.header.SerializeToString():
            return self._block_bad(p.image_id, "header-mismatch")
        arrivals = []
        for layer in layers:
            name = layer_name(layer)
            if name not in image.layers:
                image.layers[name] = layer
                arrivals.append(LayerArrival(p.image_id, header, layer))
        if image.complete and not self.require_ack:
            self._finish(p.image_id, "complete")
        return Received(p.image_id, arrivals, [])

    def _block_bad(self, image_id: int, reason: str) -> Received:
        self.stats.blocks_bad[reason] = self.stats.blocks_bad.get(reason, 0) + 1
        return Received(image_id, [], [], block_bad=reason)

    def _evict(self, block: _BlockState, sid: int) -> None:
        n = len(block.symbols.pop(sid))
        block.held -= n
        self.buffered_bytes -= n
        self.stats.drops["symbol-size"] = self.stats.drops.get("symbol-size", 0) + 1

    def _try_decode(self, block: _BlockState, newest: int):
        """The block's bytes once it can be rebuilt; None until then; _FAILED if FEC decoding failed."""
        k, symbols = block.k, block.symbols
        if len(symbols) >= k and all(s in symbols for s in range(k)):  # systematic: the source symbols
            return b"".join(symbols[s] for s in range(k))
        if block.fec_size is None or len(symbols) < k:
            return None
        t = block.fec_size
        try:
            if block.decoder is None:  # the k-th symbol: start the decoder with everything held
                block.decoder = raptorq.Decoder.with_defaults(k * t, t + 4)
                feed = list(symbols)
            else:
                feed = [newest]
            for sid in feed:
                result = block.decoder.decode(_payload_id(sid) + symbols[sid])
                if result is not None:
                    return bytes(result) if len(result) == k * t else _FAILED
        except BaseException as exc:
            if not _is_native_panic(exc):
                raise
            return _FAILED
        return None

    def _feedback(self, poll: Packet) -> bytes:
        image = self.images.get(poll.image_id)
        fb = tpb.Feedback(token=poll.symbol, complete=self.finished.get(poll.image_id) == "complete")
        if image is not None and not fb.complete:
            room = MAX_FEEDBACK_MISSING
            for index, block in sorted(image.blocks.items()):
                missing = [] if block.decoded else [s for s in range(block.k) if s not in block.symbols]
                if len(missing) > room:
                    break  # the blocks left out read as "nothing received": the sender resends them whole
                room -= len(missing)
                fb.blocks.add(block=index, received=len(block.symbols), decoded=block.decoded, missing=missing)
        data = Packet(FEEDBACK, poll.image_id, 0, poll.symbol, 0, fb.SerializeToString()).encode()
        self.stats.feedback_sent += 1
        self.stats.feedback_bytes += len(data)
        return data


_FAILED = object()


def _fec_symbol_ok(k: int, size: int) -> bool:
    """Symbol sizes our senders produce for FEC blocks, and raptorq 2.0 decodes correctly."""
    return size >= MIN_FEC_SYMBOL and size % FEC_ALIGN == 0 and k * size <= MAX_BLOCK_BYTES


def _payload_id(symbol: int) -> bytes:
    """RFC 6330's FEC payload id: source block number (always 0: one source block) and the 24-bit ESI."""
    return b"\x00" + symbol.to_bytes(3, "big")


def parse_feedback(data: bytes) -> tuple[int, tpb.Feedback]:
    """(image id, Feedback) from a FEEDBACK packet; PacketError if it is not one."""
    packet = decode_packet(data)
    if packet.kind != FEEDBACK:
        raise PacketError(f"expected a feedback packet, got {packet.kind}", "kind")
    try:
        return packet.image_id, tpb.Feedback.FromString(packet.payload)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise PacketError(f"malformed feedback: {exc}", "feedback") from None

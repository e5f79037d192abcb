"""Transport endpoints, sans I/O: the same state machines run in virtual time (SimPy) and live (gRPC).

Sender side (``ImageSender``): an encoded image becomes *blocks*. Block 0 carries the tiny, most
important units (header, semantic, map) so they share one packet; each pixel level is a block of its own,
in stream order. Every block starts with the image header, so any block that arrives is decodable even if
block 0 is lost. A block is cut into k source symbols of one size; FEC adds repair symbols from RaptorQ
(RFC 6330, Apache-2.0 ``raptorq`` package), with unequal protection (``strong_rate`` for block 0,
``pixel_rate`` for pixel blocks, as code rates k/n). FEC symbols are whole packets unless the losses seen
are isolated (then small blocks are cut finer), and the repair adapts to the loss the sender measured.

Error control modes:
  none    send every source symbol once; the receiver uses what completes.
  fec     source + repair symbols once, interleaved round-robin across blocks, no feedback.
  arq     source once with a POLL after block 0 and one at the end; the receiver answers with Feedback
          (selective NACKs); every hole sent before the answered POLL is resent at once (RACK, RFC 8985),
          until complete, ``max_rounds`` or the deadline.
  hybrid  arq's rounds with fresh repair symbols (any k of a block decode), and repair up front only where
          the measured loss makes a round likely.
Round-trip times from POLL to Feedback drive the probe timer (RFC 6298's SRTT and RTTVAR, RFC 8985's
tail-loss probe, sent as a train of POLLs); the sender's view of its path (RTT, delivery rate, loss rate and
burst length) is a ``PathEstimate`` that the images of one stream may share. With a deadline, pixel blocks
that can no longer arrive in time are given up (never the semantic + map block). proto/PROTOCOL.md section 8.

Receiver side (``TransportReceiver``): verifies packets (checksum first, sizes, limits), reassembles blocks
(loss, duplication and reordering tolerated), decodes FEC, parses units and reports each layer once;
answers POLLs with Feedback.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import raptorq
from google.protobuf.message import DecodeError
from scipy.stats import binom

from miscnet.channel.packet import DATA, FEEDBACK, HEADER_BYTES, POLL, Datagram, Packet, PacketError, decode_packet
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
    fec_min_symbols: int = 4  # once losses are seen to be isolated, small FEC blocks are cut this finely
    max_rounds: int = 12  # ARQ rounds after the first
    deadline_s: float | None = None  # give up this long after the first packet
    # RFC 6298's 1 s initial RTO would make an image whose first answer is lost wait a second: a probe
    # that comes too early costs 12 bytes, so the first one goes after 0.3 s
    rto_initial_s: float = 0.3
    rto_min_s: float = 0.1
    rto_max_s: float = 1.0  # far short of RFC 6298's 60 s: probes are 12-byte POLLs, and a link that
    # recovers from an outage should be noticed within a second

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


def make_blocks(image: EncodedImage, config: TransportConfig, fine_symbols: int = 1) -> list[Block]:
    """The image's blocks; ``fine_symbols`` > 1 cuts small FEC blocks that many ways (see ``_cut``)."""
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
        blocks.append(_cut(index, tuple(layer_name(ly) for ly in group), strong, data, config, fine_symbols))
    return blocks


def _cut(index: int, names: tuple[str, ...], strong: bool, data: bytes, config: TransportConfig,
         fine_symbols: int = 1) -> Block:
    n = len(data)
    if not config.uses_fec:
        t = min(config.mtu, n)
        symbols = [data[i : i + t] for i in range(0, n, t)]  # the last one may be short: no padding
    else:
        # Whole packets by default: under bursts every extra packet is one more chance to be hit, so a
        # small block in 4 symbols + 1 repair fares worse than in 1 + 1 (measured: experiments/bench_transport).
        # Finer symbols pay only where losses are isolated, so the sender cuts finer once it has seen that.
        mtu = config.mtu - config.mtu % FEC_ALIGN
        k = math.ceil(n / mtu)
        if k < fine_symbols:  # finer symbols: one repair covers one loss without a full copy
            k = max(k, min(fine_symbols, n // MIN_FEC_SYMBOL))
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


def block_failure(k: int, r: int, loss: float, burst: float = 1.0, depth: int = 1) -> float:
    """Probability that a block of k source symbols sent with r repairs gets fewer than k of them.

    Losses come in bursts of ``burst`` packets on average, so a burst starts at a packet with probability
    loss / burst; with the send order interleaved over ``depth`` blocks, one burst takes about
    ceil(burst / depth) symbols of a block. The block fails when the bursts starting at its k + r packets
    take more than r symbols (a binomial tail).
    """
    if loss <= 0.0:
        return 0.0
    burst = max(1.0, burst)
    hit = max(1, math.ceil(burst / max(1, depth) - 1e-9))
    return float(binom.sf(r // hit, k + r, min(1.0, loss / burst)))


def repairs_for(k: int, loss: float, burst: float, depth: int, failure: float, most: int) -> int:
    """Fewest repairs (at most ``most``) that bring ``block_failure`` to ``failure`` or below (it falls as
    r grows: a binary search, so a 4096-symbol block costs a dozen evaluations)."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi) // 2
        if block_failure(k, mid, loss, burst, depth) <= failure:
            hi = mid
        else:
            lo = mid + 1
    return lo


# ---------------------------------------------------------------- what a sender learns of its path

QUEUE_SAMPLES = 8
PATH_MIN_FATES = 20  # packets whose fate was reported before the loss estimate is used
PATH_WINDOW = 400  # the loss counters halve past this many packets: the estimate follows a changing path
ISOLATED_BURST = 1.5  # mean loss burst (packets) under which losses count as isolated: finer FEC symbols pay
HYBRID_PAYS = 0.2  # hybrid sends repair up front for a block only when it would otherwise need a round this often
HYBRID_RESIDUAL = 0.1  # ... and then as much as brings that down to this (the feedback rounds mop up the rest)
FEC_RESIDUAL = 0.01  # fec without feedback: repairs for this residual failure once the loss is known
ROUND_RESIDUAL = 0.1  # a hybrid retransmission round sends enough fresh repairs to succeed this often


@dataclass
class PathEstimate:
    """What a sender has learnt from FEEDBACK about its path: round-trip time (RFC 6298), delivery rate,
    loss rate and mean loss burst. One estimate may be shared by the images of one stream, so an image
    starts from what the previous ones measured (``ImageSender(..., path=estimate)``)."""

    srtt: float | None = None
    rttvar: float = 0.0
    min_rtt: float | None = None
    rate_bps: float | None = None  # delivery rate (bits per second), from the spacing of answers
    delivered: float = 0.0  # packets reported delivered (halved past PATH_WINDOW)
    lost: float = 0.0  # packets reported lost
    bursts: float = 0.0  # runs of consecutive losses among them
    _last_lost: bool = False
    # (bytes sent ahead of a POLL in its batch, its round trip): the newest few, for the time a POLL's answer
    # is due behind a queue of its own image's bytes (ImageSender._pto)
    queue_samples: list[tuple[int, float]] = field(default_factory=list)

    def rtt_sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.min_rtt = rtt if self.min_rtt is None else min(self.min_rtt, rtt)

    def queue_sample(self, ahead_bytes: int, rtt: float) -> None:
        self.queue_samples = [*self.queue_samples[-(QUEUE_SAMPLES - 1):], (ahead_bytes, rtt)]

    def bare_rtt(self) -> float | None:
        """The round trip of a POLL with nothing of its own batch ahead of it, from the newest samples (so a
        queue that other images of the stream keep standing stays in it): the least a sample leaves once
        its batch is drained at the measured rate; without a rate, the least sampled round trip."""
        if not self.queue_samples:
            return None
        if self.rate_bps is None:
            return min(rtt for _, rtt in self.queue_samples)
        drain = 8 / self.rate_bps
        return max(0.0, min(rtt - ahead * drain for ahead, rtt in self.queue_samples))

    def answer_due(self, ahead_bytes: int) -> float | None:
        """When the answer to a POLL sent behind ``ahead_bytes`` of its batch is due (seconds after it), or
        None where the samples cannot tell. With a measured rate: the bare round trip plus the bytes at that
        rate. Without one, only for a batch no larger than a sampled one: the largest sample's round trip
        scaled by the bytes (all of it taken for queueing), and at least the least sampled round trip."""
        bare = self.bare_rtt()
        if bare is None:
            return None
        if self.rate_bps is not None:
            return bare + ahead_bytes * 8 / self.rate_bps
        ahead, rtt = max(self.queue_samples)
        return max(bare, rtt * ahead_bytes / ahead) if ahead_bytes <= ahead else None

    def rate_sample(self, bits: float, seconds: float) -> None:
        if seconds > 0 and bits > 0:
            sample = bits / seconds
            self.rate_bps = sample if self.rate_bps is None else 0.75 * self.rate_bps + 0.25 * sample

    def observe(self, fates: Iterable[bool]) -> None:
        """Fates (True: lost) of packets in send order, as the receiver's reports told them."""
        for lost in fates:
            if lost:
                self.lost += 1
                if not self._last_lost:
                    self.bursts += 1
            else:
                self.delivered += 1
            self._last_lost = lost
        if self.delivered + self.lost > PATH_WINDOW:
            self.delivered, self.lost, self.bursts = self.delivered / 2, self.lost / 2, self.bursts / 2

    @property
    def loss_rate(self) -> float | None:
        n = self.delivered + self.lost
        return self.lost / n if n >= PATH_MIN_FATES else None

    @property
    def mean_burst(self) -> float:
        return self.lost / self.bursts if self.bursts else 1.0

    @property
    def isolated(self) -> bool:
        """Losses were seen, and they come one at a time."""
        loss = self.loss_rate
        return loss is not None and loss > 0 and self.mean_burst < ISOLATED_BURST


# ---------------------------------------------------------------- sender

# Probes. Loss chains that step per packet (netem's gemodel) hold a burst for N packets however long the
# sender waits, so one POLL per timeout needs N timeouts: a probe is a train of POLLs (12 bytes each) that
# grows TRAIN_GROWTH-fold with every unanswered probe, at a steady interval for the first PROBE_STEADY
# probes; then the interval doubles (capped at rto_max_s). The first probe waits 2 * SRTT after the data
# (RFC 8985); the trains after it are due PROBE_RTTS bare round trips apart, since nothing of the image's is
# queued ahead of them any more (2 * SRTT, inflated by the image's own queue, left a burst of 50 packets
# 1.36 s to clear against 1.23 s: experiments/bench_transport.py, bursts of 16). Once the rate is measured,
# a train spends at most PROBE_SHARE of it.
POLL_TRAIN_MAX = 32
UNANSWERED_TRAIN_MAX = 16  # before the path has ever answered
BACKOFF_TRAIN = 16  # once the interval backs off: at most 16 POLLs (192 bytes) a second through a fade in time,
# and a per-packet burst that outlasted 1 + 4 + 16 + 32 POLLs is crossed in seconds, not tens (4 a second left
# one image 4.7 s in bursts of 16, bench_transport --seeds 250)
TRAIN_GROWTH = 4
PROBE_STEADY = 4
PROBE_SHARE = 0.1
PROBE_RTTS = 1.25
PTO_MARGIN = 1.25  # the first probe waits this many times the time the newest POLL's answer is due
GIVE_UP_ROUNDS_S = 5.0  # the sender gives up after 2 * max_rounds unanswered probes and 5 s per round of silence


@dataclass
class SenderStats:
    packets_sent: int = 0
    wire_bytes: int = 0
    source_bytes: int = 0
    fec_bytes: int = 0
    retransmitted_bytes: int = 0
    control_bytes: int = 0  # POLLs
    rounds: int = 0
    probes: int = 0  # timeouts that sent a probe (no feedback in time)
    blocks_dropped: int = 0  # pixel blocks given up because they could not arrive before the deadline

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class ImageSender:
    """Sends one image. Call ``start(now)``, then ``on_feedback`` / ``on_timer``; each returns Datagrams.

    ``path``: a PathEstimate shared with the stream's other images (a fresh one if None); ``deadline_s``:
    this image's deadline from its first packet (default ``config.deadline_s``).
    """

    def __init__(self, image_id: int, image: EncodedImage, config: TransportConfig,
                 path: PathEstimate | None = None, deadline_s: float | None = None):
        if not 0 <= image_id <= 0xFFFF:
            raise MiscError(f"image id {image_id} out of range")
        if deadline_s is not None and deadline_s <= 0:
            raise MiscError(f"deadline must be positive, not {deadline_s}")
        self.image_id = image_id
        self.config = config
        self.path = path if path is not None else PathEstimate()
        self.deadline_s = deadline_s if deadline_s is not None else config.deadline_s
        fine = config.fec_min_symbols if config.uses_fec and self.path.isolated else 1
        self.blocks = make_blocks(image, config, fine)
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
        # the scoreboard (RFC 8985's, by send order): every datagram gets a sequence number (not on the wire)
        self._seq = 0
        self._log: dict[int, tuple[int, int, int]] = {}  # seq -> (block, symbol, bytes); block -1: a POLL
        self._last_tx: dict[tuple[int, int], int] = {}  # (block, symbol) -> seq of its latest transmission
        self._first_repair_seq = [math.inf] * len(self.blocks)
        self._tx_seqs: list[list[int]] = [[] for _ in self.blocks]  # per block, seqs of its transmissions
        self._sent_at: dict[int, float] = {}  # POLL seq -> send time
        self._token = 0
        self._polls: dict[int, int] = {}  # token -> seq of the POLL, until answered
        self._answered: set[int] = set()  # POLL seqs answered
        self._probe_seqs: set[int] = set()  # POLLs of probe trains: sent while in trouble, not counted as fates
        self._acted = -1  # seq of the newest POLL whose answer was acted on: older answers are stale
        self._covered = 0  # packets below this seq have had their fate reported
        self._last_answer: tuple[int, float] | None = None  # (POLL seq, time) of the newest answer, for the rate
        self._newest_poll = -1
        self._batch_bytes = 0  # bytes sent by the current event (start, answer or timer) so far
        self._ahead: dict[int, int] = {}  # POLL seq -> bytes of its batch up to and including it
        self._reported_lost: dict[tuple[int, int], int] = {}  # (block, symbol) -> seq it was declared lost in
        self._reordering = False  # a symbol declared lost turned up later: wait RACK's reordering window
        self._suspects: dict[tuple[int, int], float] = {}  # holes inside the reordering window -> when lost
        self._decoded: set[int] = set()
        self._dropped: set[int] = set()  # pixel blocks given up for the deadline
        self._probes = 0  # unanswered probes in a row
        self._last_heard = 0.0  # when the newest answer came (or the image started)
        self._pto_at: float | None = None
        self._final_tries = 0

    # -- packets
    def _next_seq(self, block: int, symbol: int, size: int) -> int:
        seq = self._seq
        self._seq += 1
        self._batch_bytes += size
        self._log[seq] = (block, symbol, size)
        return seq

    def _data(self, block: Block, symbol: int, role: str) -> Datagram:
        payload = block.symbols[symbol] if symbol < block.k else block.repair(symbol - block.k)
        data = Packet(DATA, self.image_id, block.index, symbol, block.k, payload).encode()
        seq = self._next_seq(block.index, symbol, len(data))
        self._last_tx[(block.index, symbol)] = seq
        self._tx_seqs[block.index].append(seq)
        if symbol >= block.k:
            self._first_repair_seq[block.index] = min(self._first_repair_seq[block.index], seq)
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

    def _poll(self, now: float, probe: bool = False) -> Datagram:
        self._token = self._token % (FINAL_TOKEN - 1) + 1  # 1 .. 0xFFFE
        packet = Packet(POLL, self.image_id, 0, self._token, POLL_ASK)
        seq = self._next_seq(-1, self._token, len(packet.encode()))
        self._polls[self._token] = seq
        self._sent_at[seq] = now
        self._ahead[seq] = self._batch_bytes
        self._newest_poll = seq
        if probe:
            self._probe_seqs.add(seq)
        return self._control(packet)

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
        self.timer_at = now + max(self._rto(), self.config.rto_min_s)
        return [self._control(Packet(POLL, self.image_id, 0, FINAL_TOKEN, POLL_FINAL))]

    # -- timers (RFC 6298 and RFC 8985's tail-loss probe)
    def _rto(self) -> float:
        p = self.path
        if p.srtt is None:
            return self.config.rto_initial_s
        return min(max(p.srtt + 4 * p.rttvar, self.config.rto_min_s), self.config.rto_max_s)

    def _pto(self) -> float:
        """When to probe after the newest POLL: two round trips (RFC 8985), plus the time the bytes queued
        ahead of it take at the measured delivery rate; doubled for each probe that went unanswered."""
        p = self.path
        if p.srtt is None:
            base = self.config.rto_initial_s
        elif self._probes > 0 and p.min_rtt is not None:
            # probing: nothing of the image's own is queued ahead of a train, so its answer is due a bare
            # round trip after it rather than 2 * SRTT, which that queue inflates (the bare round trip of the
            # newest samples: a queue the stream's other images keep standing counts)
            bare = p.bare_rtt()
            base = max(PROBE_RTTS * (bare if bare is not None else p.min_rtt), self.config.rto_min_s)
        else:
            base = max(2 * p.srtt, self.config.rto_min_s)
            due = p.answer_due(self._ahead[self._newest_poll]) if self._newest_poll >= 0 else None
            if due is not None:
                # the newest POLL waits behind its batch: its answer is due when the batch has drained, which
                # 2 * SRTT (an SRTT of other batches) can overshoot by a whole copy of the image; never later
                # than 2 * SRTT (a probe that comes early costs one POLL)
                base = max(min(PTO_MARGIN * due, base), self.config.rto_min_s)
        if self._probes < PROBE_STEADY:  # the train grows first; the interval backs off after
            return base
        return min(base * 2 ** (self._probes - PROBE_STEADY + 1), max(self.config.rto_max_s, base))

    def _arm(self, now: float) -> None:
        times = [t for t in (self._pto_at, *self._suspects.values()) if t is not None]
        if self.deadline_s is not None:
            times.append(self.started_at + self.deadline_s)
        self.timer_at = min(times) if times else None

    def _sent_batch(self, now: float) -> None:
        self._pto_at = now + self._pto()
        self._arm(now)

    # -- events
    def start(self, now: float) -> list[Datagram]:
        self._batch_bytes = 0
        self.started_at = self._last_heard = now
        cfg = self.config
        self._drop_late_blocks(now)
        live = [b for b in self.blocks if b.index not in self._dropped]
        out: list[Datagram] = []
        if cfg.mode == "fec":
            # interleaved: round-robin across blocks, sources then repairs, so a burst takes one symbol of
            # several blocks rather than several of one
            out += self._interleave(live, [range(b.k) for b in live], "source")
            counts = [self._first_repairs(b, len(live)) for b in live]
            out += self._interleave_repairs(live, counts, "repair")
            self.state = "done"
            return out
        # Every source symbol first, in layer order, so each stage completes as early as the rate allows
        # when nothing is lost.
        for block in live:
            out += [self._data(block, s, "source") for s in range(block.k)]
            if cfg.uses_feedback and block.index == 0 and len(live) > 1:
                # an early POLL: the semantic block is confirmed (or resent) a round trip after it left, and
                # its answer gives the first RTT sample while the pixel blocks drain
                out.append(self._poll(now))
        if not cfg.uses_feedback:
            self.state = "done"
            return out
        self.state = "waiting"
        out.append(self._poll(now))
        if cfg.uses_fec:
            # hybrid polls before its repairs: the answer comes back while they drain, and only what they
            # cannot cover is sent again (see on_feedback)
            counts = [self._first_repairs(b, len(live)) for b in live]
            out += self._interleave_repairs(live, counts, "repair")
        self._sent_batch(now)
        return out

    def _first_repairs(self, block: Block, depth: int) -> int:
        """Repair symbols sent up front: the configured code rate for fec until the path's loss is known,
        then what that loss needs; for hybrid, only where the loss makes a retransmission round likely."""
        cfg, p = self.config, self.path
        rate = cfg.strong_rate if block.strong else cfg.pixel_rate
        most = repair_count(block.k, rate) if cfg.mode == "hybrid" else max(repair_count(block.k, rate), 4 * block.k)
        loss = p.loss_rate
        if loss is None:
            return repair_count(block.k, rate) if cfg.mode == "fec" else 0
        if cfg.mode == "fec":
            return repairs_for(block.k, loss, p.mean_burst, depth, FEC_RESIDUAL, most)
        if block_failure(block.k, 0, loss, p.mean_burst, depth) < HYBRID_PAYS:
            return 0  # a round trip now and then costs less than repair every time
        return repairs_for(block.k, loss, p.mean_burst, depth, HYBRID_RESIDUAL, most)

    def _interleave(self, blocks: list[Block], symbols: list, role: str) -> list[Datagram]:
        out, lists = [], [list(s) for s in symbols]
        for i in range(max((len(s) for s in lists), default=0)):
            for block, ids in zip(blocks, lists, strict=True):
                if i < len(ids):
                    out.append(self._data(block, ids[i], role))
        return out

    def _interleave_repairs(self, blocks: list[Block], counts: list[int], role: str) -> list[Datagram]:
        ids = []
        for block, count in zip(blocks, counts, strict=True):
            first = block.k + self._repairs_sent[block.index]
            count = max(0, min(count, MAX_SYMBOL_ID + 1 - first))
            self._repairs_sent[block.index] += count
            ids.append(range(first, first + count))
        return self._interleave(blocks, ids, role)

    def on_timer(self, now: float) -> list[Datagram]:
        """A timer fired: the reordering window of a suspect hole, or the probe timeout (nothing answered)."""
        if self.state not in ("waiting", "closing") or self.timer_at is None or now < self.timer_at:
            return []
        self._batch_bytes = 0
        if self.state == "closing":
            return self._final_poll(now)
        if (late := self._out_of_time(now)) is not None:
            return self._give_up(now, late)
        due = [key for key, at in self._suspects.items() if at <= now]
        if due:  # RACK: still not reported after the reordering window: lost
            for key in due:
                del self._suspects[key]
            out = [self._data(self.blocks[b], s, "retransmit") for b, s in sorted(due)
                   if b not in self._decoded and b not in self._dropped]
            if out:
                out.append(self._poll(now))
                self._sent_batch(now)
            else:
                self._arm(now)
            return out
        if self._pto_at is None or now < self._pto_at:
            self._arm(now)
            return []
        # the tail-loss probe: nothing answered in time. A train of POLLs (12 bytes each) that doubles with
        # every unanswered probe: one answer is all it takes to learn every hole and resend them at once.
        self._probes += 1
        self.stats.probes += 1
        silence = now - self._last_heard
        if self._probes > 2 * self.config.max_rounds and silence >= GIVE_UP_ROUNDS_S * self.config.max_rounds:
            return self._give_up(now, f"no feedback after {self._probes - 1} probes ({silence:.3g} s)")
        # short trains until the path has answered: before that, silence may as well be a long queue that
        # long trains would add to
        cap = POLL_TRAIN_MAX if self.path.srtt is not None else UNANSWERED_TRAIN_MAX
        if self._probes > PROBE_STEADY:  # backing off: a fade in time, where trains buy nothing
            cap = min(cap, BACKOFF_TRAIN)
        train = min(TRAIN_GROWTH ** (self._probes - 1), cap)
        if self.path.rate_bps is not None:
            affordable = self.path.rate_bps * PROBE_SHARE * self._pto() / (8 * HEADER_BYTES)
            train = max(1, min(train, int(affordable)))
        out = [self._poll(now, probe=True) for _ in range(train)]
        self._sent_batch(now)
        return out

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
        seq = self._polls.pop(feedback.token, None)
        if seq is None:
            return []  # not a POLL of this image, or answered already
        self._answered.add(seq)
        self.path.rtt_sample(now - self._sent_at[seq])
        self.path.queue_sample(self._ahead[seq], now - self._sent_at[seq])
        self._batch_bytes = 0
        if self._last_answer is not None:
            last_seq, last_time = self._last_answer
            # sent before the previous POLL reached the receiver (its answer less the way back, half the
            # least round trip): the link was busy between the two, so their answers' spacing is its rate
            if seq > last_seq and self._sent_at[seq] <= last_time - (self.path.min_rtt or 0.0) / 2:
                bits = 8 * sum(self._log[s][2] for s in range(last_seq + 1, seq + 1))
                self.path.rate_sample(bits, now - last_time)
        if self._last_answer is None or seq > self._last_answer[0]:
            self._last_answer = (seq, now)
        self._probes = 0  # something was acknowledged: no more backing off
        self._last_heard = now
        self._final_tries = 0
        if seq <= self._acted:
            self._rearm_after_answer(now)
            return []  # older than news already acted on
        self._acted = seq
        if feedback.complete:
            self.state, self.timer_at = "done", None
            return []
        if (late := self._out_of_time(now)) is not None:
            return self._give_up(now, late)
        status = {b.block: b for b in feedback.blocks if b.block < len(self.blocks)}
        missing = {index: set(st.missing) for index, st in status.items()}  # membership tests stay O(1)
        self._learn(seq, status, missing)
        for index, st in status.items():
            if st.decoded:
                self._decoded.add(index)
        self._drop_late_blocks(now)
        out = self._recover(seq, status, missing, now)
        if not out and not self._suspects and all(b.index in self._decoded or b.index in self._dropped
                                                   for b in self.blocks):
            if self._dropped:  # what can still arrive in time has: settle the image now
                names = ", ".join(n for b in self.blocks if b.index in self._dropped for n in b.layers)
                return self._give_up(now, f"deadline of {self.deadline_s:g} s: {names} could not arrive in time")
        if out:
            if self.stats.rounds >= self.config.max_rounds:
                return self._give_up(now, f"not complete after {self.stats.rounds} retransmission rounds")
            self.stats.rounds += 1
            out.append(self._poll(now))
            self._sent_batch(now)
        else:
            self._rearm_after_answer(now)
        return out

    def _rearm_after_answer(self, now: float) -> None:
        # RFC 8985: an acknowledgement re-arms the probe timer (whatever is outstanding gets its full PTO)
        self._pto_at = now + self._pto()
        self._arm(now)

    def _recover(self, poll_seq: int, status: dict, missing_ids: dict, now: float) -> list[Datagram]:
        """RACK (RFC 8985), with the POLL as the acknowledged packet: every hole sent before the answered
        POLL is lost (the link keeps order; with reordering seen, after the reordering window) and is
        resent at once, all of them in one batch; holes sent after it are still in flight."""
        out: list[Datagram] = []
        p = self.path
        window = (p.min_rtt or 0.0) / 4 if self._reordering else 0.0
        for key in list(self._suspects):  # a suspect hole the receiver now holds was only reordered
            st = status.get(key[0])
            if st is not None and (st.decoded or key[1] not in missing_ids[key[0]]):
                del self._suspects[key]
        for block in self.blocks:
            index = block.index
            if index in self._decoded or index in self._dropped:
                continue
            st = status.get(index)
            if not block.fec:
                missing = sorted(m for m in missing_ids[index] if m < block.k) if st is not None else range(block.k)
                if st is not None and not st.missing:
                    missing = range(block.k)  # nothing named missing yet not decoded: resend all
                for s in missing:
                    key = (index, s)
                    if self._last_tx[key] > poll_seq or key in self._suspects:
                        continue  # sent after the POLL: in flight
                    self._reported_lost[key] = self._last_tx[key]
                    if window > 0:
                        self._suspects[key] = now + window
                    else:
                        out.append(self._data(block, s, "retransmit"))
                continue
            have = st.received if st is not None else 0
            in_flight = len(self._tx_seqs[index]) - bisect.bisect_right(self._tx_seqs[index], poll_seq)
            need = block.k - have - in_flight
            if need <= 0:
                continue
            loss = p.loss_rate or 0.0
            send = repairs_for(need, loss, p.mean_burst, 1, ROUND_RESIDUAL, 4 * need) + need if loss else need
            fresh = self._fresh_repairs(block, send, "retransmit")
            if len(fresh) < need and st is not None:  # ids used up: the missing source symbols again
                fresh += [self._data(block, s, "retransmit") for s in st.missing[: need - len(fresh)] if s < block.k]
            out += fresh
        return out

    def _learn(self, poll_seq: int, status: dict, missing: dict) -> None:
        """Tell the path estimate the fate of every packet up to the answered POLL (in send order), where the
        report tells it: source symbols of blocks not decoded, blocks decoded before any repair, POLLs."""
        fates = []
        for seq in range(self._covered, poll_seq + 1):
            block, symbol, _size = self._log[seq]
            if block < 0:
                # probe trains are sent only while nothing answers: counting them would read one burst as a
                # loss rate near 1 (and make hybrid's rounds send several copies of everything)
                if seq not in self._probe_seqs:
                    fates.append(seq not in self._answered)
                continue
            st = status.get(block)
            key = (block, symbol)
            if st is not None and st.decoded:
                if self._first_repair_seq[block] > poll_seq:  # decoded from its source symbols alone
                    fates.append(False)
                continue
            if symbol >= self.blocks[block].k or self._last_tx[key] != seq:
                continue  # a repair symbol (only counted), or a symbol sent again since
            lost = st is None or symbol in missing[block]
            fates.append(lost)
            if not lost and key in self._reported_lost and self._reported_lost[key] == seq:
                self._reordering = True  # declared lost, yet it arrived: the link reorders
        self._covered = max(self._covered, poll_seq + 1)
        self.path.observe(fates)

    def _drop_late_blocks(self, now: float) -> None:
        """With a deadline and a measured rate: give up the pixel blocks (and the levels above them) that can
        no longer arrive in time; the semantic + map block is never given up."""
        if self.deadline_s is None or self.path.rate_bps is None:
            return
        p = self.path
        due = self.started_at + self.deadline_s
        one_way = (p.min_rtt or 0.0) / 2
        queued = 0.0
        for block in self.blocks:
            if block.index in self._decoded or block.index in self._dropped:
                continue
            queued += sum(len(s) + 12 for s in block.symbols) * 8
            if block.strong:
                continue
            if now + queued / p.rate_bps + one_way > due:
                later = [b.index for b in self.blocks if b.index >= block.index and not b.strong
                         and b.index not in self._decoded and b.index not in self._dropped]
                self._dropped.update(later)
                self.stats.blocks_dropped += len(later)
                self._suspects = {k: t for k, t in self._suspects.items() if k[0] not in self._dropped}
                return

    def _out_of_time(self, now: float) -> str | None:
        deadline = self.deadline_s
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

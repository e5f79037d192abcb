"""The transport's packet: a fixed 12-byte header, then the payload.

    byte 0     version (2 bits, = 1) | kind (3 bits) | reserved (3 bits, zero)
    bytes 1-2  image id (u16, per sender stream)
    byte 3     block index within the image (u8)
    bytes 4-5  symbol id (u16): 0..k-1 source symbols, k.. repair symbols; the round token for POLL
    bytes 6-7  k, the block's number of source symbols (u16)
    bytes 8-11 CRC-32 of bytes 0-7 and the payload

The header is counted on every packet in every figure (wire bytes = header + payload). The symbol size
is the payload length (all symbols of a FEC block have one size), so it needs no field of its own.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from miscnet.core.errors import BitstreamError

HEADER_BYTES = 12
VERSION = 1
MAX_PACKET_BYTES = 65535  # far above any MTU we use; anything larger is hostile

DATA, POLL, FEEDBACK = 0, 1, 2
KIND_NAMES = {DATA: "data", POLL: "poll", FEEDBACK: "feedback"}

_FIELDS = struct.Struct("!BHBHH")
_CRC = struct.Struct("!I")


class PacketError(BitstreamError):
    """A packet that fails its checksum, is truncated, too large or of an unknown version / kind.

    ``reason`` names the check that failed, for the drop counters (short, oversize, checksum, version, kind).
    """

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True, frozen=True)
class Packet:
    kind: int
    image_id: int
    block: int
    symbol: int
    k: int
    payload: bytes = b""

    def encode(self) -> bytes:
        head = _FIELDS.pack((VERSION << 6) | (self.kind << 3), self.image_id, self.block, self.symbol, self.k)
        return head + _CRC.pack(zlib.crc32(self.payload, zlib.crc32(head))) + self.payload


def decode_packet(data: bytes) -> Packet:
    """Parse and verify one packet; PacketError for anything a sender of ours would not produce."""
    if len(data) < HEADER_BYTES:
        raise PacketError(f"packet of {len(data)} bytes is shorter than its header", "short")
    if len(data) > MAX_PACKET_BYTES:
        raise PacketError(f"packet of {len(data)} bytes is over the {MAX_PACKET_BYTES} byte limit", "oversize")
    # the checksum first: no field of a packet that fails it is read, let alone acted on
    (crc,) = _CRC.unpack_from(data, 8)
    payload = data[HEADER_BYTES:]
    if zlib.crc32(payload, zlib.crc32(data[:8])) != crc:
        raise PacketError("packet checksum mismatch", "checksum")
    first, image_id, block, symbol, k = _FIELDS.unpack_from(data)
    version, kind, reserved = first >> 6, (first >> 3) & 7, first & 7
    if version != VERSION or reserved:
        raise PacketError(f"packet version {version} unknown", "version")
    if kind not in KIND_NAMES:
        raise PacketError(f"packet kind {kind} unknown", "kind")
    return Packet(kind, image_id, block, symbol, k, bytes(payload))


class Datagram:
    """Encoded packet bytes as the link carries them (the link reads ``size``); ``role`` is accounting."""

    __slots__ = ("data", "size", "role", "image_id", "flow")

    def __init__(self, data: bytes, role: str, image_id: int = 0, flow: int = 0):
        self.data = data
        self.size = len(data)
        self.role = role  # "source", "repair", "retransmit", "poll", "feedback"
        self.image_id = image_id
        self.flow = flow  # the sender it belongs to: a fair-queued shared link shares by it

    def __repr__(self) -> str:
        return f"Datagram({self.role}, {self.size} B)"

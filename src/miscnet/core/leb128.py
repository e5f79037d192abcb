"""LEB128, the unsigned varint of protobuf and AV1 (block unit lengths, OBU sizes): one implementation."""

from __future__ import annotations

from miscnet.core.errors import BitstreamError

MAX_BYTES = 5  # 35 bits: far above any length this project frames


def encode(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def decode(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """(value, position after it); BitstreamError naming ``what`` when truncated or over MAX_BYTES bytes."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift >= 7 * MAX_BYTES:
            raise BitstreamError(f"truncated or oversized {what}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7

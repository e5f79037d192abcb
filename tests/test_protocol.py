"""proto/PROTOCOL.md against the code: every test vector byte for byte, and an independent Node.js peer.

The vectors are parsed out of the document itself, so the spec, the generator (tests/interop/make_vectors.py)
and the Python implementation must agree; tests/interop/miscnet_peer.js, written from the spec alone, then
talks to the Python sender and receiver in both directions.
"""

import hashlib
import importlib.util
import itertools
import json
import random
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import raptorq

from miscnet.channel.packet import DATA, FEEDBACK, KIND_NAMES, POLL, Packet, PacketError, decode_packet
from miscnet.channel.transport import (
    BLOCK_DROPS,
    PACKET_DROPS,
    ImageSender,
    TransportConfig,
    TransportReceiver,
    _cut,
    pack_units,
    parse_feedback,
    unpack_units,
)
from miscnet.core.container import CODEC_NAMES, from_bytes, layer_name, layers_digest, to_bytes
from miscnet.core.errors import BitstreamError
from miscnet.v1 import bitstream_pb2 as pb
from miscnet.v1 import transport_pb2 as tpb

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "proto" / "PROTOCOL.md"
INTEROP = ROOT / "tests" / "interop"
GENERATOR = INTEROP / "make_vectors.py"
PEER = INTEROP / "miscnet_peer.js"
GOLDEN = sorted((ROOT / "tests" / "golden").glob("*.misc"))
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node (Node.js >= 20) is not on PATH, so the JavaScript "
                                "interop peer cannot run; install Node.js to run these checks")

VECTOR_NAMES = {"packet-data", "packet-poll", "packet-poll-final", "packet-feedback", "reject-payload-bit",
                "reject-header-bit", "reject-crc-field", "reject-version-stale-crc", "reject-version",
                "reject-reserved", "reject-kind", "reject-short", "reject-fields", "block-units", "image-none",
                "image-fec-block0", "misc-file", "misc-file-ref"}


def _generator():
    spec = importlib.util.spec_from_file_location("make_vectors", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_vectors = _generator()


# ---------------------------------------------------------------- reading the document

def _items(block: str) -> list[bytes]:
    """A hex block's items: '#' starts a comment, a blank line ends an item."""
    items, current = [], []
    for raw in block.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not raw.strip():
            if current:
                items.append(bytes.fromhex("".join(current)))
            current = []
        elif line:
            current.append(line)
    if current:
        items.append(bytes.fromhex("".join(current)))
    return items


def _section(text: str) -> str:
    return text[text.index(make_vectors.BEGIN) : text.index(make_vectors.END) + len(make_vectors.END)]


def parse_vectors(text: str) -> dict[str, tuple[list[bytes], dict]]:
    vectors = {}
    for chunk in re.split(r"^vector: ", _section(text), flags=re.M)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        hex_block = re.search(r"```hex\n(.*?)```", chunk, re.S)
        json_block = re.search(r"```json\n(.*?)```", chunk, re.S)
        assert hex_block and json_block, f"vector {name}: needs a ```hex and a ```json block"
        assert name not in vectors, f"vector {name} appears twice"
        vectors[name] = (_items(hex_block.group(1)), json.loads(json_block.group(1)))
    return vectors


DOC_TEXT = DOC.read_text(encoding="utf-8")
VECTORS = parse_vectors(DOC_TEXT)


def vector(name: str) -> tuple[list[bytes], dict]:
    return VECTORS[name]


def doc_image():
    return from_bytes(vector("misc-file")[0][0])


def packet_fields(data: bytes) -> dict:
    p = decode_packet(data)
    return {"kind": KIND_NAMES[p.kind], "image_id": p.image_id, "block": p.block, "symbol": p.symbol, "k": p.k,
            "crc32": data[8:12].hex(), "payload_len": len(p.payload)}


def layer_fields(layer: pb.Layer) -> dict:
    unit = layer.SerializeToString()
    return {"name": layer_name(layer), "kind": layer.kind, "level": layer.level, "codec": layer.codec,
            "codec_name": CODEC_NAMES[layer.codec], "payload_bytes": len(layer.payload), "unit_bytes": len(unit),
            "sha256": hashlib.sha256(unit).hexdigest()}


def feedback_fields(fb: tpb.Feedback) -> dict:
    return {"token": fb.token, "complete": fb.complete,
            "blocks": [{"block": b.block, "received": b.received, "decoded": b.decoded, "missing": list(b.missing)}
                       for b in fb.blocks]}


def spec_digest(layers) -> str:
    """Section 9, written out: SHA-256 over u32be(len) + canonical bytes, layers in stream order."""
    rank = {pb.LAYER_KIND_SEMANTIC: 0, pb.LAYER_KIND_MAP: 1, pb.LAYER_KIND_PIXEL: 2}
    h = hashlib.sha256()
    for layer in sorted(layers, key=lambda ly: (rank[ly.kind], ly.level)):
        unit = layer.SerializeToString()
        h.update(struct.pack(">I", len(unit)) + unit)
    return h.hexdigest()


# ---------------------------------------------------------------- the document and its generator

def test_the_document_holds_every_vector():
    assert set(VECTORS) == VECTOR_NAMES
    for name, (items, fields) in VECTORS.items():
        assert items and isinstance(fields, dict), name
    for line in _section(DOC_TEXT).splitlines():
        if re.fullmatch(r"[0-9a-f]+", line):
            assert len(line) <= make_vectors.WRAP, f"hex line over {make_vectors.WRAP} digits: {line[:20]}..."


def test_vectors_regenerate_exactly():
    """The generator, run as a script on a freshly encoded sample, prints exactly the document's section."""
    proc = subprocess.run([sys.executable, str(GENERATOR)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == _section(DOC_TEXT), (
        "proto/PROTOCOL.md's vectors are stale: the code's output changed. If the wire format changed on "
        "purpose, update the spec and run `python tests/interop/make_vectors.py --write`.")


def test_wire_vectors_regenerate_from_the_documents_own_file():
    """The same without the encoder: from the document's .misc vector, so a failure here is the wire's."""
    assert make_vectors.generate(doc_image()) == _section(DOC_TEXT), (
        "the transport's bytes changed for the same layers: update PROTOCOL.md (make_vectors.py --write)")


# ---------------------------------------------------------------- single packets

@pytest.mark.parametrize("name", ["packet-data", "packet-poll", "packet-poll-final", "packet-feedback"])
def test_packet_vectors_decode_and_encode_byte_for_byte(name):
    (data,), fields = vector(name)
    p = decode_packet(data)
    assert fields["valid"] and fields["version"] == 1 == data[0] >> 6 and data[0] & 7 == 0
    assert {k: fields[k] for k in packet_fields(data)} == packet_fields(data)
    assert struct.unpack(">I", data[8:12])[0] == zlib.crc32(data[:8] + data[12:])
    assert Packet(p.kind, p.image_id, p.block, p.symbol, p.k, p.payload).encode() == data
    if p.kind == DATA:
        assert p.payload.hex() == fields["payload_hex"]
    else:
        assert p.block == 0 and p.k == 0 and p.symbol == fields["token"]
    if p.kind == POLL:
        assert p.payload == b""
    if p.kind == FEEDBACK:
        image_id, fb = parse_feedback(data)
        assert feedback_fields(fb) == fields["feedback"] and fb.token == p.symbol
        assert fb.SerializeToString() == p.payload  # canonical: re-encoding gives the same bytes


def test_final_poll_uses_token_ffff():
    (data,), fields = vector("packet-poll-final")
    assert decode_packet(data) == Packet(POLL, 7, 0, 0xFFFF, 0) and fields["token"] == 0xFFFF


def test_feedback_vector_is_what_the_receiver_answers():
    packets, _ = vector("image-none")
    (expected,), _ = vector("packet-feedback")
    rx = TransportReceiver()
    for data in packets[:-1]:
        p = decode_packet(data)
        if (p.block, p.symbol) not in {(1, 0), (2, 1)}:
            rx.on_datagram(data)
    assert rx.on_datagram(Packet(POLL, 7, 0, 1, 0).encode()).feedback == [expected]


@pytest.mark.parametrize("name", sorted(n for n in VECTOR_NAMES if n.startswith("reject-")))
def test_reject_vectors_are_dropped_with_their_reason(name):
    (data,), fields = vector(name)
    assert not fields["valid"] and fields["reject"] in PACKET_DROPS and len(data) == fields["length"]
    if fields["level"] == "packet":
        with pytest.raises(PacketError) as err:
            decode_packet(data)
        assert err.value.reason == fields["reject"]
    else:
        decode_packet(data)  # a valid packet, which the receiver's DATA rules refuse
    rx = TransportReceiver()
    received = rx.on_datagram(data)
    assert rx.stats.drops == {fields["reject"]: 1}
    assert received.arrivals == [] and received.feedback == [] and rx.images == {}


# ---------------------------------------------------------------- blocks, images, FEC, files

def test_block_units_vector():
    (data,), fields = vector("block-units")
    header, layers = unpack_units(data)
    assert len(data) == fields["length"]
    assert {"version": header.version, "width": header.width, "height": header.height,
            "layer_count": header.layer_count} == fields["header"]
    assert [layer_fields(ly) for ly in layers] == fields["layers"]
    assert pack_units(header, layers) == data
    for unit, (msg, body) in zip(fields["units"], [("Header", header), *(("Layer", ly) for ly in layers)],
                                 strict=True):
        raw = body.SerializeToString()
        start = unit["offset"] + unit["length_prefix_bytes"]
        assert unit["message"] == msg and unit["length"] == len(raw) and data[start : start + len(raw)] == raw
    assert unpack_units(data + bytes(10)) == (header, layers)  # zero padding ends the units


def test_image_none_vector_reassembles_bit_exact():
    packets, fields = vector("image-none")
    image = doc_image()
    assert [packet_fields(d) for d in packets] == fields["packets"]
    rx = TransportReceiver()
    arrivals = []
    for data in packets[:-1]:
        arrivals += rx.on_datagram(data).arrivals
    assert [layer_fields(a.layer) for a in arrivals] == fields["layers"] == [layer_fields(ly) for ly in image.layers]
    assert rx.image_complete(7) and rx.stats.drops == {}
    digest = layers_digest([a.layer for a in arrivals])
    assert digest == fields["digest"] == spec_digest(image.layers) == layers_digest(image.layers)
    (reply,) = rx.on_datagram(packets[-1]).feedback
    assert reply.hex() == fields["final_feedback"]
    assert feedback_fields(parse_feedback(reply)[1]) == fields["final_feedback_decoded"]
    # the packets are exactly what the sender makes, and the blocks are the spec's grouping
    sent = [d.data for d in ImageSender(7, image, TransportConfig(mode="none", mtu=fields["mtu"])).start(0.0)]
    assert sent == packets[:-1]
    for block in fields["blocks"]:
        symbols = [decode_packet(d).payload for d in packets[:-1] if decode_packet(d).block == block["block"]]
        assert [len(s) for s in symbols] == block["symbol_bytes"] and sum(map(len, symbols)) == block["length"]
        assert [layer_name(ly) for ly in unpack_units(b"".join(symbols))[1]] == block["layers"]


def test_fec_vector_rebuilds_from_repair_symbols():
    packets, fields = vector("image-fec-block0")
    k, t = fields["k"], fields["t"]
    assert [packet_fields(d) for d in packets] == fields["packets"]
    symbols = {decode_packet(d).symbol: decode_packet(d).payload for d in packets}
    assert sorted(symbols) == list(range(k + 2)) and {len(s) for s in symbols.values()} == {t}
    assert t >= 64 and t % 8 == 0 and fields["oti"] == {"F": k * t, "T": t, "Z": 1, "N": 1, "Al": 8}
    block = b"".join(symbols[i] for i in range(k))
    assert hashlib.sha256(block).hexdigest() == fields["block_sha256"]
    assert block[fields["length"] :] == bytes(fields["padding"]) and len(block) == k * t
    assert [layer_name(ly) for ly in unpack_units(block)[1]] == fields["layers"]
    assert [s.to_bytes(4, "big").hex() for s in sorted(symbols)] == fields["rfc6330_payload_ids"]
    # any k of the k + 2 symbols with at least one source symbol removed rebuild the block
    subsets = [c for c in itertools.combinations(sorted(symbols), k) if set(c) != set(range(k))]
    assert subsets
    for subset in subsets:
        decoder = raptorq.Decoder.with_defaults(k * t, t + 4)
        result = None
        for esi in subset:
            result = decoder.decode(b"\x00" + esi.to_bytes(3, "big") + symbols[esi])
            if result is not None:
                break
        assert result is not None and bytes(result) == block, subset
    # and the receiver does the same from the packets
    rx = TransportReceiver()
    arrivals = []
    for data in packets[1:]:  # without source symbol 0
        arrivals += rx.on_datagram(data).arrivals
    assert [layer_name(a.layer) for a in arrivals] == fields["layers"]


def test_fec_vector_matches_the_sender():
    packets, fields = vector("image-fec-block0")
    sender = ImageSender(7, doc_image(), TransportConfig(mode="fec", mtu=fields["mtu"]))
    assert [d.data for d in sender.start(0.0) if decode_packet(d.data).block == 0] == packets


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _spec_cut(n: int, mtu: int, fec: bool, fine_symbols: int = 1) -> tuple[int, int]:
    """Section 6's pseudo-code, transcribed: (k, t)."""
    if not fec:
        t = min(mtu, n)
        return _ceil(n, t), t
    m = mtu - mtu % 8
    k = _ceil(n, m)
    if k < fine_symbols:
        k = max(k, min(fine_symbols, n // 64))
    t = max(64, 8 * _ceil(_ceil(n, k), 8))
    return _ceil(n, t), t


@pytest.mark.parametrize("fec", [False, True])
def test_symbolisation_pseudocode_is_the_senders(fec):
    rng = random.Random(6330)
    cases = [(n, mtu) for n in (1, 2, 63, 64, 65, 127, 128, 182, 1000, 4096) for mtu in (64, 65, 100, 1200, 65000)]
    cases += [(rng.randint(1, 300_000), rng.randint(64, 65000)) for _ in range(300)]
    for n, mtu in cases:
        for min_symbols in (1, 4, 64):
            config = TransportConfig(mode="fec" if fec else "none", mtu=mtu, fec_min_symbols=min_symbols)
            try:
                block = _cut(0, ("x",), False, bytes(n), config, min_symbols)
            except Exception:  # noqa: BLE001 - over the limits: the spec's rule gives k > 4096 too
                k, t = _spec_cut(n, mtu, fec, min_symbols)
                assert k > 4096 or k * t > 4 * 1024 * 1024 or n > 4 * 1024 * 1024
                continue
            k, t = _spec_cut(n, mtu, fec, min_symbols)
            assert (block.k, len(block.symbols[0])) == (k, t), (n, mtu, min_symbols)
            if fec:
                assert t >= 64 and t % 8 == 0 and {len(s) for s in block.symbols} == {t}
            else:
                assert sum(map(len, block.symbols)) == n


def test_misc_vector_parses_and_rebuilds():
    (data,), fields = vector("misc-file")
    image = from_bytes(data)
    assert len(data) == fields["length"] and data[:2] == b"MI" == fields["magic"].encode() and data[2] == 2
    assert data[-4:].hex() == fields["crc32_le"] and struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4])
    assert f"{zlib.crc32(data[:-4]):08x}" == fields["crc32"] and fields["version"] == 2
    assert (image.width, image.height) == (fields["width"], fields["height"])
    assert fields["framing_bytes"] == len(data) - image.payload_bytes()
    assert [layer_fields(ly) for ly in image.layers] == fields["layers"]
    assert layers_digest(image.layers) == spec_digest(image.layers) == fields["digest"]
    assert fields["digest"] == vector("image-none")[1]["digest"]
    assert to_bytes(image) == data
    for bad in (data[:-1], b"MJ" + data[2:], data[:10] + bytes([data[10] ^ 1]) + data[11:]):
        with pytest.raises(BitstreamError):
            from_bytes(bad)


def test_ref_vector_holds_the_png_byte_for_byte():
    (data,), fields = vector("misc-file-ref")
    image = from_bytes(data)
    assert len(data) == fields["length"] and to_bytes(image) == data
    assert [layer_fields(ly) for ly in image.layers] == fields["layers"]
    assert layers_digest(image.layers) == spec_digest(image.layers) == fields["digest"]
    ref = image.layers[-1]
    assert ref.codec == pb.CODEC_PIXEL_REF == 37 and (ref.pixel.width, ref.pixel.height) == (4, 4)
    assert ref.payload == make_vectors.ref_png() and ref.payload.startswith(b"\x89PNG\r\n\x1a\n")
    assert data[fields["ref"]["offset"]:][: len(ref.payload)] == ref.payload  # the file itself, unchanged
    assert hashlib.sha256(ref.payload).hexdigest() == fields["ref"]["payload_sha256"]
    # The semantic and map layers are misc-file's, byte for byte.
    assert [ly.SerializeToString() for ly in image.layers[:-1]] == [
        ly.SerializeToString() for ly in doc_image().layers if ly.kind != pb.LAYER_KIND_PIXEL]


def test_drop_reasons_are_the_documented_ones():
    """Section 13 names every reason the receiver counts, and no other."""
    table = DOC_TEXT[DOC_TEXT.index("| Reason | Counted per | When |") :].split("\n\n", 1)[0]
    documented = re.findall(r"^\| `([a-z-]+)` \|", table, flags=re.M)
    assert documented == [*PACKET_DROPS, *BLOCK_DROPS]


# ---------------------------------------------------------------- the JavaScript peer

def node(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    proc = subprocess.run([NODE, str(PEER), *args], input=stdin, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def node_receive(packets: list[bytes]) -> dict:
    return json.loads(node("receive", stdin="".join(p.hex() + "\n" for p in packets)).stdout)


def images_under_test():
    return [doc_image(), from_bytes(vector("misc-file-ref")[0][0]), *(from_bytes(p.read_bytes()) for p in GOLDEN)]


def _layer_hashes(layers) -> list[tuple[str, str]]:
    return [(layer_name(ly), hashlib.sha256(ly.SerializeToString()).hexdigest()) for ly in layers]


def _hostile_stream(images, mode: str, mtu: int, seed: int) -> list[bytes]:
    """Every image's packets (and final POLL), shuffled, some duplicated, corrupted copies and junk mixed in."""
    rng = random.Random(seed)
    packets = []
    for image_id, image in enumerate(images, start=40):
        packets += [d.data for d in ImageSender(image_id, image, TransportConfig(mode=mode, mtu=mtu)).start(0.0)]
        packets.append(Packet(POLL, image_id, 0, 0xFFFF, 0).encode())
    extra = []
    for data in packets:
        roll = rng.random()
        if roll < 0.2:
            extra.append(data)  # a duplicate
        elif roll < 0.35:
            bit = rng.randrange(len(data) * 8)  # one flipped bit: CRC-32 catches every single-bit error
            extra.append(data[: bit // 8] + bytes([data[bit // 8] ^ (1 << bit % 8)]) + data[bit // 8 + 1 :])
        elif roll < 0.4:
            extra.append(data[: rng.randrange(1, len(data))])  # truncated (never empty: no line to send)
    extra += [rng.randbytes(rng.randrange(1, 80)) for _ in range(25)]  # junk (an empty one would be no line)
    stream = packets + extra
    rng.shuffle(stream)
    # the final POLLs go last, so both receivers report complete images
    polls = [p for p in stream if len(p) == 12 and p[0] == 0x48 and p[4:6] == b"\xff\xff"]
    return [p for p in stream if p not in polls] + polls


def _python_receive(stream: list[bytes]) -> tuple[TransportReceiver, list[bytes]]:
    rx = TransportReceiver(max_buffered_bytes=32 * 1024 * 1024)
    replies = []
    for data in stream:
        replies += rx.on_datagram(data).feedback
    return rx, replies


@needs_node
@pytest.mark.parametrize(("mode", "mtu"), [("none", 64), ("none", 100), ("none", 1200), ("fec", 64), ("fec", 200),
                                           ("fec", 1200)])
def test_python_sender_to_node_receiver(mode, mtu):
    images = images_under_test()
    stream = _hostile_stream(images, mode, mtu, seed=mtu + 7 * (mode == "fec"))
    out = node_receive(stream)
    rx, replies = _python_receive(stream)
    assert out["packets"] == len(stream) and out["hex_errors"] == 0
    by_id = {im["image_id"]: im for im in out["images"]}
    for image_id, image in enumerate(images, start=40):
        got = by_id[image_id]
        assert got["complete"], (image_id, got["blocks"])
        assert got["digest"] == layers_digest(image.layers)
        assert [(ly["name"], ly["sha256"]) for ly in got["layers"]] == _layer_hashes(image.layers)
        assert got["header"] == {"version": 1, "width": image.width, "height": image.height,
                                 "layer_count": len(image.layers)}
    assert set(by_id) == set(range(40, 40 + len(images)))  # nothing that failed its checks made state
    assert out["drops"]["checksum"] > 0 and out["blocks_bad"] == rx.stats.blocks_bad
    if mode == "none":  # the same state machine: the same counts and byte-identical feedback
        assert out["drops"] == rx.stats.drops
        assert out["feedback"] == [r.hex() for r in replies]
    else:  # RaptorQ decodes earlier in Python, which turns some later source symbols into duplicates
        assert _but_duplicates(out["drops"]) == _but_duplicates(rx.stats.drops)
    for reply in out["feedback"][-len(images):]:
        assert parse_feedback(bytes.fromhex(reply))[1].complete


def _but_duplicates(drops: dict) -> dict:
    return {reason: n for reason, n in drops.items() if reason not in ("duplicate", "redundant")}


@needs_node
@pytest.mark.parametrize("mtu", [64, 100, 333, 1200, 65000])
def test_node_sender_to_python_receiver(tmp_path, mtu):
    images = images_under_test()
    for index, image in enumerate(images):
        path = tmp_path / f"image{index}.misc"
        path.write_bytes(to_bytes(image))
        image_id = 1000 * index + mtu % 1000
        lines = node("send", str(path), "--mtu", str(mtu), "--image-id", str(image_id)).stdout.split()
        packets = [bytes.fromhex(line) for line in lines]
        expected = [d.data for d in ImageSender(image_id, image, TransportConfig(mode="none", mtu=mtu)).start(0.0)]
        assert packets == [*expected, Packet(POLL, image_id, 0, 0xFFFF, 0).encode()]
        rx = TransportReceiver()
        arrivals = []
        for data in reversed(packets[:-1]):  # any order will do
            arrivals += rx.on_datagram(data).arrivals
        layers = sorted((a.layer for a in arrivals), key=lambda ly: (ly.kind, ly.level))
        assert [ly.SerializeToString() for ly in layers] == [ly.SerializeToString() for ly in image.layers]
        assert layers_digest(layers) == layers_digest(image.layers) and rx.stats.drops == {}
        assert parse_feedback(rx.on_datagram(packets[-1]).feedback[0])[1].complete


@needs_node
def test_node_rejects_every_corrupted_vector():
    for name in sorted(n for n in VECTOR_NAMES if n.startswith("reject-")):
        (data,), fields = vector(name)
        out = node_receive([data])
        assert out["drops"] == {fields["reject"]: 1} and out["images"] == [], name


@needs_node
def test_node_decodes_the_vectors():
    packets, fields = vector("image-none")
    out = node_receive(packets)
    (image,) = out["images"]
    assert image["complete"] and image["digest"] == fields["digest"] and out["drops"] == {}
    assert [ly["sha256"] for ly in image["layers"]] == [ly["sha256"] for ly in fields["layers"]]
    assert out["feedback"] == [fields["final_feedback"]]
    # the lossy run of packet-feedback, then the POLL with token 1
    lossy = [d for d in packets[:-1] if (decode_packet(d).block, decode_packet(d).symbol) not in {(1, 0), (2, 1)}]
    out = node_receive([*lossy, Packet(POLL, 7, 0, 1, 0).encode()])
    assert out["feedback"] == [b"".join(vector("packet-feedback")[0]).hex()]
    # FEC block 0: all source symbols arrived, so no RaptorQ is needed
    packets, fields = vector("image-fec-block0")
    (image,) = node_receive(packets)["images"]
    assert [ly["name"] for ly in image["layers"]] == fields["layers"] and not image["complete"]
    assert image["blocks"] == [{"block": 0, "k": fields["k"], "held": 0, "decoded": True}]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op, pos = rng.random(), rng.randrange(len(data))
        if op < 0.6:
            data[pos] = rng.randrange(256)
        elif op < 0.75:
            data.insert(pos, rng.randrange(256))
        elif op < 0.9 and len(data) > 1:
            del data[pos]
        else:
            data = data[: pos + 1]
    return bytes(data)


@needs_node
def test_node_and_python_agree_on_mutated_blocks():
    """Differential: damaged units (protobuf edge cases included) are accepted or refused alike."""
    rng = random.Random(9)
    image = doc_image()
    blocks = [pack_units(image.header(), [ly]) for ly in image.layers]
    blocks.append(pack_units(image.header(), image.layers[:2]))
    stream = []
    for image_id in range(250):
        body = _mutate(rng, rng.choice(blocks))
        stream.append(Packet(DATA, image_id, 0, 0, 1, body).encode())
    out = node_receive(stream)
    rx, _ = _python_receive(stream)
    assert out["blocks_bad"] == rx.stats.blocks_bad and out["drops"] == rx.stats.drops
    assert 10 < rx.stats.blocks_bad.get("units", 0) < 240  # both outcomes are exercised
    by_id = {im["image_id"]: im for im in out["images"]}
    for image_id, state in rx.images.items():
        got = by_id[image_id]
        assert [(ly["name"], ly["sha256"]) for ly in got["layers"]] == _layer_hashes(state.layers.values())
        header = state.header
        assert got["header"] == (header and {"version": header.version, "width": header.width,
                                             "height": header.height, "layer_count": header.layer_count})
        assert got["complete"] == state.complete


@needs_node
def test_node_and_python_agree_on_misc_files(tmp_path):
    rng = random.Random(16)
    originals = [to_bytes(image) for image in images_under_test()]
    paths, expected = [], []
    for index in range(80):
        data = rng.choice(originals)
        if index % 4:  # damage the records, then fix the CRC so that the parser is what is tested
            body = _mutate(rng, data[3:-4])
            data = b"MI\x02" + body
            data += struct.pack("<I", zlib.crc32(data))
        path = tmp_path / f"f{index}.misc"
        path.write_bytes(data)
        paths.append(str(path))
        try:
            expected.append(layers_digest(from_bytes(data).layers))
        except BitstreamError:
            expected.append(None)
    lines = [json.loads(line) for line in node("inspect", *paths).stdout.splitlines()]
    assert [line["digest"] if line["ok"] else None for line in lines] == expected
    assert 0 < expected.count(None) < len(expected)

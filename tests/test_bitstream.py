"""The .misc container and the map layer: round trips, and corrupt input never crashes."""

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from miscnet.core import leb128
from miscnet.core.container import CONTAINER_VERSION, MAGIC, EncodedImage, from_bytes, layers_digest, to_bytes
from miscnet.core.errors import BitstreamError, MiscError
from miscnet.core.map_codec import decode_map_layer, encode_map_layer, upsample_mask
from miscnet.receiver.classical import ClassicalDecoder
from miscnet.receiver.stages import progressive_stages
from miscnet.sender.map_layer import box_to_mask
from miscnet.v1 import bitstream_pb2 as pb


def _layer(kind, level=0, payload=b"x"):
    if kind == pb.LAYER_KIND_SEMANTIC:
        return pb.Layer(kind=kind, codec=pb.CODEC_TEXT_RAW, semantic=pb.SemanticParams(), payload=payload)
    if kind == pb.LAYER_KIND_MAP:
        return pb.Layer(kind=kind, codec=pb.CODEC_MASK_BITPACK, map=pb.MapParams(grid=8), payload=payload)
    return pb.Layer(kind=kind, level=level, codec=pb.CODEC_PIXEL_WEBP, pixel=pb.PixelParams(), payload=payload)


def _wrap(body: bytes, width: int = 8, height: int = 8) -> bytes:
    """A version 2 file around raw records: magic, version, size, records, a CRC that matches."""
    body = MAGIC + bytes([CONTAINER_VERSION]) + leb128.encode(width) + leb128.encode(height) + body
    return body + struct.pack("<I", zlib.crc32(body))


def _three_layers(width=512, height=384) -> EncodedImage:
    """What the encoder writes by default with one pixel level: text, boxes, an AVIF thumbnail."""
    return EncodedImage(width, height, [
        pb.Layer(kind=pb.LAYER_KIND_SEMANTIC, codec=pb.CODEC_TEXT_WORDMODEL,
                 semantic=pb.SemanticParams(model_version=1, objects=3), payload=bytes(range(138))),
        pb.Layer(kind=pb.LAYER_KIND_MAP, codec=pb.CODEC_MASK_RECTS, map=pb.MapParams(grid=8, objects=3),
                 payload=b"\x02\xf9\x5a\xc0\x40"),
        pb.Layer(kind=pb.LAYER_KIND_PIXEL, codec=pb.CODEC_PIXEL_AVIF,
                 pixel=pb.PixelParams(width=171, height=128), payload=bytes(800)),
    ])


def test_container_round_trip():
    img = EncodedImage(640, 480, [_layer(pb.LAYER_KIND_SEMANTIC, payload=b"abc"),
                                  _layer(pb.LAYER_KIND_PIXEL, 0, b"\x00\x01")])
    data = to_bytes(img)
    back = from_bytes(data)
    assert (back.width, back.height) == (640, 480)
    assert [ly.payload for ly in back.layers] == [b"abc", b"\x00\x01"]
    assert [ly.SerializeToString() for ly in back.layers] == [ly.SerializeToString() for ly in img.layers]
    assert to_bytes(back) == data


def test_three_layer_file_has_at_most_24_bytes_of_framing():
    image = _three_layers()
    data = to_bytes(image)
    assert len(data) - image.payload_bytes() <= 24
    back = from_bytes(data)
    assert layers_digest(back.layers) == layers_digest(image.layers)
    # the map layer's head (codec, grid, objects, size) is smaller than its 5-byte payload
    map_record = data[data.index(b"\x02\xf9\x5a\xc0\x40") - 4 :][:4]
    assert map_record == bytes([pb.CODEC_MASK_RECTS, 8, 3, 5])


@pytest.mark.parametrize("size", [(512, 384), (384, 512), (333, 217), (1, 1), (16384, 4096)])
def test_pixel_rasters_of_any_shape_round_trip(size):
    """The second raster side is left out when it follows from the aspect, written when it does not."""
    w, h = size
    layers = [pb.Layer(kind=pb.LAYER_KIND_PIXEL, level=k, codec=pb.CODEC_PIXEL_BLOCK, payload=b"p",
                       pixel=pb.PixelParams(width=pw, height=ph, step=24, plane_shift=k, plane_bits=4,
                                            colorspace=1, quality=7, residual=bool(k), residual_gain=k * 3))
              for k, (pw, ph) in enumerate([(max(1, w // 5), max(1, h // 5)), (w, 1), (0, 0), (4096, 4096)])]
    image = EncodedImage(w, h, layers)
    back = from_bytes(to_bytes(image))
    assert [ly.SerializeToString() for ly in back.layers] == [ly.SerializeToString() for ly in layers]


def test_layers_the_format_cannot_hold_are_refused_when_writing():
    odd = _layer(pb.LAYER_KIND_SEMANTIC)
    odd.ParseFromString(odd.SerializeToString() + b"\xa0\x06\x01")  # field 100: unknown to version 1
    with pytest.raises(BitstreamError, match="cannot store"):
        to_bytes(EncodedImage(8, 8, [odd]))
    with pytest.raises(BitstreamError, match="cannot store"):  # a level the record's place cannot say
        to_bytes(EncodedImage(8, 8, [_layer(pb.LAYER_KIND_PIXEL, 1)]))
    wrong_kind = pb.Layer(kind=pb.LAYER_KIND_MAP, codec=pb.CODEC_PIXEL_WEBP, pixel=pb.PixelParams(), payload=b"x")
    with pytest.raises(BitstreamError, match="is not a map codec"):  # the codec says the kind
        to_bytes(EncodedImage(8, 8, [wrong_kind]))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: b"JUNK" + d[4:], "bad magic"),
        (lambda d: d[:-1], "checksum"),
        (lambda d: d[:7], "truncated"),
        (lambda d: d[:12], "checksum"),
        (lambda d: d[:3], "truncated"),
        (lambda d: d[:10] + bytes([d[10] ^ 0x40]) + d[11:], "checksum"),
        (lambda d: d[:2] + b"\x03" + d[3:], "unsupported container version 3"),
    ],
)
def test_corrupt_files_are_refused(mutate, message):
    data = to_bytes(EncodedImage(64, 64, [_layer(pb.LAYER_KIND_SEMANTIC, payload=b"hello world")]))
    with pytest.raises(BitstreamError, match=message):
        from_bytes(mutate(data))


def test_version_1_files_are_refused_in_one_line():
    """A file written before the lean container: magic MISC, a protobuf Bitstream, a CRC."""
    body = b"MISC" + pb.Bitstream(header=pb.Header(version=1, width=8, height=8, layer_count=0)).SerializeToString()
    with pytest.raises(BitstreamError, match="unsupported container version 1") as info:
        from_bytes(body + struct.pack("<I", zlib.crc32(body)))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "records, message",
    [
        (bytes([pb.CODEC_TEXT_RAW, 0, 0, 1]) + b"a" + bytes([0x80 | pb.CODEC_TEXT_RAW, 0, 0]), "duplicate"),
        (bytes([0x80 | 7, 0, 0]), "unknown codec 7"),
        (bytes([0x80 | 0, 0, 0]), "unknown codec 0"),
        (bytes([0xC0 | pb.CODEC_TEXT_RAW, 0, 0]), "no params mask"),
        (bytes([0xC0 | pb.CODEC_PIXEL_WEBP, 4, 0x80, 0x02]), "undefined bits"),
        (bytes([pb.CODEC_PIXEL_WEBP, 4, 9]) + b"ab", "past the last"),
        (bytes([pb.CODEC_PIXEL_WEBP, 4, 2]) + b"ab", "past the last"),
        (bytes([0x80 | pb.CODEC_PIXEL_WEBP, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]), "over 32 bits"),
        (bytes([0x80 | pb.CODEC_PIXEL_WEBP, 0xFF]), "truncated"),
        (bytes([pb.CODEC_PIXEL_WEBP, 1, 0]) * 64 + bytes([0x80 | pb.CODEC_PIXEL_WEBP, 1]), "more than 64"),
    ],
)
def test_inconsistent_records_are_refused(records, message):
    with pytest.raises(BitstreamError, match=message):
        from_bytes(_wrap(records))


def test_header_sizes_are_checked():
    with pytest.raises(BitstreamError, match="out of range"):
        from_bytes(_wrap(b"", width=0))
    with pytest.raises(BitstreamError, match="over the limit"):
        from_bytes(_wrap(b"", width=16384, height=16384))


def _decode_all(data: bytes) -> None:
    encoded = from_bytes(data)
    decoder = ClassicalDecoder()
    for stage in progressive_stages(encoded):
        out = decoder.render(stage)
        assert out.shape == (encoded.height, encoded.width, 3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash(data):
    for candidate in (data, MAGIC + data, _wrap(data)):  # the last one passes magic and checksum
        try:
            _decode_all(candidate)
        except MiscError:
            pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from([pb.LAYER_KIND_SEMANTIC, pb.LAYER_KIND_MAP, pb.LAYER_KIND_PIXEL]),
    codec=st.sampled_from(list(pb.Codec.values())),
    grid=st.integers(0, 80),
    objects=st.integers(0, 20),
    w=st.integers(0, 5000),
    h=st.integers(0, 5000),
    payload=st.binary(max_size=300),
)
def test_valid_framing_with_hostile_layer_contents_never_crashes(kind, codec, grid, objects, w, h, payload):
    params = [objects, grid] if kind == pb.LAYER_KIND_SEMANTIC else [grid, objects]
    if kind == pb.LAYER_KIND_PIXEL:
        record = [0xC0 | codec, *leb128.encode(w), 1, *leb128.encode(h)]  # mask bit 0: the long side
    else:
        record = [0x80 | codec, *params]
    try:
        _decode_all(_wrap(bytes(record) + payload, width=max(1, w % 97), height=max(1, h % 89)))
    except MiscError:
        pass


def test_box_masks_and_rect_codec():
    mask = box_to_mask((0.25, 0.0, 0.75, 0.5), 8)
    assert mask.sum() == 16 and mask[0:4, 2:6].all()
    tiny = box_to_mask((0.51, 0.51, 0.52, 0.52), 8)
    assert tiny.sum() == 1 and tiny[4, 4]
    masks = np.stack([mask, tiny, box_to_mask((0, 0, 1, 1), 8)])
    codec, params, payload = encode_map_layer(masks)
    assert codec == pb.CODEC_MASK_RECTS and len(payload) == 5  # 3 objects x 12 bits
    assert (decode_map_layer(codec, params, payload) == masks).all()


def test_arbitrary_masks_are_bitpacked():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 8, 8)) < 0.4
    codec, params, payload = encode_map_layer(masks)
    assert codec == pb.CODEC_MASK_BITPACK and len(payload) == 24
    assert (decode_map_layer(codec, params, payload) == masks).all()


def test_mask_upsampling_keeps_aspect_for_non_square_images():
    mask = np.zeros((8, 8), dtype=bool)
    mask[:, :4] = True  # left half
    full = upsample_mask(mask, 333, 217)
    assert full.shape == (217, 333)
    assert full[:, :166].all() and not full[:, 167:].any()

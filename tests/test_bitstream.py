"""The .misc container and the map layer: round trips, and corrupt input never crashes."""

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from miscnet.core.container import MAGIC, EncodedImage, from_bytes, to_bytes
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


def _wrap(body: bytes) -> bytes:
    body = MAGIC + body
    return body + struct.pack("<I", zlib.crc32(body))


def test_container_round_trip():
    img = EncodedImage(640, 480, [_layer(pb.LAYER_KIND_SEMANTIC, payload=b"abc"),
                                  _layer(pb.LAYER_KIND_PIXEL, 0, b"\x00\x01")])
    data = to_bytes(img)
    back = from_bytes(data)
    assert (back.width, back.height) == (640, 480)
    assert [ly.payload for ly in back.layers] == [b"abc", b"\x00\x01"]
    assert to_bytes(back) == data


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: b"JUNK" + d[4:], "bad magic"),
        (lambda d: d[:-1], "checksum"),
        (lambda d: d[:7], "truncated"),
        (lambda d: d[:12], "checksum"),
        (lambda d: d[:3], "truncated"),
        (lambda d: d[:10] + bytes([d[10] ^ 0x40]) + d[11:], "checksum"),
    ],
)
def test_corrupt_files_are_refused(mutate, message):
    data = to_bytes(EncodedImage(64, 64, [_layer(pb.LAYER_KIND_SEMANTIC, payload=b"hello world")]))
    with pytest.raises(BitstreamError, match=message):
        from_bytes(mutate(data))


def test_unknown_version_is_refused():
    msg = pb.Bitstream(header=pb.Header(version=2, width=8, height=8, layer_count=0))
    with pytest.raises(BitstreamError, match="version 2"):
        from_bytes(_wrap(msg.SerializeToString()))


@pytest.mark.parametrize(
    "layers, message",
    [
        ([_layer(pb.LAYER_KIND_PIXEL, 1)], "without gaps"),
        ([_layer(pb.LAYER_KIND_SEMANTIC), _layer(pb.LAYER_KIND_SEMANTIC)], "duplicate"),
        ([pb.Layer(kind=pb.LAYER_KIND_PIXEL, codec=pb.CODEC_PIXEL_WEBP, semantic=pb.SemanticParams())],
         "wrong kind"),
        ([pb.Layer(kind=7, codec=pb.CODEC_TEXT_RAW)], "unknown layer kind"),
    ],
)
def test_inconsistent_layer_tables_are_refused(layers, message):
    msg = pb.Bitstream(header=pb.Header(version=1, width=8, height=8, layer_count=len(layers)), layers=layers)
    with pytest.raises(BitstreamError, match=message):
        from_bytes(_wrap(msg.SerializeToString()))


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
    layer = pb.Layer(kind=kind, codec=codec, payload=payload)
    if kind == pb.LAYER_KIND_SEMANTIC:
        layer.semantic.objects = objects
    elif kind == pb.LAYER_KIND_MAP:
        layer.map.grid, layer.map.objects = grid, objects
    else:
        layer.pixel.width, layer.pixel.height = w, h
    msg = pb.Bitstream(header=pb.Header(version=1, width=max(1, w % 97), height=max(1, h % 89), layer_count=1),
                       layers=[layer])
    try:
        _decode_all(_wrap(msg.SerializeToString()))
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

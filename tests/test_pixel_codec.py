"""The pixel layer: block / webp / avif / jpeg round trips, exact bit counts, levels, rate control,
and decoding that fails only with BitstreamError on anything malformed."""

import io
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from miscnet.core import pixel as pc
from miscnet.core.errors import BitstreamError, BudgetError, MiscError
from miscnet.core.pixel import (
    PixelLevel,
    PixelSettings,
    decode_pixels,
    decode_raster,
    encode_pixels,
    lookup,
    payload_bytes,
)
from miscnet.core.pixel import avif as avif_codec
from miscnet.core.pixel import jpeg as jpeg_codec
from miscnet.core.pixel import webp as webp_codec
from miscnet.core.pixel.block import block_bits, block_means
from miscnet.sender.rate_control import candidate_settings, choose_settings, misc_block_settings
from miscnet.v1 import bitstream_pb2 as pb

CODECS = ("block", "webp", "avif", "jpeg")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def make_image(w: int, h: int, seed: int = 3) -> np.ndarray:
    """A smooth gradient with a few objects and mild noise: compressible, not trivial."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([xx * 255 / w, yy * 255 / h, 128 + 100 * np.sin(xx / 9) * np.cos(yy / 13)], axis=-1)
    img[h // 4 : h // 2, w // 3 : 2 * w // 3] = (220, 40, 30)
    img[2 * h // 3 :, : w // 4] = (20, 60, 200)
    img += rng.normal(0, 5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


IMAGE = make_image(160, 120)


def settings_for(codec: str, levels: int, w: int = 40, h: int = 30) -> PixelSettings:
    return PixelSettings(codec, w, h, quality=60, step=8, levels=levels)


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_and_prefix(codec, levels):
    coded = encode_pixels(IMAGE, settings_for(codec, levels))
    assert [lv.level for lv in coded] == list(range(levels))
    assert all(lv.codec == lookup(codec).codec_id for lv in coded)
    full = decode_pixels(coded, 160, 120)
    assert full.shape == (120, 160, 3) and full.dtype == np.uint8
    assert psnr(full, IMAGE) > 20
    first = decode_pixels(coded[:1], 160, 120)
    assert first.shape == full.shape
    assert psnr(first, IMAGE) <= psnr(full, IMAGE) + 1e-9
    if levels == 2 and codec != "block":
        w0, w1 = coded[0].params.width, coded[1].params.width
        assert w1 == 2 * w0 and len(coded[0].payload) < len(coded[1].payload)


def test_block_bits_and_values_are_exact():
    for w, h, step in [(32, 32, 8), (7, 5, 8), (13, 9, 3), (5, 4, 64), (3, 3, 256), (6, 5, 1)]:
        s = PixelSettings("block", w, h, step=step)
        (lv,) = encode_pixels(IMAGE, s)
        bits = block_bits(step)
        assert len(lv.payload) == math.ceil(w * h * 3 * bits / 8) == s.nbytes_hint
        n_values = -(-256 // step)
        q = np.clip(np.floor(block_means(IMAGE, w, h) / step), 0, n_values - 1)
        expect = np.clip((q * step + np.minimum((q + 1) * step, 256)) / 2, 0, 255)
        np.testing.assert_array_equal(decode_raster([lv]), expect.astype(np.float32))
    assert block_bits(8) == 5 and block_bits(16) == 4 and block_bits(1) == 8 and block_bits(256) == 1


def test_block_bit_planes_and_coarse_reconstruction():
    s = PixelSettings("block", 20, 15, step=8, levels=2)
    coded = encode_pixels(IMAGE, s)
    assert [(lv.params.plane_shift, lv.params.plane_bits) for lv in coded] == [(3, 2), (0, 3)]
    assert [len(lv.payload) for lv in coded] == [math.ceil(20 * 15 * 3 * b / 8) for b in (2, 3)]
    q = np.floor(block_means(IMAGE, 20, 15) / 8)
    coarse = np.floor(q / 8) * 64 + 32  # level 0 alone: the middle of a step-64 interval
    np.testing.assert_array_equal(decode_raster(coded[:1]), coarse.astype(np.float32))
    np.testing.assert_array_equal(decode_raster(coded), (q * 8 + 4).astype(np.float32))


def test_block_misc_default_and_ycbcr():
    s = misc_block_settings(333, 217)
    assert (s.width, s.height, s.step, s.colorspace) == (49, 32, 8, "rgb")
    assert s.nbytes_hint == math.ceil(49 * 32 * 15 / 8)
    coded = encode_pixels(IMAGE, PixelSettings("block", 32, 24, step=8, colorspace="ycbcr"))
    assert coded[0].params.colorspace == 1
    assert psnr(decode_pixels(coded, 160, 120), IMAGE) > 20


@pytest.mark.parametrize("codec", CODECS)
def test_deterministic(codec):
    a = encode_pixels(IMAGE, settings_for(codec, 2))
    b = encode_pixels(IMAGE.copy(), settings_for(codec, 2))
    assert [lv.payload for lv in a] == [lv.payload for lv in b]
    assert [lv.params for lv in a] == [lv.params for lv in b]


@pytest.mark.parametrize("codec", CODECS)
def test_odd_sizes_decode_to_original_size(codec):
    image = make_image(333, 217, seed=5)
    coded = encode_pixels(image, PixelSettings(codec, 37, 23, quality=50, levels=2))
    out = decode_pixels(coded, 333, 217)
    assert out.shape == (217, 333, 3)
    assert decode_pixels(coded[:1], 333, 217).shape == (217, 333, 3)


def test_containers_are_stripped_losslessly():
    thumb = np.asarray(Image.fromarray(IMAGE).resize((40, 30), Image.Resampling.LANCZOS))
    avif_options = {"quality": 60, "speed": avif_codec.avif_speed(40, 30), **avif_codec._AVIF_OPTIONS}
    for name, options in [("webp", {"quality": 60, "method": 6}), ("avif", avif_options)]:
        buf = io.BytesIO()
        Image.fromarray(thumb).save(buf, name.upper(), **options)
        full = buf.getvalue()
        payload = lookup(name).encode_thumbnail(thumb, 60)
        rebuilt = (webp_codec._webp_rebuild(payload, 40, 30) if name == "webp"
                   else avif_codec._avif_rebuild(payload, 40, 30))
        assert rebuilt == full
        assert len(full) - len(payload) >= (27 if name == "webp" else 280)
    scan = jpeg_codec._jpeg_encode(thumb, 60)
    assert jpeg_codec._jpeg_header(40, 30, 60) + scan + b"\xff\xd9" == jpeg_codec._jpeg_file(thumb, 60)


@pytest.mark.parametrize("codec", ["webp", "avif", "jpeg"])
def test_thumbnail_file_is_a_standard_image(codec):
    (lv,) = encode_pixels(IMAGE, settings_for(codec, 1))
    with Image.open(io.BytesIO(pc.thumbnail_file(lv))) as im:
        assert im.format == codec.upper() and im.size == (40, 30)
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), decode_raster([lv]).astype(np.uint8))


def test_choose_settings_respects_budget():
    for codec, budget in [("block", 600), ("webp", 300), ("avif", 300), ("jpeg", 400), ("auto", 300)]:
        s, coded = choose_settings(IMAGE, codec, 1, budget)
        assert payload_bytes(coded) <= budget
        assert s.codec == codec or (codec == "auto" and s.codec in pc.auto_codec_names())
        assert coded == encode_pixels(IMAGE, s)
    s2, coded2 = choose_settings(IMAGE, "webp", 2, 500)
    assert payload_bytes(coded2) <= 500 and len(coded2) == 2
    # more bytes never buys a worse picture
    small = decode_pixels(choose_settings(IMAGE, "webp", 1, 200)[1], 160, 120)
    large = decode_pixels(choose_settings(IMAGE, "webp", 1, 800)[1], 160, 120)
    assert psnr(large, IMAGE) >= psnr(small, IMAGE)


@pytest.mark.parametrize("codec", ["block", "webp", "jpeg", "auto"])
def test_choose_settings_impossible_budget(codec):
    with pytest.raises(BudgetError) as err:
        choose_settings(IMAGE, codec, 1, 5)
    msg = str(err.value)
    assert "\n" not in msg and "5 bytes" in msg and "smallest" in msg


def test_module_psnr_matches_formula():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (2, 301, 207, 3), dtype=np.uint8)
    assert pc.psnr(a, b) == pytest.approx(psnr(a, b), abs=1e-9)
    assert pc.psnr(a, a) == math.inf


def test_candidate_settings_ladder():
    cands = candidate_settings(512, 384, "webp", 1)
    rasters = sorted({(s.width, s.height) for s in cands})
    assert min(min(r) for r in rasters) == 8 and max(rasters) == (512, 384)  # thumbnails: up to full size
    assert all(abs(w / h - 512 / 384) < 0.15 for w, h in rasters)
    blocks = candidate_settings(512, 384, "block", 1)
    assert max(s.height for s in blocks) == 192  # the block codec: up to half the short side
    assert [s.nbytes_hint for s in blocks] == sorted(s.nbytes_hint for s in blocks)
    assert {s.codec for s in candidate_settings(64, 64, "auto", 1)} == set(pc.auto_codec_names())
    with pytest.raises(MiscError):
        candidate_settings(64, 64, "png", 1)


def test_bad_settings_and_images_raise_misc_error():
    for s in [PixelSettings("png", 8, 8), PixelSettings("webp", 0, 8), PixelSettings("block", 8, 8, step=0),
              PixelSettings("block", 8, 8, step=128, levels=3), PixelSettings("jpeg", 8, 8, levels=9)]:
        with pytest.raises(MiscError):
            encode_pixels(IMAGE, s)
    with pytest.raises(MiscError):
        encode_pixels(IMAGE[..., 0], settings_for("webp", 1))


def _level(codec: str, level: int = 0, payload: bytes = b"\x00" * 8, **params) -> PixelLevel:
    return PixelLevel(level, lookup(codec).codec_id, pb.PixelParams(**params), payload)


def test_decode_rejects_malformed_streams():
    good = encode_pixels(IMAGE, settings_for("webp", 2))
    blocks = encode_pixels(IMAGE, settings_for("block", 2))
    bad = [
        ([], 160, 120),
        (good[1:], 160, 120),  # not a prefix
        ([good[0], good[0]], 160, 120),  # level 0 twice
        ([blocks[0], good[1]], 160, 120),  # mixed codecs
        (good, 0, 120),
        (good, 160, 16385),
        ([_level("webp", width=0, height=8, quality=50)], 64, 64),
        ([_level("jpeg", width=4097, height=8, quality=50)], 64, 64),
        ([PixelLevel(0, pb.CODEC_MASK_BITPACK, good[0].params, good[0].payload)], 64, 64),
        ([PixelLevel(0, good[0].codec, good[0].params, good[0].payload[:-20])], 64, 64),  # truncated
        ([PixelLevel(0, blocks[0].codec, blocks[0].params, blocks[0].payload[:-1])], 64, 64),
        ([PixelLevel(0, blocks[0].codec, blocks[0].params, blocks[0].payload + b"\0")], 64, 64),
    ]
    for levels, w, h in bad:
        with pytest.raises(BitstreamError) as err:
            decode_pixels(levels, w, h)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("codec", ["jpeg", "avif", "block"])
def test_truncated_or_padded_payloads_raise(codec):
    (lv,) = encode_pixels(IMAGE, settings_for(codec, 1))
    for payload in (lv.payload[:-1], lv.payload[: len(lv.payload) // 2], lv.payload + b"\x00\x00"):
        with pytest.raises(BitstreamError):
            decode_pixels([PixelLevel(0, lv.codec, lv.params, payload)], 160, 120)


_params = st.builds(
    pb.PixelParams,
    width=st.one_of(st.integers(0, 80), st.sampled_from([4096, 4097, 2**32 - 1])),
    height=st.one_of(st.integers(0, 80), st.sampled_from([4097, 2**31])),
    step=st.one_of(st.integers(0, 20), st.sampled_from([64, 256, 257, 2**32 - 1])),
    plane_shift=st.integers(0, 12),
    plane_bits=st.integers(0, 12),
    residual=st.booleans(),
    residual_gain=st.integers(0, 300),
    quality=st.integers(0, 120),
    colorspace=st.integers(0, 3),
)
_codec = st.sampled_from([pb.CODEC_PIXEL_BLOCK, pb.CODEC_PIXEL_WEBP, pb.CODEC_PIXEL_AVIF,
                          pb.CODEC_PIXEL_JPEG, pb.CODEC_UNSPECIFIED, 999])


def _decodes_or_bitstream_error(levels, w, h):
    try:
        out = decode_pixels(levels, w, h)
    except BitstreamError as e:
        assert "\n" not in str(e)
        return
    assert out.shape == (h, w, 3) and out.dtype == np.uint8


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 3), _codec, _params, st.binary(max_size=120)), min_size=1, max_size=3),
    st.sampled_from([(1, 1), (17, 9), (64, 48), (0, 5), (16385, 2)]),
)
def test_decode_arbitrary_input_raises_only_bitstream_error(raw, size):
    levels = [PixelLevel(k, c, p, payload) for k, c, p, payload in raw]
    _decodes_or_bitstream_error(levels, *size)


_REAL = {c: encode_pixels(IMAGE, settings_for(c, 2)) for c in CODECS}


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(CODECS),
    st.integers(1, 2),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.integers(0, 10_000),
)
def test_corrupted_real_payloads_raise_only_bitstream_error(codec, n, flips, cut):
    levels = []
    for lv in _REAL[codec][:n]:
        data = bytearray(lv.payload)
        for pos, value in flips:
            data[pos % len(data)] = value
        levels.append(PixelLevel(lv.level, lv.codec, lv.params, bytes(data[: max(0, len(data) - cut % 4)])))
    _decodes_or_bitstream_error(levels, 80, 60)


# ---------------------------------------------------------------------------------------------- registry

class _ToyMeans(pc.PixelCodec):
    """A toy codec defined here only: cell means as raw bytes, sizes known without encoding."""

    name = "toy-means"
    codec_id = 60  # no CODEC_* value uses it
    ladder_smallest = 4

    def encode(self, image, settings, scratch=None):
        means = block_means(image, settings.width, settings.height)
        params = pb.PixelParams(width=settings.width, height=settings.height)
        return [PixelLevel(0, self.codec_id, params, np.clip(np.rint(means), 0, 255).astype(np.uint8).tobytes())]

    def decode(self, levels):
        p = levels[0].params
        if len(levels[0].payload) != p.width * p.height * 3:
            raise BitstreamError("toy-means level: wrong size")
        return np.frombuffer(levels[0].payload, np.uint8).reshape(p.height, p.width, 3).astype(np.float32)

    def exact_bytes(self, settings):
        return settings.width * settings.height * 3

    def candidates(self, rasters, levels):
        return [PixelSettings(self.name, w, h, levels=levels) for w, h in rasters]


class _ToyZlib(_ToyMeans):
    """The same means, quantised by quality and deflated: rate control searches its quality."""

    name = "toy-zlib"
    codec_id = 61
    quality_search = True
    ladder_smallest = 8

    def encode(self, image, settings, scratch=None):
        import zlib

        step = 1 + (100 - (settings.quality or 50)) // 4
        q = np.floor(block_means(image, settings.width, settings.height) / step).astype(np.uint8)
        params = pb.PixelParams(width=settings.width, height=settings.height, quality=settings.quality, step=step)
        return [PixelLevel(0, self.codec_id, params, zlib.compress(q.tobytes(), 9))]

    def decode(self, levels):
        import zlib

        p = levels[0].params
        try:
            raw = zlib.decompress(levels[0].payload)
        except zlib.error:
            raise BitstreamError("toy-zlib level: undecodable") from None
        if len(raw) != p.width * p.height * 3 or not 1 <= p.step <= 26:
            raise BitstreamError("toy-zlib level: wrong size or step")
        q = np.frombuffer(raw, np.uint8).reshape(p.height, p.width, 3).astype(np.float32)
        return np.minimum(q * p.step + p.step / 2, 255)

    def exact_bytes(self, settings):
        return None


@pytest.fixture(params=[_ToyMeans, _ToyZlib])
def toy(request):
    codec = pc.register(request.param())
    try:
        yield codec
    finally:
        pc.unregister(codec.name)
        from miscnet.sender.rate_control import clear_search_cache

        clear_search_cache()


def test_builtin_codecs_are_registered():
    assert pc.codec_names() == (*CODECS, "ref", "net")  # ref: tests/test_pixel_modes.py; net: tests/test_net_codec.py
    assert pc.auto_codec_names() == ("webp", "avif", "jpeg")
    for name in (*CODECS, "ref"):
        assert pc.lookup_id(lookup(name).codec_id) is lookup(name)
    assert lookup("png") is None and pc.lookup_id(999) is None


def test_a_registered_toy_codec_needs_no_table(toy):
    assert toy.name in pc.codec_names() and toy.name not in pc.auto_codec_names()
    with pytest.raises(MiscError):
        pc.register(type(toy)())  # names and ids are unique
    coded = encode_pixels(IMAGE, PixelSettings(toy.name, 40, 30, quality=80))
    assert [lv.codec for lv in coded] == [toy.codec_id]
    full = decode_pixels(coded, 160, 120)
    assert full.shape == (120, 160, 3) and psnr(full, IMAGE) > 20
    with pytest.raises(BitstreamError):
        pc.thumbnail_file(coded[0])  # no file form unless the codec has one
    s, chosen = choose_settings(IMAGE, toy.name, 1, 900)
    assert s.codec == toy.name and payload_bytes(chosen) <= 900 and chosen == encode_pixels(IMAGE, s)
    assert psnr(decode_pixels(chosen, 160, 120), IMAGE) > 20
    assert {c.codec for c in candidate_settings(160, 120, toy.name, 1)} == {toy.name}
    with pytest.raises(BudgetError):
        choose_settings(IMAGE, toy.name, 1, 5)


def test_unregistered_codecs_are_unknown():
    codec = pc.register(_ToyMeans())
    pc.unregister(codec.name)
    assert codec.name not in pc.codec_names()
    with pytest.raises(MiscError):
        encode_pixels(IMAGE, PixelSettings(codec.name, 8, 8))
    with pytest.raises(MiscError):
        choose_settings(IMAGE, codec.name, 1, 900)
    with pytest.raises(BitstreamError):
        decode_pixels([PixelLevel(0, codec.codec_id, pb.PixelParams(width=2, height=2), b"\0" * 12)], 8, 8)


# ---------------------------------------------------------------- preview levels and the quick rate control

PHOTO = make_image(256, 192, seed=5)


@pytest.mark.parametrize("codec", ["webp", "avif", "jpeg"])
def test_preview_levels_are_pictures_of_their_own(codec):
    s, coded = choose_settings(PHOTO, codec, 2, 1500)
    assert len(s.previews) == 1 and len(coded) == 2 and payload_bytes(coded) <= 1500
    assert coded == encode_pixels(PHOTO, s)  # rate control's levels are what the codec writes
    preview, last = coded
    assert not preview.params.residual and not last.params.residual
    assert len(preview.payload) < 0.2 * len(last.payload)  # a small share of the bytes goes first
    assert (last.params.quality != 0) == (codec == "jpeg")  # quality only where the decoder reads it
    first, full = decode_pixels(coded[:1], 256, 192), decode_pixels(coded, 256, 192)
    assert psnr(first, PHOTO) < psnr(full, PHOTO)
    # the last level is the picture a single level of its settings gives
    single = encode_pixels(PHOTO, PixelSettings(codec, s.width, s.height, quality=s.quality, chroma=s.chroma))
    np.testing.assert_array_equal(full, decode_pixels(single, 256, 192))


def test_preview_levels_cross_the_container():
    from miscnet.core.container import EncodedImage, from_bytes, to_bytes
    from miscnet.receiver.classical import ClassicalDecoder
    from miscnet.receiver.stages import progressive_stages

    _, coded = choose_settings(PHOTO, "avif", 2, 1200)
    layers = [pb.Layer(kind=pb.LAYER_KIND_PIXEL, level=lv.level, codec=lv.codec, pixel=lv.params,
                       payload=lv.payload) for lv in coded]
    back = from_bytes(to_bytes(EncodedImage(256, 192, layers)))
    assert [ly.SerializeToString() for ly in back.layers] == [ly.SerializeToString() for ly in layers]
    stages = progressive_stages(back)
    images = [ClassicalDecoder().render(stage) for stage in stages]
    assert [stage.name for stage in stages][-2:] == ["pixel.0", "pixel.1"]
    assert psnr(images[-2], PHOTO) < psnr(images[-1], PHOTO)


def test_quick_choice_is_a_valid_deterministic_choice():
    from miscnet.sender.rate_control import clear_search_cache, raster_ladder

    picks = []
    for _ in range(2):
        clear_search_cache()
        picks.append(choose_settings(PHOTO, "auto", 1, 900))
    (s, coded), (s2, coded2) = picks
    assert s == s2 and coded == coded2
    assert s.codec == "avif"  # the predicted codec
    assert (s.width, s.height) in raster_ladder(256, 192, full_size=True)
    # the largest quality that fits on its raster, as the exhaustive search would take there
    assert payload_bytes(coded) <= 900
    if s.quality < 100:
        bigger = encode_pixels(PHOTO, PixelSettings("avif", s.width, s.height, quality=s.quality + 1, chroma=s.chroma))
        assert payload_bytes(bigger) > 900
    clear_search_cache()
    s3, coded3 = choose_settings(PHOTO, "auto", 1, 900, exhaustive=True)
    assert payload_bytes(coded3) <= 900 and coded3 == encode_pixels(PHOTO, s3)
    assert psnr(decode_pixels(coded, 256, 192), PHOTO) > psnr(decode_pixels(coded3, 256, 192), PHOTO) - 0.5

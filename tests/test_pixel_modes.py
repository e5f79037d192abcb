"""MISC's pixel modes as the notebook runs them: ``ref`` (an external codec's file) and the ``block`` rule.

``ref`` files are real ones, written by Pillow's own encoders; the layer must hold their exact bytes, the
budget must count them in full, and hostile files and layers must come back as one-line errors.
"""

import io
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from miscnet.cli.main import main
from miscnet.core.config import EncoderConfig
from miscnet.core.container import from_bytes, to_bytes
from miscnet.core.errors import BitstreamError, BudgetError, MiscError
from miscnet.core.image_io import load_image
from miscnet.core.pixel import PixelLevel, decode_pixels, decode_raster, thumbnail_file
from miscnet.core.pixel import ref as ref_codec
from miscnet.core.pixel.block import block_means, misc_block_grid, misc_block_pixels
from miscnet.core.samples import sample_image_path, sample_sidecar_path
from miscnet.core.semantics import load_semantics
from miscnet.receiver.classical import ClassicalDecoder
from miscnet.receiver.stages import stage_input
from miscnet.sender.encoder import encode_image
from miscnet.v1 import bitstream_pb2 as pb

SAMPLE = "astronaut"


@pytest.fixture(scope="module")
def sample():
    image = load_image(sample_image_path(SAMPLE))
    semantics, _ = load_semantics(sample_sidecar_path(SAMPLE))
    return image, semantics


def _file(image: np.ndarray, fmt: str, size: tuple[int, int], **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).resize(size, Image.Resampling.LANCZOS).save(buf, fmt, **options)
    return buf.getvalue()


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _pillow_reference(data: bytes, width: int, height: int) -> np.ndarray:
    """What a receiver should show: the file as Pillow decodes it, up-sampled as every pixel raster is."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB").resize((width, height), Image.Resampling.LANCZOS))


def _formats():
    out = [("JPEG", {"quality": 25}, "jpg"), ("WEBP", {"quality": 20}, "webp")]
    if "avif" in ref_codec.supported_formats():
        out.append(("AVIF", {"quality": 30}, "avif"))
    if "jpeg2000" in ref_codec.supported_formats():
        out.append(("JPEG2000", {"quality_mode": "rates", "quality_layers": [80]}, "jp2"))
    return out


# ---------------------------------------------------------------- ref: round trip, exact bytes, budget

@pytest.mark.parametrize(("fmt", "options", "ext"), _formats(), ids=[f[0] for f in _formats()])
def test_ref_round_trip_carries_the_files_exact_bytes(sample, tmp_path, fmt, options, ext):
    image, semantics = sample
    h, w = image.shape[:2]
    data = _file(image, fmt, (128, 96), **options)
    path = _write(tmp_path, f"ref.{ext}", data)
    result = encode_image(image, semantics, EncoderConfig(pixel_codec="ref", ref=str(path)))
    pixel = [ly for ly in result.encoded.layers if ly.kind == pb.LAYER_KIND_PIXEL]
    assert [(ly.codec, ly.level) for ly in pixel] == [(pb.CODEC_PIXEL_REF, 0)]
    assert pixel[0].payload == data  # the bytes the user's codec wrote, and nothing else
    assert (pixel[0].pixel.width, pixel[0].pixel.height) == (128, 96)
    back = from_bytes(result.data)
    assert [ly.SerializeToString() for ly in back.layers] == [ly.SerializeToString() for ly in result.encoded.layers]
    # Every byte of the file is in the .misc file: the layers plus at most a few bytes of framing.
    assert result.encoded.payload_bytes() >= len(data) and len(result.data) - result.encoded.payload_bytes() < 40
    stage = stage_input(back.width, back.height, back.layers)
    shown = ClassicalDecoder().render(stage)
    np.testing.assert_array_equal(shown, _pillow_reference(data, w, h))
    level = PixelLevel(0, pixel[0].codec, pixel[0].pixel, pixel[0].payload)
    assert thumbnail_file(level) == data  # the file form is the file itself


def test_ref_budget_counts_the_whole_file(sample, tmp_path):
    image, semantics = sample
    data = _file(image, "WEBP", (160, 160), quality=30)
    path = _write(tmp_path, "ref.webp", data)
    whole = len(encode_image(image, semantics, EncoderConfig(pixel_codec="ref", ref=str(path))).data)
    assert whole > len(data)
    exact = encode_image(image, semantics, EncoderConfig(pixel_codec="ref", ref=str(path), budget_bytes=whole))
    assert len(exact.data) == whole
    with pytest.raises(BudgetError, match=rf"too small: the ref file .* takes {len(data)} bytes, {whole} in all"):
        encode_image(image, semantics, EncoderConfig(pixel_codec="ref", ref=str(path), budget_bytes=whole - 1))
    with pytest.raises(BudgetError):  # a bpp budget the same
        encode_image(image, semantics, EncoderConfig(pixel_codec="ref", ref=str(path), bpp=0.01))


def test_ref_cli_encode_decode_and_one_line_errors(capsys, tmp_path, sample):
    image, _ = sample
    data = _file(image, "JPEG", (96, 96), quality=30)
    ref = _write(tmp_path, "ref.jpg", data)
    misc, png = tmp_path / "a.misc", tmp_path / "a.png"
    assert main(["encode", f"sample:{SAMPLE}", "-o", str(misc), "--pixel", "ref", "--ref", str(ref), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers"][-1] == {"kind": "pixel", "level": 0, "codec": "ref", "bytes": len(data)}
    assert report["bytes"] == misc.stat().st_size
    assert main(["decode", str(misc), "-o", str(png)]) == 0
    capsys.readouterr()
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), _pillow_reference(data, 512, 512))
    for argv, message in [
        (["--pixel", "ref"], "--pixel ref needs --ref FILE"),
        (["--pixel", "webp", "--ref", str(ref)], "--ref FILE goes with --pixel ref"),
        (["--pixel", "ref", "--ref", str(tmp_path / "missing.png")], "cannot read ref file"),
        (["--pixel", "ref", "--ref", str(ref), "--budget", "300"], "budget of 300 bytes is too small"),
        (["--pixel", "webp", "--block-rule", "misc"], "--block-rule misc applies to --pixel block"),
    ]:
        out = tmp_path / "b.misc"
        assert main(["encode", f"sample:{SAMPLE}", "-o", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
        assert not out.exists()


# ---------------------------------------------------------------- ref: bad files at the sender

def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A hand-made 8-bit RGB PNG (rows given, or a header that claims a size with almost no data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _bad_files(image: np.ndarray) -> list[tuple[str, bytes, str]]:
    jpeg = _file(image, "JPEG", (64, 64), quality=30)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _file(image, "JPEG", (64, 48), quality=30, exif=exif.tobytes())
    frames = [Image.fromarray(image).resize((32, 32)), Image.fromarray(255 - image).resize((32, 32))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], quality=30)
    return [
        ("empty", b"", "empty file"),
        ("text", b"not an image at all", "not a JPEG, PNG, WebP, AVIF or JPEG 2000 file"),
        ("gif", _file(image, "GIF", (32, 32)), "not a JPEG, PNG, WebP, AVIF or JPEG 2000 file"),
        ("bmp", _file(image, "BMP", (32, 32)), "not a JPEG, PNG, WebP, AVIF or JPEG 2000 file"),
        ("truncated-jpeg", jpeg[: len(jpeg) // 2], "undecodable jpeg file"),
        ("jpeg-magic-garbage", b"\xff\xd8\xff" + bytes(200), "undecodable jpeg file"),
        ("huge-claim", _png(100_000, 100_000), "more than Pillow's limit"),
        ("too-large-raster", _png(5000, 100), "outside 1..4096 a side"),
        ("larger-than-image", _file(image, "PNG", (600, 400)), "larger than the 512x512 image"),
        ("animated", buf.getvalue(), "has 2 frames"),
        ("exif-rotated", rotated, "EXIF orientation 6"),
    ]


def test_bad_ref_files_are_one_line_errors_at_encode(sample, tmp_path):
    image, semantics = sample
    for name, data, message in _bad_files(image):
        path = _write(tmp_path, f"{name}.bin", data)
        with pytest.raises(MiscError) as info:
            encode_image(image, semantics, EncoderConfig(pixel_codec="ref", ref=str(path)))
        text = str(info.value)
        assert message in text, (name, text)
        assert str(path) in text and "\n" not in text, name


def test_oversized_ref_file_is_refused_before_it_is_read(sample, tmp_path):
    image, semantics = sample
    path = tmp_path / "big.png"
    with open(path, "wb") as f:
        f.write(_png(8, 8, b"\0" * (8 * 25)))
        f.truncate(ref_codec.MAX_REF_BYTES + 1)
    with pytest.raises(MiscError, match=f"{ref_codec.MAX_REF_BYTES + 1} bytes, over the"):
        encode_image(image, semantics, EncoderConfig(pixel_codec="ref", ref=str(path)))
    with pytest.raises(MiscError, match="over the"):
        ref_codec.ref_levels(path.read_bytes(), 512, 512)


# ---------------------------------------------------------------- ref: hostile layers at the receiver

def _ref_level(payload: bytes, width: int, height: int, **params) -> PixelLevel:
    return PixelLevel(0, pb.CODEC_PIXEL_REF, pb.PixelParams(width=width, height=height, **params), payload)


def test_hostile_ref_layers_are_refused_cleanly(sample):
    image, _ = sample
    good = _file(image, "WEBP", (64, 48), quality=30)
    assert decode_raster([_ref_level(good, 64, 48)]).shape == (48, 64, 3)
    cases = [
        ("garbage", _ref_level(b"\x00" * 64, 64, 48), "not a JPEG, PNG"),
        ("size mismatch", _ref_level(good, 64, 49), "the layer says 64x49"),
        # The file's header claims a large picture and so does the layer: refused before any decoding work.
        ("claimed size", _ref_level(_png(5000, 5000), 5000, 5000), "outside 1..4096"),
        ("claimed size, no data", _ref_level(_png(4000, 4000), 4000, 4000), "undecodable png file"),
        ("truncated", _ref_level(good[:-20], 64, 48), "undecodable webp file"),
        ("other fields", _ref_level(good, 64, 48, step=8), "fields of another codec"),
        ("quality", _ref_level(good, 64, 48, quality=3), "fields of another codec"),
        ("oversized", _ref_level(b"\x89PNG\r\n\x1a\n" + bytes(ref_codec.MAX_REF_BYTES), 64, 48), "byte limit"),
    ]
    for name, level, message in cases:
        with pytest.raises(BitstreamError) as info:
            decode_pixels([level], 512, 512)
        assert message in str(info.value) and "\n" not in str(info.value), name
    two = [_ref_level(good, 64, 48), PixelLevel(1, pb.CODEC_PIXEL_REF, pb.PixelParams(width=64, height=48), good)]
    with pytest.raises(BitstreamError, match="exactly one"):
        decode_pixels(two, 512, 512)


def test_hostile_ref_file_through_the_container_fails_the_stage_only(sample, tmp_path):
    image, semantics = sample
    path = _write(tmp_path, "ref.jpg", _file(image, "JPEG", (64, 64), quality=30))
    encoded = encode_image(image, semantics, EncoderConfig(pixel_codec="ref", ref=str(path))).encoded
    layer = encoded.layers[-1]
    layer.payload = layer.payload[:40]  # a file cut short on the way: the container itself is well formed
    back = from_bytes(to_bytes(encoded))
    stage = stage_input(back.width, back.height, back.layers)
    with pytest.raises(BitstreamError, match="ref level 0: undecodable jpeg file"):
        ClassicalDecoder().render(stage)


# ---------------------------------------------------------------- block: the notebook's size rule

def _notebook_grid(width: int, height: int) -> tuple[int, int, int]:
    """The notebook's own arithmetic: block_num = max(int(max(w, h) / 16), 32); grid int(side / block_num)."""
    block = max(int(max(width, height) / 16), 32)
    return block, int(width / block), int(height / block)


@pytest.mark.parametrize(("width", "height", "block", "grid"), [
    (1024, 1024, 64, (16, 16)),  # the published example's size: 16 x 16 blocks of 64 px
    (512, 768, 48, (10, 16)),
    (768, 512, 48, (16, 10)),
    (333, 217, 32, (10, 6)),  # small images: the 32 px floor, fewer than 16 blocks
    (2000, 300, 125, (16, 2)),
    (4096, 2160, 256, (16, 8)),
    (1023, 1000, 63, (16, 15)),  # floor, not round: 1023 / 16 = 63.9
])
def test_block_rule_follows_the_notebook(width, height, block, grid):
    assert misc_block_pixels(width, height) == block
    assert misc_block_grid(width, height) == grid
    assert _notebook_grid(width, height) == (block, *grid)


def test_block_rule_keeps_one_block_where_the_notebook_has_none():
    assert _notebook_grid(20, 300)[1] == 0  # the notebook's int(20 / 32): no column at all
    assert misc_block_grid(20, 300) == (1, 9)


def test_block_rule_misc_encodes_the_notebooks_grid_with_floor_step_8(sample):
    image, semantics = sample
    config = EncoderConfig(pixel_codec="block", block_rule="misc", levels=1)
    result = encode_image(image, semantics, config)
    (pixel,) = [ly for ly in result.encoded.layers if ly.kind == pb.LAYER_KIND_PIXEL]
    w, h = misc_block_grid(512, 512)
    assert (pixel.pixel.width, pixel.pixel.height, pixel.pixel.step) == (w, h, 8) == (16, 16, 8)
    assert len(pixel.payload) == math.ceil(w * h * 3 * 5 / 8)  # 5 bits per value, 3 channels
    level = PixelLevel(0, pixel.codec, pixel.pixel, pixel.payload)
    floor = np.floor(block_means(image, w, h) / 8)
    np.testing.assert_array_equal(decode_raster([level]), (floor * 8 + 4).astype(np.float32))
    # Fixed size: the budget is checked, never traded against.
    needed = len(result.data)
    assert len(encode_image(image, semantics, EncoderConfig(pixel_codec="block", block_rule="misc", levels=1,
                                                            budget_bytes=needed)).data) == needed
    with pytest.raises(BudgetError, match="the notebook's block rule"):
        encode_image(image, semantics, EncoderConfig(pixel_codec="block", block_rule="misc", levels=1,
                                                     budget_bytes=needed - 1))


def test_block_rule_search_is_still_the_default(sample):
    image, semantics = sample
    assert EncoderConfig().block_rule == "search"
    searched = encode_image(image, semantics, EncoderConfig(pixel_codec="block", budget_bytes=900, levels=1))
    assert len(searched.data) <= 900 and searched.pixel_settings.width != misc_block_grid(512, 512)[0]
    with pytest.raises(MiscError, match="unknown block rule"):
        EncoderConfig(pixel_codec="block", block_rule="nearest")


def test_scenarios_take_the_block_rule(tmp_path):
    from miscnet.experiments.scenario import ScenarioError, load_scenario

    image = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (90, 120, 30)).save(image)
    (tmp_path / "img.json").write_text('{"objects": [], "caption": "a green field"}')
    path = _write(tmp_path, "s.toml", f'[images]\npaths = ["{image}"]\n[encoder]\npixel = "block"\n'
                  f'block_rule = "misc"\n'.encode())
    (config,) = load_scenario(path).configs
    assert config.encoder_config().block_rule == "misc"
    bad = _write(tmp_path, "bad.toml", f'[images]\npaths = ["{image}"]\n[encoder]\nblock_rule = "round"\n'.encode())
    with pytest.raises(ScenarioError, match="block_rule"):
        load_scenario(bad)

"""Inputs: what the encoder accepts the decoder reads (object counts, image sizes), every kind of image file
becomes the RGB picture it shows, and the command line's small contracts (output permissions, a closed
pipe, HOST:PORT options, a subcommand's own usage, each warning once, MISC's CSV with the default map)."""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from miscnet.cli.main import build_parser, main
from miscnet.core import container, image_io
from miscnet.core.errors import MiscError
from miscnet.core.image_io import atomic_write_bytes, check_image_size, load_image
from miscnet.v1 import bitstream_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
MISC_CSV = Path("/work/shared/misc-example/GPT-example.csv")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def picture(h: int = 48, w: int = 64) -> np.ndarray:
    """A smooth RGB picture, with no symmetry (so a wrong rotation shows)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx * 2 + yy) * 255 // (2 * w + h - 3)],
                    axis=-1).astype(np.uint8)


def gray16(h: int = 48, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx * 40000 // (w - 1)) + (yy * 25535 // (h - 1))).astype(np.uint16)


def to8(v: np.ndarray) -> np.ndarray:
    """The intended 8-bit value of 16-bit samples."""
    return np.rint(v.astype(np.float64) * 255 / 65535).astype(np.uint8)


def rgb_of(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return np.rint(rgb * a + 255 * (1 - a)).astype(np.uint8)


# ============================================================================ 1. limits, both sides


def _objects_sidecar(path: Path, n: int) -> None:
    objs = [{"name": f"thing {i}", "detail": "a small square thing",
             "box": [(i % 8) / 8, (i // 8 % 8) / 8, (i % 8 + 1) / 8, (i // 8 % 8 + 1) / 8]} for i in range(n)]
    path.write_text(json.dumps({"objects": objs, "caption": "many small things on a gradient"}))


@pytest.mark.parametrize("n", [16, 17, 64])
def test_every_object_count_the_encoder_writes_info_and_decode_read(capsys, tmp_path, n):
    """The map layer held 16 masks while the semantics allowed 64: 17..64 objects encoded (with a warning)
    into files info and decode refused."""
    Image.fromarray(picture()).save(tmp_path / "img.png")
    _objects_sidecar(tmp_path / "img.json", n)
    out = tmp_path / "img.misc"
    code, _, err = run(capsys, "encode", tmp_path / "img.png", "-o", out)
    assert code == 0, err
    code, text, err = run(capsys, "info", out, "--json")
    assert code == 0, err
    info = json.loads(text)
    assert len(info["semantics"]["objects"]) == n
    assert [ly["params"]["objects"] for ly in info["layers"] if ly["kind"] == "map"] == [n]
    code, _, err = run(capsys, "decode", out, "-o", tmp_path / "img-out.png")
    assert code == 0, err
    assert load_image(tmp_path / "img-out.png").shape == (48, 64, 3)


def test_one_object_over_the_limit_is_one_error_and_no_file(capsys, tmp_path):
    Image.fromarray(picture()).save(tmp_path / "img.png")
    _objects_sidecar(tmp_path / "img.json", 65)
    code, _, err = run(capsys, "encode", tmp_path / "img.png", "-o", tmp_path / "img.misc")
    assert code == 2 and err.count("\n") == 1 and "65 objects" in err and "64" in err, err
    assert not (tmp_path / "img.misc").exists()


def test_the_map_codec_holds_as_many_masks_as_the_semantic_layer_objects():
    from miscnet.core.map_codec import MAX_OBJECTS, decode_map_layer, encode_map_layer
    from miscnet.core.semantics import MAX_OBJECTS_HARD

    assert MAX_OBJECTS == MAX_OBJECTS_HARD
    masks = np.random.default_rng(1).random((MAX_OBJECTS, 8, 8)) < 0.5  # not rectangles: the bitpack codec
    codec, params, payload = encode_map_layer(masks)
    assert codec == pb.CODEC_MASK_BITPACK
    assert (decode_map_layer(codec, params, payload) == masks).all()
    with pytest.raises(MiscError, match="at most 64"):
        encode_map_layer(np.zeros((MAX_OBJECTS + 1, 8, 8), dtype=bool))


SIZES = [(1, 1), (16384, 1), (1, 16384), (16385, 1), (1, 16385), (20000, 100), (100, 20000), (8192, 8192),
         (8193, 8192), (16384, 4096), (16384, 4097), (0, 5), (5, 0)]


@pytest.mark.parametrize("w,h", SIZES)
def test_the_reader_takes_exactly_the_sizes_a_misc_header_holds(w, h):
    def refused(check) -> bool:
        try:
            check()
        except MiscError as exc:
            assert "\n" not in str(exc)
            return True
        return False

    header = pb.Header(version=container.FORMAT_VERSION, width=w, height=h, layer_count=0)
    assert refused(lambda: check_image_size(w, h, "x")) == refused(lambda: container.validate_header(header))
    assert image_io.MAX_SIDE == container.MAX_SIDE and image_io.MAX_PIXELS == container.MAX_PIXELS


def test_the_encoder_refuses_a_size_no_misc_file_holds():
    """load_image refuses 20000 x 100 (over 16384 a side, under 64 Mi pixels), but encode_image took such
    an array and wrote a file the decoder refuses."""
    from miscnet.core.config import EncoderConfig
    from miscnet.core.semantics import Semantics
    from miscnet.sender.encoder import encode_image

    with pytest.raises(MiscError, match="20000x100, over the limit of 16384 pixels a side"):
        encode_image(np.zeros((100, 20000, 3), np.uint8), Semantics((), "black"), EncoderConfig(pixel_codec="none"))


def test_wide_images_at_and_over_the_side_limit(capsys, tmp_path):
    side = json.dumps({"objects": [], "caption": "a black strip"})
    Image.new("RGB", (20000, 100)).save(tmp_path / "wide.png")
    (tmp_path / "wide.json").write_text(side)
    code, _, err = run(capsys, "encode", tmp_path / "wide.png", "-o", tmp_path / "wide.misc")
    assert code == 2 and err.count("\n") == 1 and "20000x100" in err and "16384" in err, err
    assert not (tmp_path / "wide.misc").exists()
    Image.new("RGB", (16384, 1), (90, 120, 30)).save(tmp_path / "edge.png")
    (tmp_path / "edge.json").write_text(side)
    assert run(capsys, "encode", tmp_path / "edge.png", "-o", tmp_path / "edge.misc")[0] == 0
    assert run(capsys, "info", tmp_path / "edge.misc")[0] == 0
    code, _, err = run(capsys, "decode", tmp_path / "edge.misc", "-o", tmp_path / "edge-out.png")
    assert code == 0, err
    assert Image.open(tmp_path / "edge-out.png").size == (16384, 1)


# ============================================================================ 2. image modes


def _png16(path: Path, samples: np.ndarray) -> None:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA by the last axis), written by hand: Pillow writes 16-bit
    gray PNGs only."""
    h, w, c = samples.shape
    raw = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_16_bit_gray_png_is_scaled_not_clipped(tmp_path):
    """It encoded as nearly white (PSNR 4.85 dB): Pillow's conversion clips 16-bit samples at 255."""
    v = gray16()
    Image.fromarray(v).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert psnr(load_image(tmp_path / "g16.png"), rgb_of(to8(v))) > 50


def test_16_bit_big_endian_and_32_bit_integer_tiffs(tmp_path):
    v = gray16()
    Image.frombytes("I;16B", (v.shape[1], v.shape[0]), v.astype(">u2").tobytes()).save(tmp_path / "b.tif")
    Image.fromarray(v.astype(np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "b.tif").mode == "I;16B" and Image.open(tmp_path / "i.tif").mode == "I"
    for name in ("b.tif", "i.tif"):
        assert psnr(load_image(tmp_path / name), rgb_of(to8(v))) > 50, name


def test_integer_image_outside_16_bits_is_refused_by_mode(tmp_path):
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(MiscError, match=r"mode I\).*0\.\.65535") as exc:
        load_image(tmp_path / "big.tif")
    assert "\n" not in str(exc.value)


def test_16_bit_rgb_and_rgba_pngs(tmp_path):
    rgb16 = picture().astype(np.uint16) * 257 + 100  # not a multiple of 257: the low byte matters a little
    _png16(tmp_path / "rgb16.png", rgb16)
    assert psnr(load_image(tmp_path / "rgb16.png"), to8(rgb16)) > 45
    alpha = np.linspace(0, 65535, rgb16.shape[0] * rgb16.shape[1]).reshape(rgb16.shape[:2]).astype(np.uint16)
    _png16(tmp_path / "rgba16.png", np.dstack([rgb16, alpha]))
    assert psnr(load_image(tmp_path / "rgba16.png"), over_white(to8(rgb16), to8(alpha))) > 40


def test_float_tiff_in_0_1_and_in_any_other_range(tmp_path):
    """A mode F TIFF encoded as black: Pillow's conversion clips floats at 0..255."""
    unit = (gray16().astype(np.float32) / 65535).astype(np.float32)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    want = rgb_of(np.rint(unit.astype(np.float64) * 255).astype(np.uint8))
    assert psnr(load_image(tmp_path / "unit.tif"), want) > 50
    wide = unit * 8 - 3  # [-3, 5]: stretched from its own range
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    assert psnr(load_image(tmp_path / "wide.tif"), want) > 45
    Image.fromarray(np.full((4, 4), 128.0, np.float32)).save(tmp_path / "flat.tif")
    assert (load_image(tmp_path / "flat.tif") == 128).all()


def test_float_tiff_with_nan_is_refused_by_mode(tmp_path):
    f = np.zeros((4, 4), np.float32)
    f[1, 1] = np.nan
    Image.fromarray(f).save(tmp_path / "nan.tif")
    with pytest.raises(MiscError, match="mode F.*NaN"):
        load_image(tmp_path / "nan.tif")


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.fromarray(picture()).quantize(32)
    pal.save(tmp_path / "p.png")
    want = np.asarray(pal.convert("RGB"))
    assert psnr(load_image(tmp_path / "p.png"), want) == float("inf")
    index = np.asarray(pal)
    pal.save(tmp_path / "pt.png", transparency=int(index[0, 0]))
    assert Image.open(tmp_path / "pt.png").mode == "P"
    holes = want.copy()
    holes[index == index[0, 0]] = 255  # the transparent index shows the white it is composited over
    assert psnr(load_image(tmp_path / "pt.png"), holes) == float("inf")


def test_a_transparency_key_on_gray_or_rgb_is_composited_too(tmp_path):
    rgb = picture()
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    key = tuple(int(c) for c in rgb[5, 7])
    Image.fromarray(gray).save(tmp_path / "lt.png", transparency=int(gray[5, 7]))
    Image.fromarray(rgb).save(tmp_path / "rgbt.png", transparency=key)
    want_gray = rgb_of(np.where(gray == gray[5, 7], 255, gray).astype(np.uint8))
    want_rgb = np.where((rgb == key).all(axis=2)[..., None], 255, rgb).astype(np.uint8)
    assert psnr(load_image(tmp_path / "lt.png"), want_gray) == float("inf")
    assert psnr(load_image(tmp_path / "rgbt.png"), want_rgb) == float("inf")


def test_alpha_modes_are_composited_over_white(tmp_path):
    rgb = picture()
    alpha = np.linspace(0, 255, rgb.shape[0] * rgb.shape[1]).reshape(rgb.shape[:2]).astype(np.uint8)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([gray, alpha]), "LA").save(tmp_path / "la.png")
    pal = Image.fromarray(rgb).quantize(32)
    pa = pal.convert("PA")
    pa.putalpha(Image.fromarray(alpha))
    pa.save(tmp_path / "pa.tif")
    assert Image.open(tmp_path / "pa.tif").mode == "PA"
    cases = {"rgba.png": over_white(rgb, alpha), "la.png": over_white(rgb_of(gray), alpha),
             "pa.tif": over_white(np.asarray(pal.convert("RGB")), alpha)}
    for name, want in cases.items():
        assert psnr(load_image(tmp_path / name), want) > 45, name


def test_cmyk_jpeg_and_1_bit(tmp_path):
    rgb = picture()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert psnr(load_image(tmp_path / "cmyk.jpg"), rgb) > 40
    bits = (np.asarray(Image.fromarray(rgb).convert("L")) > 128)
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    assert psnr(load_image(tmp_path / "bits.png"), rgb_of(bits.astype(np.uint8) * 255)) == float("inf")


@pytest.mark.parametrize("orientation,turns", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_honoured(tmp_path, orientation, turns):
    """6: the viewer turns the stored picture 90 degrees clockwise; 8: counter-clockwise; 3: half a turn."""
    shown = picture(40, 64)
    stored = Image.fromarray(np.rot90(shown, -turns).copy())  # what a camera held that way writes
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "turned.jpg", quality=95, exif=exif)
    stored.save(tmp_path / "plain.jpg", quality=95)
    got = load_image(tmp_path / "turned.jpg")
    assert got.shape == shown.shape
    assert (got == np.rot90(load_image(tmp_path / "plain.jpg"), turns)).all()  # the same pixels, turned
    assert psnr(got, shown) > 35


def test_a_mode_miscnet_cannot_convert_is_refused_by_name(tmp_path):
    Image.new("LAB", (4, 4)).save(tmp_path / "lab.tif")
    with pytest.raises(MiscError, match="has mode LAB") as exc:
        load_image(tmp_path / "lab.tif")
    assert "\n" not in str(exc.value)


def test_16_bit_png_encodes_as_its_picture(capsys, tmp_path):
    """End to end: the reconstruction of a 16-bit PNG is compared with its 8-bit picture."""
    v = gray16(96, 128)
    Image.fromarray(v).save(tmp_path / "g16.png")
    Image.fromarray(rgb_of(to8(v))).save(tmp_path / "g8.png")
    (tmp_path / "g16.json").write_text(json.dumps({"objects": [], "caption": "a gray ramp"}))
    assert run(capsys, "encode", tmp_path / "g16.png", "-o", tmp_path / "g.misc", "--bpp", "2")[0] == 0
    code, out, err = run(capsys, "decode", tmp_path / "g.misc", "-o", tmp_path / "g.png",
                         "--reference", tmp_path / "g8.png", "--json")
    assert code == 0, err
    assert json.loads(out)["stages"][-1]["psnr"] > 30


def test_ordinary_rgb_is_untouched(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (33, 47, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert (load_image(tmp_path / "rgb.png") == rgb).all()


# ============================================================================ 3. small things


def test_written_files_follow_the_umask(tmp_path):
    """mkstemp made every output 0600 whatever the umask."""
    old = os.umask(0o022)
    try:
        for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
            os.umask(umask)
            target = tmp_path / f"out-{umask:o}.bin"
            atomic_write_bytes(target, b"x")
            atomic_write_bytes(target, b"y")  # replacing a file too
            assert target.stat().st_mode & 0o777 == mode, oct(umask)
            assert target.read_bytes() == b"y"
        assert not list(tmp_path.glob(".*")), "temporary files left behind"
    finally:
        os.umask(old)


def test_encode_output_follows_the_umask(capsys, tmp_path):
    old = os.umask(0o022)
    try:
        assert run(capsys, "encode", "sample:coffee", "-o", tmp_path / "c.misc", "--pixel", "none")[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "c.misc").stat().st_mode & 0o777 == 0o644


@pytest.fixture(scope="module")
def misc_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pipe") / "c.misc"
    assert main(["encode", "sample:coffee", "-o", str(path)]) == 0
    return path


@pytest.mark.parametrize("argv", [["info", "--json", "{f}"], ["info", "{f}"], ["--help"], ["encode", "--help"],
                                  ["samples", "{d}"], ["encode", "sample:coffee", "-o", "{d}/c.misc", "--json"]])
def test_a_reader_that_closes_the_pipe_early_ends_it_quietly(misc_file, tmp_path, argv):
    """`miscnet info --json f.misc | head -c 1` ended in "Exception ignored ... BrokenPipeError" on stderr
    (exit status 120): the output sat in stdout's buffer until Python flushed it on the way out."""
    argv = [a.format(f=misc_file, d=tmp_path) for a in argv]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a block-buffered stdout, as usual
    proc = subprocess.Popen([sys.executable, "-m", "miscnet", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before miscnet has started: its output finds the reader gone
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and err == b"", err


HOST_PORT_OPTIONS = [
    ["sender", "x.png", "--to", "{}"],
    ["receiver", "--out", "d", "--listen", "{}"],
    ["receiver", "--out", "d", "--metrics", "{}"],
    ["channel", "--forward", "127.0.0.1:1", "--listen", "{}"],
    ["channel", "--forward", "{}"],
    ["channel", "--forward", "127.0.0.1:1", "--metrics", "{}"],
    ["stats", "{}"],
]


@pytest.mark.parametrize("argv", HOST_PORT_OPTIONS)
@pytest.mark.parametrize("bad", ["50059", ":50059", "localhost", "host:", "host:port", "host:65536"])
def test_every_host_port_option_wants_host_and_port(capsys, argv, bad):
    """`sender --to 50059` was taken as a host name and waited out the 10 s connect timeout."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([a.format(bad) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: miscnet {argv[0]} ")
    assert f"needs HOST:PORT, e.g. 127.0.0.1:50059, not {bad!r}" in err.splitlines()[-1]


@pytest.mark.parametrize("argv", HOST_PORT_OPTIONS)
@pytest.mark.parametrize("good", ["127.0.0.1:50059", "localhost:0", "[::1]:65535", "edge-node.example:1"])
def test_host_port_options_take_host_and_port(argv, good):
    args = build_parser().parse_args([a.format(good) for a in argv])
    assert good in vars(args).values()


def test_a_mistyped_option_shows_the_subcommands_usage(capsys, tmp_path):
    """`miscnet encode --budgt 10 x -o y` showed `usage: miscnet [-h] [--version] COMMAND ...`."""
    with pytest.raises(SystemExit) as exc:
        main(["encode", "--budgt", "10", "x.png", "-o", str(tmp_path / "y.misc")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("usage: miscnet encode ")
    assert err.splitlines()[-1] == "miscnet encode: error: unrecognized arguments: --budgt x.png"
    with pytest.raises(SystemExit):
        main(["models", "tiny", "d", "--bogus"])
    err = capsys.readouterr().err
    assert err.startswith("usage: miscnet models tiny ") and err.splitlines()[-1].endswith("--bogus")


def test_a_soft_limit_warning_prints_once(capsys, tmp_path):
    """The loader's warning (naming the sidecar) and the encoder's (not naming it) both printed."""
    Image.fromarray(picture()).save(tmp_path / "img.png")
    _objects_sidecar(tmp_path / "img.json", 5)
    code, out, err = run(capsys, "encode", tmp_path / "img.png", "-o", tmp_path / "img.misc")
    assert code == 0
    assert err.count("5 objects, MISC uses at most 3") == 1, err
    assert err.splitlines() == [f"warning: {tmp_path / 'img.json'}: 5 objects, MISC uses at most 3"]
    code, out, err = run(capsys, "encode", tmp_path / "img.png", "-o", tmp_path / "img.misc", "--json")
    assert code == 0 and err == ""
    assert json.loads(out)["warnings"] == [f"{tmp_path / 'img.json'}: 5 objects, MISC uses at most 3"]
    code, out, err = run(capsys, "encode", tmp_path / "img.png", "-o", tmp_path / "img.misc", "--strict")
    assert code == 2 and err.count("\n") == 1 and "img.json: 5 objects" in err, err  # strict names the file too


@pytest.mark.skipif(not MISC_CSV.is_file(), reason="MISC's example CSV is not in /work/shared")
def test_misc_csv_with_the_default_map_means_no_map_layer(capsys, tmp_path):
    """MISC's CSV has no boxes: with the default map, encode failed and asked for --map none."""
    Image.fromarray(picture()).save(tmp_path / "example.png")  # the CSV's row is for example.png
    out = tmp_path / "example.misc"
    code, _, err = run(capsys, "encode", tmp_path / "example.png", "--semantics", MISC_CSV, "-o", out)
    assert code == 0, err
    assert err.count("\n") == 1 and err.startswith("note: ") and "no map layer" in err, err
    code, text, _ = run(capsys, "info", out, "--json")
    info = json.loads(text)
    assert [ly["kind"] for ly in info["layers"]][:2] == ["semantic", "pixel"]
    assert [o["name"] for o in info["semantics"]["objects"]] == ["Astronaut Helmet", "Blue Hair",
                                                                 "Orange Paint Splatter"]
    assert run(capsys, "decode", out, "-o", tmp_path / "example-out.png")[0] == 0
    # asked for by name, boxes are still required
    code, _, err = run(capsys, "encode", tmp_path / "example.png", "--semantics", MISC_CSV, "-o",
                       tmp_path / "again.misc", "--map", "boxes")
    assert code == 2 and err.count("\n") == 1 and "needs a box" in err

"""Inputs: what the encoder accepts the decoder reads (object counts, image sizes), every kind of image file
becomes the RGB picture it shows, and the command line's small contracts (output permissions, a closed
pipe, HOST:PORT options, a subcommand's own usage, each warning once, MISC's CSV with the default map)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from miscnet.cli.main import main
from miscnet.core import container, image_io
from miscnet.core.errors import MiscError
from miscnet.core.image_io import check_image_size, load_image
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

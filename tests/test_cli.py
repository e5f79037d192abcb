"""The CLI contract: encode / decode / info on the samples and on a foreign image; bad input."""

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

from miscnet.cli.main import main
from miscnet.core.samples import SAMPLE_NAMES, sample_sidecar_path

ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def encode_json(capsys, *argv):
    code, out, err = run(capsys, "encode", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_encode_decode_info_on_every_sample(capsys, tmp_path, name):
    misc = tmp_path / f"{name}.misc"
    report = encode_json(capsys, f"sample:{name}", "-o", misc)
    assert report["bytes"] == misc.stat().st_size
    assert report["bpp"] == pytest.approx(report["bytes"] * 8 / (report["width"] * report["height"]))
    assert report["overhead_bytes"] == report["bytes"] - sum(ly["bytes"] for ly in report["layers"])
    kinds = [(ly["kind"], ly["level"]) for ly in report["layers"]]
    assert kinds == [("semantic", 0), ("map", 0), ("pixel", 0), ("pixel", 1)]
    assert report["misc_text_bytes"] > 3 * report["layers"][0]["bytes"]  # the text is entropy coded

    out = tmp_path / "out.png"
    code, stdout, err = run(capsys, "decode", misc, "-o", out, "--stages", tmp_path / "st", "--json")
    assert code == 0, err
    decoded = json.loads(stdout)
    with Image.open(out) as im:
        assert im.size == (report["width"], report["height"])
    stage_files = sorted((tmp_path / "st").glob("*.png"))
    assert [p.name for p in stage_files] == ["00-semantic.png", "01-map.png", "02-pixel.0.png", "03-pixel.1.png"]
    assert [s["payload_bytes"] for s in decoded["stages"]] == sorted(s["payload_bytes"] for s in decoded["stages"])

    code, stdout, err = run(capsys, "info", misc, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    sidecar = json.loads(sample_sidecar_path(name).read_text())
    assert info["semantics"]["caption"] == sidecar["caption"]
    assert [o["name"] for o in info["semantics"]["objects"]] == [o["name"] for o in sidecar["objects"]]


def test_foreign_image_with_budget_and_quality(capsys, tmp_path, foreign_image):
    image, _ = foreign_image
    misc = tmp_path / "g.misc"
    report = encode_json(capsys, image, "-o", misc, "--budget", 900)
    assert report["bytes"] <= 900 and (report["width"], report["height"]) == (333, 217)
    code, out, err = run(capsys, "decode", misc, "-o", tmp_path / "g.png", "--reference", image, "--json")
    assert code == 0, err
    stages = json.loads(out)["stages"]
    assert stages[0]["psnr"] is None  # no quality figure for a picture of the semantics
    psnrs = [s["psnr"] for s in stages if s["psnr"] is not None]
    assert psnrs and psnrs[-1] >= psnrs[0] and psnrs[-1] > 20


@pytest.mark.parametrize("codec", ["block", "webp", "avif", "jpeg"])
def test_each_pixel_codec_and_bpp_budget(capsys, tmp_path, codec):
    misc = tmp_path / "a.misc"
    report = encode_json(capsys, "sample:coffee", "-o", misc, "--pixel", codec, "--bpp", "0.08", "--levels", 1)
    assert report["bytes"] * 8 <= 0.08 * report["width"] * report["height"]
    assert report["layers"][-1]["codec"] == codec


def test_more_budget_gives_better_quality(capsys, tmp_path):
    psnr = []
    for budget in (1200, 4000):
        misc = tmp_path / f"{budget}.misc"
        encode_json(capsys, "sample:astronaut", "-o", misc, "--budget", budget)
        code, out, _ = run(capsys, "decode", misc, "-o", tmp_path / "x.png", "--json",
                           "--reference", "sample:astronaut")
        assert code == 0
        psnr.append(json.loads(out)["stages"][-1]["psnr"])
    assert psnr[1] > psnr[0] + 1.0


def test_same_input_gives_same_bytes(capsys, tmp_path):
    for name in ("a", "b"):
        assert run(capsys, "encode", "sample:chelsea", "-o", tmp_path / f"{name}.misc")[0] == 0
    assert (tmp_path / "a.misc").read_bytes() == (tmp_path / "b.misc").read_bytes()


def _bomb_png(path: Path) -> None:
    """A valid tiny PNG whose header claims 100000 x 100000 pixels."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # 'IHDR' + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", 100000, 100000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def _cases(tmp_path: Path, foreign_image):
    image, sidecar = foreign_image
    good = tmp_path / "good.misc"
    assert main(["encode", str(image), "-o", str(good)]) == 0
    data = good.read_bytes()
    (tmp_path / "trunc.misc").write_bytes(data[: len(data) // 2])
    (tmp_path / "flip.misc").write_bytes(data[:20] + bytes([data[20] ^ 1]) + data[21:])
    (tmp_path / "text.png").write_text("not an image")
    _bomb_png(tmp_path / "bomb.png")
    (tmp_path / "bad.json").write_text('{"objects": [{"name": 3}], "caption": "x"}')
    (tmp_path / "long.json").write_text(json.dumps({"objects": [], "caption": "word " * 5000}))
    return [
        (["decode", tmp_path / "trunc.misc", "-o", tmp_path / "o.png"], "checksum"),
        (["decode", tmp_path / "flip.misc", "-o", tmp_path / "o.png"], "checksum"),
        (["decode", image, "-o", tmp_path / "o.png"], "magic"),
        (["info", tmp_path / "missing.misc"], "cannot read"),
        (["encode", tmp_path / "text.png", "-o", tmp_path / "o.misc", "--semantics", sidecar], "not an image"),
        (["encode", tmp_path / "bomb.png", "-o", tmp_path / "o.misc", "--semantics", sidecar], "limit"),
        (["encode", image, "-o", tmp_path / "o.misc", "--semantics", tmp_path / "bad.json"], "bad.json"),
        (["encode", image, "-o", tmp_path / "o.misc", "--semantics", tmp_path / "long.json"], "long.json"),
        (["encode", image, "-o", tmp_path / "o.misc", "--budget", 50], "budget"),
        (["encode", tmp_path / "nowhere.png", "-o", tmp_path / "o.misc"], "cannot read"),
        (["encode", "sample:nosuch", "-o", tmp_path / "o.misc"], "nosuch"),
    ]


def test_bad_input_gives_one_line_and_no_output(capsys, tmp_path, foreign_image):
    for argv, needle in _cases(tmp_path, foreign_image):
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert err.count("\n") == 1 and err.startswith("miscnet: ") and needle in err, (argv, err)
        assert not (tmp_path / "o.png").exists() and not (tmp_path / "o.misc").exists(), argv
        assert not list(tmp_path.glob(".o.*")), "temporary output left behind"


def test_failed_encode_keeps_an_existing_good_file(capsys, tmp_path, foreign_image):
    image, _ = foreign_image
    target = tmp_path / "keep.misc"
    assert main(["encode", str(image), "-o", str(target)]) == 0
    before = target.read_bytes()
    assert main(["encode", str(image), "-o", str(target), "--budget", "40"]) == 2
    assert target.read_bytes() == before


def test_console_script_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.misc"
    bad.write_bytes(b"MISC" + os.urandom(50))
    proc = subprocess.run([sys.executable, "-m", "miscnet", "decode", str(bad), "-o",
                           str(tmp_path / "o.png")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("miscnet: ")


def test_decoding_random_image_sizes(capsys, tmp_path):
    rng = np.random.default_rng(3)
    for w, h in [(1, 1), (17, 5), (64, 300)]:
        path = tmp_path / f"r{w}x{h}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        side = tmp_path / f"r{w}x{h}.json"
        side.write_text(json.dumps({"objects": [{"name": "Noise", "detail": "Random pixels.",
                                                 "box": [0, 0, 1, 1]}], "caption": "Random noise."}))
        code, out, err = run(capsys, "encode", path, "-o", tmp_path / "r.misc", "--json")
        assert code == 0, err
        code, out, err = run(capsys, "decode", tmp_path / "r.misc", "-o", tmp_path / "r.png")
        assert code == 0, err
        with Image.open(tmp_path / "r.png") as im:
            assert im.size == (w, h)


def test_version(capsys):
    import miscnet

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"miscnet {miscnet.__version__}"


# The child runs one command and, at exit, writes the names of every module it imported.
_MODULES_AT_EXIT = """
import atexit, json, sys
out = sys.argv[1]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
from miscnet.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def _modules_of(tmp_path: Path, name: str, *argv, stop_when=None) -> list[str]:
    """The modules `miscnet ARGV` imports; a server is stopped with SIGTERM once stop_when() holds."""
    import signal
    import time

    record = tmp_path / f"{name}.modules.json"
    proc = subprocess.Popen([sys.executable, "-c", _MODULES_AT_EXIT, str(record), *map(str, argv)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if stop_when is not None:
            deadline = time.monotonic() + 60
            while not stop_when() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err, err
    assert record.exists(), (out, err)
    return json.loads(record.read_text())


def test_live_nodes_import_no_experiments_and_no_matplotlib(tmp_path, foreign_image):
    import socket

    image, _ = foreign_image
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    sender = _modules_of(tmp_path, "sender", "sender", image, "--to", f"127.0.0.1:{closed}",
                         "--connect-timeout", "0.5")
    assert "miscnet.sender.encoder" in sender and "miscnet.sender.node" in sender  # it did encode and send
    port_rx, port_ch = tmp_path / "rx.port", tmp_path / "ch.port"
    receiver = _modules_of(tmp_path, "receiver", "receiver", "--listen", "127.0.0.1:0", "--port-file", port_rx,
                           "--out", tmp_path / "rx", stop_when=port_rx.exists)
    assert "miscnet.receiver.node" in receiver and port_rx.exists()
    channel = _modules_of(tmp_path, "channel", "channel", "--listen", "127.0.0.1:0", "--port-file", port_ch,
                          "--forward", f"127.0.0.1:{closed}", stop_when=port_ch.exists)
    assert "miscnet.channel.relay" in channel and port_ch.exists()
    for command, modules in (("sender", sender), ("receiver", receiver), ("channel", channel)):
        bad = [m for m in modules if m.split(".")[0] in ("matplotlib", "experiments")
               or m.startswith("miscnet.experiments")]
        assert not bad, f"miscnet {command} imported {bad[:5]}"


def test_help_defaults_are_the_config_defaults(capsys):
    """Every option's default is the config dataclasses' (and what the help text shows)."""
    from miscnet.channel.transport import TransportConfig
    from miscnet.cli.main import build_parser, encoder_config, transport_config
    from miscnet.cli.models import decoder_config
    from miscnet.core.config import DecoderConfig, DiffusionConfig, EncoderConfig

    parser = build_parser()
    for argv in (["simulate", "x.png"], ["sender", "x.png", "--to", "h:1"]):
        args = parser.parse_args(argv)
        assert encoder_config(args) == EncoderConfig()
        assert transport_config(args) == TransportConfig()
    assert decoder_config(parser.parse_args(["decode", "a.misc", "-o", "b.png"])) == DecoderConfig()
    args = parser.parse_args(["receiver", "--out", "d", "--decoder", "diffusion", "--steps", "9", "--no-color-fix"])
    assert decoder_config(args) == DecoderConfig("diffusion", DiffusionConfig(steps=9, color_fix=False))
    with pytest.raises(SystemExit):
        parser.parse_args(["decode", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    d = DiffusionConfig()
    assert f"(default {d.steps})" in text and f"(default {d.guidance:g})" in text and repr(d.negative_prompt) in text

"""Scenarios, sweeps and baselines: the grid, resume, determinism across workers and Dask, bad scenarios."""

import argparse
import csv
import io
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from miscnet.core.container import from_bytes, to_bytes
from miscnet.core.errors import BitstreamError
from miscnet.core.pixel import PixelLevel, decode_pixels
from miscnet.experiments.baselines import encode_baseline, encode_progressive_jpeg
from miscnet.experiments.scenario import ScenarioError, load_scenario, parse_scenario, simulation_seed
from miscnet.experiments.sweep import CSV_FIELDS, run_sweep


def _image(seed: int, w: int, h: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=-1).astype(np.float64)
    img[h // 4 : h // 2, w // 3 : 2 * w // 3] = (200, 40, 40)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Two small images with sidecars: encoding them takes milliseconds."""
    folder = tmp_path_factory.mktemp("photos")
    for i, (w, h) in enumerate([(96, 64), (80, 80)]):
        Image.fromarray(_image(i, w, h)).save(folder / f"img{i}.png")
        (folder / f"img{i}.json").write_text(json.dumps({
            "objects": [{"name": "Red Box", "detail": "A flat red rectangle.", "box": [0.33, 0.25, 0.66, 0.5]}],
            "caption": "A red rectangle on a smooth colour gradient with fine noise over everything."}))
    return folder


SCENARIO = """
name = "tiny"
description = "test"
[images]
paths = ["{photos}"]
[encoder]
pixel = "jpeg"
levels = 2
[link]
rate = "64kbit"
delay = "20ms"
[protection]
mode = "none"
[run]
seeds = 3
[baselines]
codecs = ["jpeg", "jpeg-progressive"]
[sweep]
"link.loss" = ["random 20%", "gemodel 5% 30%"]
"protection.mode" = ["none", "hybrid"]
"""


def _write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def scenario(tmp_path, photos) -> Path:
    return _write(tmp_path, SCENARIO.format(photos=photos))


def _csv(out: Path) -> str:
    return (out / "results.csv").read_text()


# ---------------------------------------------------------------------------------------------- the grid

def test_grid_expands_as_written(tmp_path, photos):
    path = _write(tmp_path, f"""
        [images]
        paths = ["{photos}/img0.png"]
        [sweep]
        "link.rate" = ["8kbit", "16kbit", "32kbit"]
        protection = {{ mode = ["arq", "fec"] }}
        [[case]]
        name = "small"
        encoder = {{ bpp = 0.5 }}
        [[case]]
        name = "big"
        "encoder.budget" = 5000
    """)
    spec = load_scenario(path)
    assert spec.name == "s" and len(spec.configs) == 2 * 3 * 2
    got = [(c.case, c.params["link.rate"], c.params["protection.mode"]) for c in spec.configs]
    want = [(case, rate, mode) for case in ("small", "big") for rate in ("8kbit", "16kbit", "32kbit")
            for mode in ("arq", "fec")]
    assert got == want  # cases outermost, then the sweep keys in the order written
    assert [c.id for c in spec.configs] == [f"c{i:03d}" for i in range(12)]
    assert spec.configs[0].label == "small, rate=8kbit, mode=arq"
    assert spec.configs[0].params["encoder.bpp"] == 0.5 and spec.configs[0].params["encoder.budget"] is None
    assert spec.configs[-1].params["encoder.budget"] == 5000 and spec.configs[-1].params["encoder.bpp"] is None
    assert spec.configs[0].swept == {"encoder.bpp": 0.5, "link.rate": "8kbit", "protection.mode": "arq"}
    # every other key keeps its default, and the configuration objects build
    c = spec.configs[0]
    assert c.params["link.delay"] == "0ms" and c.params["protection.max_rounds"] == 12
    assert c.transport_config().mode == "arq" and c.link_config().forward.rate_bps == 8000
    points = spec.points()
    assert len(points) == 12 * 1 * 1 * 1 and len({p.id for p in points}) == 12


def test_points_and_seeds(scenario):
    spec = load_scenario(scenario)
    points = spec.points()
    assert len(points) == len(spec.configs) * 2 * 3 * 3  # configs x images x seeds x methods
    assert [p.method for p in points[:3]] == ["misc", "jpeg", "jpeg-progressive"]
    assert points == load_scenario(scenario).points()  # ids are stable
    # one random stream per (image, seed), shared by every configuration and method
    assert points[0].sim_seed == simulation_seed(0, spec.images[0].name) == points[1].sim_seed
    assert len({p.sim_seed for p in points}) == 2 * 3
    smoke = spec.smoke()
    assert len(smoke.images) == 1 and smoke.seeds == (0,)


def test_a_scenario_from_a_dict_and_its_report_settings(photos):
    spec = parse_scenario({"images": {"paths": [str(photos / "img1.png")]}, "run": {"seeds": [7, 3]},
                           "sweep": {"link.loss": ["random 1%", "gemodel 1% 10%"]},
                           "report": {"series": ["link.loss"], "labels": {"gemodel 1% 10%": "bursts"}}},
                          source="<dict>")
    assert spec.name == "scenario" and spec.seeds == (7, 3) and spec.methods == ("misc",)
    assert spec.settings["report.labels"] == {"gemodel 1% 10%": "bursts"}
    assert [c.label for c in spec.configs] == ["loss=random 1%", "loss=gemodel 1% 10%"]
    with pytest.raises(ScenarioError, match=r"^<dict>: run\.seeds: seeds repeat"):
        parse_scenario({"images": {"samples": ["coffee"]}, "run": {"seeds": [1, 1]}}, source="<dict>")


def test_scenario_defaults_are_the_config_defaults_and_keys_reach_the_configs(photos):
    from miscnet.channel.transport import TransportConfig
    from miscnet.cli.main import build_parser, encoder_config, transport_config
    from miscnet.cli.models import decoder_config
    from miscnet.core.config import DecoderConfig, DiffusionConfig, EncoderConfig, MapConfig, SemanticsConfig
    from miscnet.core.errors import MiscError

    (c,) = parse_scenario({"images": {"paths": [str(photos / "img1.png")]}}).configs
    assert c.encoder_config() == EncoderConfig() and c.decoder_config() == DecoderConfig()
    assert c.transport_config() == TransportConfig()
    args = build_parser().parse_args(["simulate", "x.png"])  # one set of defaults: the CLI's are the same
    assert (encoder_config(args), decoder_config(args), transport_config(args)) == (
        c.encoder_config(), c.decoder_config(), c.transport_config())
    (c,) = parse_scenario({"images": {"paths": [str(photos / "img1.png")]},
                           "encoder": {"map": "clip", "clip_model": "m", "map_threshold": 0.5, "model_device": "cpu",
                                       "grid": 6, "semantic": "hf", "vlm_model": "v", "lmm_max_tokens": 9,
                                       "strict": True, "pixel": "webp", "levels": 1, "bpp": 0.05},
                           "protection": {"mode": "fec", "fec_symbols": 2, "deadline": 3.0},
                           "decoder": {"name": "diffusion", "steps": 5, "color_fix": False, "size": 256}}).configs
    assert c.encoder_config() == EncoderConfig(
        pixel_codec="webp", levels=1, bpp=0.05, map=MapConfig("clip", 6, "m", 0.5, "cpu"),
        semantics=SemanticsConfig(backend="hf", vlm_model="v", lmm_max_tokens=9, device="cpu", strict=True))
    assert c.semantics_config().sidecar is None
    with pytest.raises(MiscError, match="cannot be combined"):  # images.semantics is for the sidecar backend
        c.semantics_config("s.json")
    assert c.transport_config() == TransportConfig(mode="fec", fec_min_symbols=2, deadline_s=3.0)
    assert c.decoder_config() == DecoderConfig("diffusion", DiffusionConfig(steps=5, color_fix=False, size=256))


def test_point_ids_ignore_keys_left_at_their_defaults(photos):
    """A key set to its default (as a key added to miscnet later is, in old results) keeps every point id,
    so --resume still finds the points of a results folder written before the key existed."""
    images = {"paths": [str(photos / "img1.png")]}
    plain = parse_scenario({"images": images, "link": {"rate": "32kbit"}}).points()
    spelled = parse_scenario({"images": images, "link": {"rate": "32kbit", "reorder": "none", "delay": "0ms"},
                              "encoder": {"levels": 2}}).points()
    assert [p.id for p in plain] == [p.id for p in spelled]
    other = parse_scenario({"images": images, "link": {"rate": "32kbit", "reorder": "5%", "delay": "9ms"}}).points()
    assert {p.id for p in plain}.isdisjoint(p.id for p in other)


def test_scenario_and_cli_links_come_from_one_link_spec(photos):
    from miscnet.channel.link import LinkSpec
    from miscnet.cli.main import build_parser, link_config
    from miscnet.core.errors import MiscError

    images = {"paths": [str(photos / "img1.png")]}
    (c,) = parse_scenario({"images": images}).configs
    args = build_parser().parse_args(["simulate", "x.png"])
    assert c.link_config() == link_config(args) == LinkSpec().build()
    assert LinkSpec().build().forward.describe()["rate"] == "64000bit"  # DEFAULT_RATE when neither rate nor trace
    link = {"rate": "32kbit", "delay": "30ms", "jitter": "2ms", "loss": "random 3%", "reorder": "10% gap 3",
            "queue": 4000, "loss_before_queue": True, "reverse_rate": "2mbit", "reverse_delay": "5ms",
            "reverse_loss": "random 1%"}
    (c,) = parse_scenario({"images": images, "link": link}).configs
    args = build_parser().parse_args(["simulate", "x.png", "--rate", "32kbit", "--delay", "30ms", "--jitter", "2ms",
                                      "--loss", "random 3%", "--reorder", "10% gap 3", "--queue", "4000",
                                      "--reverse-rate", "2mbit", "--reverse-delay", "5ms",
                                      "--reverse-loss", "random 1%"])
    expected = LinkSpec(**link).build()
    assert c.link_config() == expected
    assert link_config(args) == LinkSpec(**{**link, "loss_before_queue": False}).build()  # no CLI flag for it
    assert expected.forward.reorder != "none" and expected.forward.loss_before_queue
    with pytest.raises(MiscError, match="reorder"):
        parse_scenario({"images": images, "link": {"reorder": "lots"}})


# ---------------------------------------------------------------------------------------------- bad scenarios

@pytest.mark.parametrize("body, where, what", [
    ('bogus = 1', "bogus", "unknown key"),
    ('[link]\nrat = "8kbit"', "link.rat", "did you mean 'link.rate'"),
    ('[link]\nrate = "fast"', "link.rate", "rate"),
    ('[link]\nloss = "random 120%"', "link.loss", "0..100"),
    ('[protection]\nmode = "magic"', "protection.mode", "not one of"),
    ('[encoder]\nlevels = 9', "encoder.levels", "outside 1..4"),
    ('[encoder]\nlevels = "2"', "encoder.levels", "expected an integer"),
    ('[sweep]\n"link.rate" = ["8kbit", "8 kbit"]', 'sweep."link.rate"[1]', "unit"),
    ('[sweep]\n"link.rate" = "8kbit"', 'sweep."link.rate"', "non-empty list"),
    ('[sweep]\n"run.seeds" = [1, 2]', 'sweep."run.seeds"', "cannot be swept"),
    ('[sweep]\n"link.speed" = [1]', 'sweep."link.speed"', "unknown key"),
    ('[encoder]\nbudget = 900\nbpp = 0.1', "encoder", "both set"),
    ('[encoder]\nbudget = 900\n[sweep]\n"encoder.bpp" = [0.1]', "configuration c000 (bpp=0.1)", "both set"),
    ('[[case]]\nlink = { rate = "1kbit" }', "case[0]", "needs a name"),
    ('[[case]]\nname = "a"\nlink = { rat = "1kbit" }', "case[0] (a).link.rat", "unknown key"),
    ('[run]\nseeds = []', "run.seeds", "non-empty"),
    ('[baselines]\ncodecs = ["jpeg2000"]', "baselines.codecs", "unknown baseline codec"),
    ('[report]\nseries = ["link.speed"]', "report.series", "unknown key"),
    ('[report]\nlabels = { a = 1 }', "report.labels", "expected a table"),
    ('[images]\nsamples = ["lena"]', "images.samples", "unknown sample"),
    ('[images]\npaths = ["nowhere/*.png"]', "images.paths[0]", "matches no image"),
    ('[link]\ntrace = "missing.trace"', "link", "missing.trace"),
    ('[protection]\nfec_strong_rate = 0.01', "protection.fec_strong_rate", "must be >= 0.05"),
])
def test_malformed_scenarios_name_the_file_and_the_key(tmp_path, body, where, what):
    path = _write(tmp_path, body + ('\n[images]\nsamples = ["astronaut"]\n' if "[images]" not in body else ""),
                  "bad.toml")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {where}: ") and what in msg and "\n" not in msg


def test_not_toml_and_no_images(tmp_path):
    with pytest.raises(ScenarioError, match=r"bad\.toml: not valid TOML"):
        load_scenario(_write(tmp_path, "[link\nrate=1", "bad.toml"))
    with pytest.raises(ScenarioError, match=r"empty\.toml: images: no images"):
        load_scenario(_write(tmp_path, "", "empty.toml"))
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "absent.toml")


def test_cli_reports_a_bad_scenario_in_one_line(tmp_path, capsys):
    from miscnet.cli.sweep import register
    from miscnet.core.errors import MiscError

    parser = argparse.ArgumentParser(prog="miscnet")
    sweep_parser = register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sweep", str(_write(tmp_path, "[link]\nrate = 5", "x.toml")), "-o", str(tmp_path / "o")])
    with pytest.raises(MiscError, match=r"x\.toml: images: no images"):
        args.func(args)
    help_text = sweep_parser.format_help()  # the scenario keys, read when help is shown
    assert "scenario keys (section.key):" in help_text and "protection.fec_symbols" in help_text


# ---------------------------------------------------------------------------------------------- running

def test_resumed_sweep_gives_the_same_csv(scenario, tmp_path):
    spec = load_scenario(scenario)
    full = run_sweep(spec, tmp_path / "full", workers=1, quiet=True, plots=False)
    n = full.points
    assert full.run == n and full.reused == 0 and full.errors == 0

    part = tmp_path / "part"
    first = run_sweep(spec, part, workers=1, quiet=True, limit=7, plots=False)
    assert first.run == 7
    with (part / "points.jsonl").open("a") as f:
        f.write('{"id": "torn li')  # a run killed mid-write
    with pytest.raises(Exception, match="pass --resume"):
        run_sweep(spec, part, workers=1, quiet=True, plots=False)
    second = run_sweep(spec, part, workers=1, quiet=True, resume=True, plots=False)
    assert second.reused == 7 and second.run == n - 7
    assert _csv(part) == _csv(tmp_path / "full")
    again = run_sweep(spec, part, workers=1, quiet=True, resume=True, plots=False)
    assert again.run == 0 and _csv(part) == _csv(tmp_path / "full")


def test_same_numbers_with_one_and_two_workers_and_dask(scenario, tmp_path):
    distributed = pytest.importorskip("distributed")
    spec = load_scenario(scenario)
    one = run_sweep(spec, tmp_path / "one", workers=1, quiet=True)
    two = run_sweep(spec, tmp_path / "two", workers=2, quiet=True, plots=False)
    assert one.workers == 1 and two.workers == 2 and one.run == two.run == len(spec.points())
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp", host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        dask = run_sweep(spec, tmp_path / "dask", dask=cluster.scheduler_address, quiet=True, plots=False)
    assert dask.workers == 2
    text = _csv(tmp_path / "one")
    assert text == _csv(tmp_path / "two") == _csv(tmp_path / "dask")
    for name in ("summary.json",):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()

    # the CSV: one row per event, every parameter, rows in plan order
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == CSV_FIELDS
    assert {r["method"] for r in rows} == {"misc", "jpeg", "jpeg-progressive"}
    assert {r["link.loss"] for r in rows} == {"random 20%", "gemodel 5% 30%"}
    assert any(r["completed"] == "false" for r in rows) and any(r["stage"] == "pixel.1" for r in rows)
    misc = [r for r in rows if r["method"] == "misc" and r["layers"].startswith("semantic")]
    assert misc and all(r["first_semantic_time_s"] for r in misc)
    assert all(float(r["bpp"]) <= float(r["file_bpp"]) for r in rows if r["stage"])
    # baselines never get more bytes than the MISC file of the same image and encoder
    for r in rows:
        if r["method"] != "misc" and r["stage"] and r["fits_budget"] == "true":
            assert int(r["file_bytes"]) <= int(r["budget_bytes"])

    # CompressAI-style JSON per configuration and method, and the figures
    out = tmp_path / "one"
    files = sorted((out / "compressai").glob("*.json"))
    assert len(files) == len(spec.configs) * 3
    cj = json.loads(files[0].read_text())
    assert {"name", "description", "results", "time"} <= set(cj)
    res = cj["results"]
    assert len(res["bpp"]) == len(res["psnr-rgb"]) == len(res["ms-ssim-rgb"]) == len(res["time-s"]) >= 1
    assert res["bpp"] == sorted(res["bpp"])
    for png in ("quality_bytes.png", "quality_time.png", "first_stage_time.png", "protection.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 800


# ---------------------------------------------------------------------------------------------- baselines

def test_baselines_fit_the_budget_and_decode_through_the_receiver():
    image = _image(3, 160, 120)
    for codec in ("jpeg", "webp", "avif", "jpeg-progressive"):
        base = encode_baseline(image, codec, 1500)
        assert base.fits and base.bytes <= 1500 and base.wire_bytes == len(to_bytes(base.encoded)) <= 1500
        enc = from_bytes(to_bytes(base.encoded))
        assert [ly.kind for ly in enc.layers] == [3] * len(enc.layers)  # pixel layers only
        levels = [PixelLevel(ly.level, ly.codec, ly.pixel, ly.payload) for ly in enc.layers]
        assert decode_pixels(levels, 160, 120).shape == (120, 160, 3)
    full = encode_baseline(image, "jpeg", 100, raster="full")
    assert not full.fits and full.quality == 1 and (full.width, full.height) == (160, 120)


def test_progressive_jpeg_levels_refine_and_bad_payloads_fail():
    image = _image(4, 128, 96)
    levels = encode_progressive_jpeg(image, 128, 96, 60, levels=3)
    assert len(levels) == 3 and levels[0].payload.startswith(b"\xff\xd8")
    errors = [np.abs(decode_pixels(levels[:k], 128, 96).astype(float) - image).mean() for k in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]
    whole = Image.open(io.BytesIO(b"".join(lv.payload for lv in levels) + b"\xff\xd9"))
    assert whole.format == "JPEG" and whole.info.get("progressive")
    bad = [
        [PixelLevel(0, levels[0].codec, levels[0].params, b"\x00" + levels[0].payload[1:])],  # no SOI
        [levels[0], PixelLevel(1, levels[1].codec, levels[1].params, levels[1].payload[5:])],  # mid-segment
        [PixelLevel(0, levels[0].codec, levels[0].params, levels[0].payload[:100])],  # headers cut short
        [levels[0], PixelLevel(1, levels[1].codec, levels[1].params, levels[1].payload + b"\xff\xd9\x00")],
    ]
    for lv in bad:
        with pytest.raises(BitstreamError):
            decode_pixels(lv, 128, 96)


# ---------------------------------------------------------------------------------------------- backends

def test_a_shared_semantics_file_is_used(tmp_path, photos):
    folder = tmp_path / "bare"
    folder.mkdir()
    Image.open(photos / "img0.png").save(folder / "bare.png")  # no sidecar beside it
    shared = tmp_path / "shared.json"
    shared.write_text(json.dumps({"objects": [{"name": "Lone Tree", "detail": "A tree.", "box": [0, 0, 1, 1]}],
                                  "caption": "A picture of a lone tree on a hill under a grey sky."}))
    with pytest.raises(ScenarioError, match=r"images\.paths\[0\]: .*no semantics"):
        load_scenario(_write(tmp_path, f'[images]\npaths = ["{folder}"]\n', "nosem.toml"))
    spec = load_scenario(_write(tmp_path, f'[images]\npaths = ["{folder}"]\nsemantics = "shared.json"\n'
                                          '[encoder]\npixel = "jpeg"\n[baselines]\ncodecs = []\n', "sem.toml"))
    run_sweep(spec, tmp_path / "out", workers=1, quiet=True, plots=False)
    out = tmp_path / "out" / "points.jsonl"
    (rec,) = [json.loads(line)["result"] for line in out.read_text().splitlines()]
    assert rec["events"][0]["layers"] == "semantic+map" and rec["completed"]


@pytest.mark.parametrize("body, what", [
    ('[decoder]\nname = "diffusion"', "decoder"),
    ('[encoder]\nmap = "clip"', "map"),
])
def test_missing_model_weights_stop_the_sweep_before_any_work(tmp_path, photos, monkeypatch, body, what):
    for var in ("MISCNET_MODELS_DIR", "MISCNET_DIFFUSION_MODEL", "MISCNET_CLIP_MODEL", "MISCNET_CONTROLNET_MODEL",
                "MISCNET_UPSCALER_MODEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = load_scenario(_write(tmp_path, f'[images]\npaths = ["{photos}/img0.png"]\n{body}\n'))
    with pytest.raises(ScenarioError, match=rf"s\.toml: configuration c000 \(default\): {what}: "):
        run_sweep(spec, tmp_path / "out", workers=1, quiet=True)
    assert not (tmp_path / "out" / "points.jsonl").read_text()


def test_an_unreachable_semantics_model_is_reported_with_the_image(tmp_path, photos):
    spec = load_scenario(_write(tmp_path, f"""
        [images]
        paths = ["{photos}/img1.png"]
        [encoder]
        semantic = "openai"
        lmm_model = "test"
        lmm_endpoint = "http://127.0.0.1:9/v1"
        lmm_timeout = 2.0
        lmm_retries = 0
    """))
    with pytest.raises(ScenarioError, match=r"image img1, configuration c000 \(default\): "):
        run_sweep(spec, tmp_path / "out", workers=1, quiet=True)


def test_an_impossible_budget_is_recorded_and_the_sweep_goes_on(tmp_path, photos):
    spec = load_scenario(_write(tmp_path, f"""
        [images]
        paths = ["{photos}"]
        [encoder]
        pixel = "jpeg"
        [baselines]
        codecs = ["jpeg"]
        [sweep]
        "encoder.budget" = [40, 2000]
    """))
    result = run_sweep(spec, tmp_path / "out", workers=1, quiet=True, plots=False)
    assert result.errors == 2 * 2  # two images x (misc + its baseline) at 40 bytes
    rows = list(csv.DictReader(io.StringIO(_csv(tmp_path / "out"))))
    failed = [r for r in rows if r["error"]]
    assert {r["encoder.budget"] for r in failed} == {"40"} and all("budget" in r["error"] for r in failed)
    assert any(r["encoder.budget"] == "2000" and r["stage"] == "pixel.1" for r in rows)

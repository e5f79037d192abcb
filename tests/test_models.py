"""The real MISC models, exercised offline on CPU with tiny random-weight models: the CLIP map encoder
(its arithmetic on hand-made features, then the model), the diffusion decoder on every stage, the
``models`` command, and where weights are looked for (folders, the HF cache, the environment)."""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from miscnet.core.errors import MiscError
from miscnet.sender.clip_map import maps_to_grid, normalise_maps, surgery_similarity

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["--steps", "3", "--diffusion-size", "64"]  # tiny models, few steps: fast on CPU


# ============================================================================ map arithmetic (no model)


def test_feature_surgery_subtracts_the_empty_prompt():
    # Two patches, 3-d features. Without surgery the shared component (axis 2) makes "cat" match both
    # patches equally; subtracting the empty prompt's features leaves only what is specific to "cat".
    patches = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    cat = np.array([[1.0, 0.0, 1.0]])
    empty = np.array([0.0, 0.0, 1.0])
    plain = surgery_similarity(patches, cat, None)
    assert plain[0, 0] == pytest.approx(1.0) and plain[0, 1] == pytest.approx(0.5)
    s = surgery_similarity(patches, cat, empty)
    h = 1 / np.sqrt(2)
    # patch . (unit(cat) - unit(empty)) with unit vectors: [h, 0, h] . [h, 0, h - 1]
    assert s[0, 0] == pytest.approx(h * h + h * (h - 1))
    assert s[0, 1] == pytest.approx(h * (h - 1))
    assert s[0, 0] - s[0, 1] == pytest.approx(0.5)
    assert s[0, 0] > 0 > s[0, 1]


def test_min_max_per_object():
    maps = normalise_maps(np.array([[2.0, 4.0, 3.0], [-1.0, -1.0, -1.0], [0.0, 10.0, 5.0]]))
    assert maps[0].tolist() == [0.0, 1.0, 0.5]
    assert maps[1].tolist() == [0.0, 0.0, 0.0]  # flat: nothing stands out
    assert maps[2].tolist() == [0.0, 1.0, 0.5]


def test_grid_reduction_known_answers():
    # 4 x 4 patches, object in the top-left 2 x 2: on a 4 x 4 grid exactly those cells (the bilinear
    # spill into the next cell averages 0.0625 per axis, far below 0.35)
    m = np.zeros((1, 4, 4))
    m[0, :2, :2] = 1.0
    expect = np.zeros((4, 4), bool)
    expect[:2, :2] = True
    assert (maps_to_grid(m, 4)[0] == expect).all()
    # the same map on an 8 x 8 grid: the top-left 4 x 4 cells
    g8 = maps_to_grid(m, 8)[0]
    assert g8[:4, :4].all() and g8.sum() == 16
    # a non-square patch grid (3 rows x 6 columns), object in the right third of the middle row
    r = np.zeros((1, 3, 6))
    r[0, 1, 4:] = 1.0
    g = maps_to_grid(r, 6)[0]
    assert g[2:4, 4:].all() and g.sum() == 4
    # the threshold decides: a uniform 0.5 map is all set at 0.35 and empty at 0.6
    half = np.full((1, 2, 2), 0.5)
    assert maps_to_grid(half, 8, 0.35).all() and not maps_to_grid(half, 8, 0.6).any()


def test_grid_reduction_is_mean_of_the_bilinear_upsampling():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    m = rng.random((2, 7, 7))
    up = torch.nn.functional.interpolate(torch.from_numpy(m)[None], size=(8 * 32, 8 * 32), mode="bilinear",
                                         align_corners=False)[0].numpy()
    cells = up.reshape(2, 8, 32, 8, 32).mean(axis=(2, 4))
    for t in (0.3, 0.5, 0.7):
        close = np.abs(cells - t) > 1e-3  # ignore cells within rounding of the threshold
        assert ((maps_to_grid(m, 8, t) == (cells > t)) | ~close).all()


# ============================================================================ tiny models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`miscnet models tiny DIR` through the command's own parser."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import torch

    from miscnet.cli.models import register

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and steady when the CPU is shared
    dest = tmp_path_factory.mktemp("models")
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    args = p.parse_args(["models", "tiny", str(dest)])
    assert args.func(args) == 0
    yield dest
    torch.set_num_threads(threads)


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("MISCNET_MODELS_DIR", "MISCNET_DIFFUSION_MODEL", "MISCNET_CONTROLNET_MODEL", "MISCNET_DIFFBIR_MODEL",
                "MISCNET_UPSCALER_MODEL", "MISCNET_CLIP_MODEL", "MISCNET_VLM_MODEL", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_tiny_models_load_with_their_tokenizers(tiny):
    from diffusers import StableDiffusionPipeline
    from transformers import AutoProcessor, AutoTokenizer, CLIPModel

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny / "diffusion"), local_files_only=True)
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size > 500
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer("a photo of the cat").input_ids[1:-1] == pipe.tokenizer.convert_tokens_to_ids(
        ["a</w>", "photo</w>", "of</w>", "the</w>", "cat</w>"])
    clip = CLIPModel.from_pretrained(str(tiny / "clip"), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(tiny / "clip"), local_files_only=True)
    assert len(tok) == clip.config.text_config.vocab_size
    vlm = AutoProcessor.from_pretrained(str(tiny / "vlm"), local_files_only=True)
    cfg = json.loads((tiny / "vlm" / "config.json").read_text())
    assert len(vlm.tokenizer) == cfg["text_config"]["vocab_size"] > 256
    assert vlm.tokenizer.convert_tokens_to_ids("<image>") == cfg["image_token_index"]
    for role in ("diffusion", "controlnet", "upscaler", "clip", "vlm"):  # safetensors, never pickles
        files = [p.name for p in (tiny / role).rglob("*") if p.is_file()]
        assert not any(f.endswith((".bin", ".pt", ".pkl", ".ckpt")) for f in files)
        assert any(f.endswith(".safetensors") for f in files)


def test_models_tiny_refuses_to_overwrite(tiny):
    from miscnet.experiments.models import write_tiny_models

    with pytest.raises(MiscError, match="already exists.*--force"):
        write_tiny_models(tiny, roles=("clip",))


def test_models_listing(tiny, clean_env, capsys):
    from miscnet.cli.models import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))

    def listing(*argv):
        args = p.parse_args(["models", "--json", *argv])
        assert args.func(args) == 0
        rows = json.loads(capsys.readouterr().out)["backends"]
        return {(r["backend"], r["role"]): r for r in rows}

    rows = listing()
    assert not rows[("diffusion", "diffusion")]["present"]
    assert rows[("diffusion", "diffusion")]["source"] == "unset"
    assert "--diffusion-model" in rows[("diffusion", "diffusion")]["problem"]
    assert rows[("classical", None)]["present"] and rows[("sidecar", None)]["present"]
    rows = listing("--clip-model", str(tiny / "clip"))
    assert rows[("clip", "clip")]["present"] and rows[("clip", "clip")]["source"] == "option"
    clean_env.setenv("MISCNET_MODELS_DIR", str(tiny))
    rows = listing()
    for key in (("diffusion", "diffusion"), ("diffusion", "controlnet"), ("diffusion", "upscaler"),
                ("diffusion", "diffbir"), ("clip", "clip"), ("hf", "vlm")):
        assert rows[key]["present"], key
        assert rows[key]["source"] == "MISCNET_MODELS_DIR"
    assert rows[("diffusion", "diffbir")]["path"] == str(tiny / "diffbir" / "general_full_v1.ckpt")
    rows = listing("--diffbir-model", str(tiny / "missing.ckpt"))
    assert not rows[("diffusion", "diffbir")]["present"]
    assert str(tiny / "missing.ckpt") in rows[("diffusion", "diffbir")]["problem"]
    clean_env.setenv("MISCNET_VLM_MODEL", str(tiny / "nowhere"))
    rows = listing()
    assert not rows[("hf", "vlm")]["present"] and rows[("hf", "vlm")]["source"] == "env MISCNET_VLM_MODEL"
    args = p.parse_args(["models"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "diffusion" in text and "NO" in text and "nowhere" in text


def test_missing_weights_are_one_clear_line(tmp_path, clean_env):
    from miscnet.receiver.diffusion import DiffusionDecoder
    from miscnet.sender.map_layer import map_backend

    with pytest.raises(MiscError) as e:
        DiffusionDecoder(model=str(tmp_path / "sd"))
    msg = str(e.value)
    assert str(tmp_path / "sd") in msg and "--diffusion-model" in msg and "MISCNET_DIFFUSION_MODEL" in msg
    assert "\n" not in msg
    with pytest.raises(MiscError, match="no diffusion model configured"):
        DiffusionDecoder()
    with pytest.raises(MiscError, match=r"'someone/clip-model' is neither a folder nor in the Hugging Face cache"):
        map_backend("clip", model="someone/clip-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MiscError, match="has no config.json"):
        map_backend("clip", model=str(tmp_path / "empty"))


def test_cached_hub_ids_resolve_offline(tiny, tmp_path, clean_env):
    """An id found in $HF_HOME/hub (the cache layout huggingface_hub writes) loads like a folder."""
    from miscnet.core.pretrained import require
    from miscnet.core.semantics import SemanticObject, Semantics
    from miscnet.sender.map_layer import map_backend

    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-clip"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny / "clip", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    clean_env.setenv("HF_HOME", str(tmp_path / "hf"))
    clean_env.setenv("HF_HUB_OFFLINE", "1")
    assert require("clip", "tiny-org/tiny-clip") == repo / "snapshots" / commit
    sem = Semantics((SemanticObject("cat", "a cat"),), "a cat")
    masks = map_backend("clip", model="tiny-org/tiny-clip", device="cpu").masks(IMAGE, sem, 8)
    assert masks.shape == (1, 8, 8)


def test_broken_tokenizer_is_caught(tiny, tmp_path):
    from miscnet.core.semantics import SemanticObject, Semantics
    from miscnet.sender.map_layer import map_backend

    broken = tmp_path / "clip"
    shutil.copytree(tiny / "clip", broken)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (broken / f).unlink()
    sem = Semantics((SemanticObject("cat", "a cat"),), "a cat")
    # transformers 5 gives a silent 2-token tokenizer for a folder without one; the backend refuses it
    with pytest.raises(MiscError, match=r"its tokenizer has 2 tokens but the text model expects \d+"):
        map_backend("clip", model=str(broken), device="cpu").masks(IMAGE, sem, 8)


# ============================================================================ clip map on the tiny model

IMAGE = np.random.default_rng(5).integers(0, 255, (217, 333, 3), dtype=np.uint8)


def test_clip_map_backend(tiny):
    from miscnet.core.semantics import SemanticObject, Semantics
    from miscnet.sender.map_layer import map_backend

    sem = Semantics((SemanticObject("red box", "a red box"), SemanticObject("sky", "blue sky"),
                     SemanticObject("tree", "a tree")), "a red box under a sky")
    be = map_backend("clip", model=str(tiny / "clip"), device="cpu")
    masks = be.masks(IMAGE, sem, 8)
    assert masks.shape == (3, 8, 8) and masks.dtype == bool
    assert masks.any(axis=(1, 2)).all()  # min-max normalisation: the best cell always passes 0.35
    assert (be.masks(IMAGE, sem, 8) == masks).all()
    maps = be.similarity_maps(IMAGE, ["red box"])
    assert maps.shape == (1, 4, 4) and maps.min() == 0.0 and maps.max() == 1.0
    plain = map_backend("clip", model=str(tiny / "clip"), device="cpu", surgery="none")
    plain = plain.similarity_maps(IMAGE, ["red box"])
    assert not np.allclose(plain, maps)  # the v-v path changes the patch tokens
    assert map_backend("clip", model=str(tiny / "clip"), threshold=0.99).masks(IMAGE, sem, 8).sum() < masks.sum()


# ============================================================================ diffusion decoder


def test_working_size_keeps_aspect():
    from miscnet.receiver.diffusion import working_size

    assert working_size(333, 217, 1024, 64) == (1024, 640)
    assert working_size(217, 333, 1024, 64) == (640, 1024)
    assert working_size(1000, 10, 1024, 64) == (1024, 64)
    assert working_size(512, 512, 768, 8) == (768, 768)


def test_composite_non_square():
    from miscnet.receiver.diffusion import composite

    h, w = 50, 130
    current = np.zeros((h, w, 3), np.float32)
    gen = np.ones((h, w, 3), np.float32)
    mask = np.zeros((8, 8), bool)
    mask[2:5, 5:8] = True  # rows 2..4, columns 5..7 of the grid
    out = composite(current, gen, mask)
    ys, xs = np.nonzero(out[..., 0])
    assert ys.min() == int(np.ceil(2 * h / 8)) and ys.max() == int(np.ceil(5 * h / 8)) - 1
    assert xs.min() == int(np.ceil(5 * w / 8)) and xs.max() == w - 1
    assert (out[out[..., 0] == 0] == 0).all() and (out[out[..., 0] == 1] == 1).all()
    assert out[..., 0].sum() == pytest.approx(len(range(13, 32)) * len(range(82, 130)))


def test_wavelet_colour_fix():
    from miscnet.receiver.diffusion import wavelet_color_fix, wavelet_decompose

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:70] / 70.0
    x = np.stack([0.3 + 0.3 * xx, 0.5 - 0.2 * yy, 0.4 + 0.1 * xx * yy], -1)
    x = (x + rng.normal(0, 0.05, x.shape)).astype(np.float32)  # smooth colours, fine detail
    high, low = wavelet_decompose(x)
    assert np.allclose(high + low, x, atol=1e-5)
    assert np.allclose(wavelet_color_fix(x, x), x, atol=1e-5)
    tinted = np.clip(x * 0.5 + np.array([0.4, 0.1, 0.0], np.float32), 0, 1)
    fixed = wavelet_color_fix(x, tinted)
    assert np.abs(fixed.mean(axis=(0, 1)) - tinted.mean(axis=(0, 1))).max() < 0.02  # colours from the reference
    assert np.corrcoef((fixed - _blur_all(fixed)).ravel(), (x - _blur_all(x)).ravel())[0, 1] > 0.95


def _blur_all(x):
    from miscnet.receiver.diffusion import wavelet_decompose

    return wavelet_decompose(x)[1]


def decoder_args(tiny, *argv):
    """The DecoderConfig the CLI's decoder options make."""
    from miscnet.cli.models import add_decoder_options, decoder_config

    p = argparse.ArgumentParser()
    add_decoder_options(p)
    return decoder_config(p.parse_args(["--decoder", "diffusion", "--diffusion-model", str(tiny / "diffusion"),
                                        "--device", "cpu", *argv]))


@pytest.fixture(scope="module")
def encoded(tiny):
    """An odd-sized image encoded with --map clip on the tiny CLIP: semantic, map, pixel.0, pixel.1."""
    from miscnet.cli.main import add_encoder_options, encoder_config
    from miscnet.core.semantics import SemanticObject, Semantics
    from miscnet.sender.encoder import encode_image

    p = argparse.ArgumentParser()
    add_encoder_options(p)
    config = encoder_config(p.parse_args(["--map", "clip", "--clip-model", str(tiny / "clip"), "--model-device",
                                          "cpu"]))
    assert config.map.backend_options() == {"model": str(tiny / "clip"), "threshold": 0.35, "device": "cpu"}
    sem = Semantics((SemanticObject("red box", "a flat red box."), SemanticObject("sky", "a blue sky.")),
                    "A red box under a blue sky.")
    result = encode_image(IMAGE, sem, config)
    return result.encoded


def test_diffusion_decoder_shared_by_two_workers_gives_the_sequential_pixels(tiny, encoded, clean_env):
    # the live receiver's decode workers share one decoder: its pipelines must not interleave
    import threading

    from miscnet.receiver.decoders import make_decoder
    from miscnet.receiver.stages import progressive_stages

    stages = progressive_stages(encoded)[1:3]
    decoder = make_decoder(decoder_args(tiny, *STEPS, "--restore", "img2img"))
    sequential = [decoder.render(stage) for stage in stages]
    for _ in range(2):
        out = [None, None]
        workers = [threading.Thread(target=lambda i=i, o=out: o.__setitem__(i, decoder.render(stages[i])))
                   for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert all(np.array_equal(a, b) for a, b in zip(out, sequential, strict=True))


def test_encode_clip_decode_diffusion_every_stage(tiny, encoded, clean_env):
    from miscnet.receiver.decoders import make_decoder
    from miscnet.receiver.stages import progressive_stages

    stages = progressive_stages(encoded)
    assert [s.name for s in stages] == ["semantic", "map", "pixel.0", "pixel.1"]
    decoder = make_decoder(decoder_args(tiny, *STEPS, "--restore", "img2img"))
    assert decoder.mode == "img2img"
    passes = {}
    images = []
    for stage in stages:
        img, timing = decoder.render_timed(stage)
        assert img.shape == (217, 333, 3) and img.dtype == np.uint8
        passes[stage.name] = [p.name for p in timing.passes]
        images.append(img)
    objects = [f"object {k + 1}" for k, m in enumerate(stages[1].masks) if m.any()]
    assert passes["semantic"] == ["text-to-image"]
    assert passes["map"] == ["text-to-image", *objects]
    assert passes["pixel.0"] == ["reference", *objects, "global"]  # each pass colour-fixes its own output
    # the map stage refines the semantic stage's picture only inside the masks
    assert not np.array_equal(images[0], images[1])
    # deterministic under a seed: a fresh decoder gives the same pixels; another seed does not
    again = make_decoder(decoder_args(tiny, *STEPS, "--restore", "img2img")).render(stages[3])
    assert np.array_equal(again, images[3])
    other = make_decoder(decoder_args(tiny, *STEPS, "--restore", "img2img", "--seed", "7")).render(stages[3])
    assert not np.array_equal(other, images[3])


def test_map_stage_changes_only_inside_the_masks(tiny):
    """On a 128 x 80 image decoded at its own size: outside every mask the map stage is the semantic one."""
    from miscnet.core.config import EncoderConfig, MapConfig
    from miscnet.core.map_codec import upsample_mask
    from miscnet.core.semantics import SemanticObject, Semantics
    from miscnet.receiver.diffusion import DiffusionDecoder
    from miscnet.receiver.stages import progressive_stages
    from miscnet.sender.encoder import encode_image

    sem = Semantics((SemanticObject("box", "a red box.", (0.1, 0.2, 0.4, 0.6)),
                     SemanticObject("sky", "a blue sky.", (0.5, 0.0, 1.0, 0.25))), "A red box under a blue sky.")
    enc = encode_image(IMAGE[:80, :128], sem, EncoderConfig(map=MapConfig("boxes"), pixel_codec="none")).encoded
    semantic, mapped = progressive_stages(enc)
    dec = DiffusionDecoder(model=str(tiny / "diffusion"), device="cpu", steps=3, size=128, restore="img2img")
    assert dec.working_size(128, 80) == (128, 80)
    before, after = dec.render(semantic), dec.render(mapped)
    inside = upsample_mask(mapped.masks[0], 128, 80) | upsample_mask(mapped.masks[1], 128, 80)
    assert 0 < inside.sum() < inside.size
    assert np.array_equal(before[~inside], after[~inside])
    assert not np.array_equal(before[inside], after[inside])


@pytest.mark.parametrize("mode, option, folder", [("controlnet", "--controlnet-model", "controlnet"),
                                                   ("upscale", "--upscaler-model", "upscaler")])
def test_restoration_pipelines(tiny, encoded, mode, option, folder, clean_env):
    from miscnet.receiver.decoders import make_decoder
    from miscnet.receiver.stages import progressive_stages

    decoder = make_decoder(decoder_args(tiny, *STEPS, option, str(tiny / folder), "--object-steps", "2"))
    assert decoder.mode == mode  # auto picks the configured restoration model
    stage = progressive_stages(encoded)[2]
    img = decoder.render(stage)
    assert img.shape == (217, 333, 3)
    assert np.array_equal(img, decoder.render(stage))


def test_models_dir_configures_every_backend(tiny, encoded, clean_env):
    """MISCNET_MODELS_DIR=DIR (what `models tiny DIR` suggests) is enough: no per-model option."""
    from miscnet.core.semantics import SemanticObject, Semantics
    from miscnet.receiver.diffusion import DiffusionDecoder
    from miscnet.receiver.stages import progressive_stages
    from miscnet.sender.map_layer import map_backend

    clean_env.setenv("MISCNET_MODELS_DIR", str(tiny))
    sem = Semantics((SemanticObject("cat", "a cat"),), "a cat")
    assert map_backend("clip", device="cpu").masks(IMAGE, sem, 8).shape == (1, 8, 8)
    dec = DiffusionDecoder(device="cpu", steps=2, size=64, cpu_offload=True)  # offload: a no-op on CPU
    assert dec.mode == "diffbir" and dec.diffbir_path == tiny / "diffbir" / "general_full_v1.ckpt"  # MISC's first
    assert dec.model_path == tiny / "diffusion"  # configured: lends its tokenizer if DiffBIR's folder has none
    assert dec.render(progressive_stages(encoded)[2]).shape == (217, 333, 3)
    dec = DiffusionDecoder(device="cpu", steps=2, size=64, restore="controlnet")
    assert dec.mode == "controlnet" and dec.controlnet_path == tiny / "controlnet"


def test_shared_components(tiny):
    from miscnet.receiver.diffusion import DiffusionDecoder

    a = DiffusionDecoder(model=str(tiny / "diffusion"), device="cpu", restore="img2img")
    b = DiffusionDecoder(model=str(tiny / "diffusion"), device="cpu", restore="img2img", steps=5)
    pa, pb = a.pipelines(), b.pipelines()
    assert pa is pb  # loaded once per process
    assert pa.img2img.unet is pa.text2img.unet and pa.img2img.vae is pa.text2img.vae
    c = DiffusionDecoder(model=str(tiny / "diffusion"), controlnet=str(tiny / "controlnet"), device="cpu")
    pc = c.pipelines()
    assert pc is not pa and pc.control.unet is pa.text2img.unet  # another configuration, the same weights
    assert pc.control.text_encoder is pa.text2img.text_encoder
    assert pa.text2img.unet.dtype.is_floating_point and str(pa.text2img.unet.dtype) == "torch.float32"


def test_classical_stays_the_default():
    from miscnet.cli.models import add_decoder_options, decoder_config
    from miscnet.core.config import DecoderConfig, DiffusionConfig
    from miscnet.receiver.classical import ClassicalDecoder
    from miscnet.receiver.decoders import make_decoder

    p = argparse.ArgumentParser()
    add_decoder_options(p)
    config = decoder_config(p.parse_args([]))
    assert isinstance(make_decoder(config), ClassicalDecoder)
    assert config == DecoderConfig()  # every default is the dataclass's
    assert isinstance(make_decoder(), ClassicalDecoder)
    with pytest.raises(MiscError, match="unknown decoder"):
        DecoderConfig("magic")
    with pytest.raises(MiscError, match="at least 1"):  # a diffusion decoder's settings are checked when made
        DecoderConfig("diffusion", DiffusionConfig(steps=0))


def test_decoder_seed_is_its_own():
    """decode / receiver: --seed is the decoder's. simulate: --seed drives the link alone; the decoder's seed
    is --decoder-seed (default 0, as a scenario's decoder.seed)."""
    from miscnet.cli.main import build_parser
    from miscnet.cli.models import add_decoder_options, decoder_config

    own = argparse.ArgumentParser()
    add_decoder_options(own)
    assert decoder_config(own.parse_args(["--seed", "5"])).diffusion.seed == 5
    assert decoder_config(own.parse_args(["--seed", "5", "--decoder-seed", "9"])).diffusion.seed == 9
    parser = build_parser()
    seeds = {decoder_config(parser.parse_args(["simulate", "x.png", "--seed", str(s)])).diffusion.seed
             for s in range(5)}
    assert seeds == {0}  # the link's seed moves, the decoder's noise does not
    args = parser.parse_args(["simulate", "x.png", "--seed", "3", "--decoder-seed", "11"])
    assert args.seed == 3 and decoder_config(args).diffusion.seed == 11
    assert decoder_config(parser.parse_args(["decode", "a.misc", "-o", "a.png", "--seed", "4"])).diffusion.seed == 4


def test_heavy_imports_stay_lazy():
    code = ("import sys; import miscnet.cli.main, miscnet.cli.models, miscnet.experiments.models, "
            "miscnet.sender.clip_map, miscnet.sender.semantic_backends, miscnet.core.pretrained, "
            "miscnet.receiver.diffusion, miscnet.sender.map_layer, "
            "miscnet.core.config, miscnet.sender.semantics_source, miscnet.receiver.decoders; "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'huggingface_hub') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_stage_images_write(tiny, encoded, tmp_path, clean_env):
    """The done criterion, as the CLI will run it: every stage image as a PNG on CPU."""
    from miscnet.receiver.decoders import make_decoder
    from miscnet.receiver.stages import progressive_stages

    decoder = make_decoder(decoder_args(tiny, *STEPS))
    for i, stage in enumerate(progressive_stages(encoded)):
        Image.fromarray(decoder.render(stage)).save(tmp_path / f"{i:02d}-{stage.name}.png")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "00-semantic.png", "01-map.png", "02-pixel.0.png", "03-pixel.1.png"]


def test_bad_settings_are_one_line_errors(tiny, clean_env):
    from miscnet.core.pretrained import pick_device
    from miscnet.receiver.diffusion import DiffusionDecoder

    model = str(tiny / "diffusion")
    for bad, match in [({"restore": "magic"}, "unknown restoration"), ({"steps": 0}, "at least 1"),
                       ({"strength": 0.0}, "strength must be in"), ({"size": 4}, "working size"),
                       ({"restore": "controlnet"}, "no controlnet model configured")]:
        with pytest.raises(MiscError, match=match):
            DiffusionDecoder(model=model, **bad)
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        with pytest.raises(MiscError, match="no CUDA GPU"):
            pick_device("cuda")
    with pytest.raises(MiscError, match="unknown device"):
        pick_device("tpu")
    assert pick_device("cpu") == ("cpu", torch.float32)


# ============================================================================ the schedule, against MISC's notebook

# MISC's notebook (lcysyzxdxc/MISC demo.ipynb, the decoder cell) written out here on purpose, not read from
# the config: a changed default must fail these tests.
NOTEBOOK_OBJECT_STEPS, NOTEBOOK_OBJECT_CFG = 3, 3.5  # sr_pipe(image, detail_j, cfg=3.5, steps=3)
NOTEBOOK_GLOBAL_STEPS, NOTEBOOK_GLOBAL_CFG = 40, 7.0  # sr_pipe(image, detail_all, cfg=7, steps=40)
NOTEBOOK_NEGATIVE = "Blurry, Low Quality"  # SpacedSampler.sample(negative_prompt=...)


class Recorder:
    """A real pipeline whose calls are logged: the arguments, how many UNet steps ran, what came back."""

    def __init__(self, pipe, log: list):
        self.pipe, self.log = pipe, log

    def __getattr__(self, name):  # tokenizer, unet, ... of the real pipeline
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        steps = [0]
        hook = self.pipe.unet.register_forward_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
        try:
            out = self.pipe(**kwargs)
        finally:
            hook.remove()
        call = {k: (np.asarray(v) if isinstance(v, Image.Image) else v) for k, v in kwargs.items()}
        call.update(pipe=self.pipe, unet_steps=steps[0], output=np.asarray(out.images[0], np.float32),
                    condition=(np.asarray(out.conditions[0], np.float32) if hasattr(out, "conditions") else None))
        self.log.append(call)
        return out


def recording(decoder, monkeypatch) -> list:
    """Wrap every pipeline of the decoder in a Recorder (undone after the test); return the shared log."""
    log: list = []
    p = decoder.pipelines()
    for name in ("text2img", "img2img", "control", "upscale", "diffbir"):
        if getattr(p, name) is not None:
            monkeypatch.setattr(p, name, Recorder(getattr(p, name), log))
    return log


def schedule_stages():
    """An 80 x 128 image with three boxed objects (one empty box: no pass), every stage of it."""
    from miscnet.core.config import EncoderConfig, MapConfig
    from miscnet.core.semantics import SemanticObject, Semantics
    from miscnet.receiver.stages import progressive_stages
    from miscnet.sender.encoder import encode_image

    sem = Semantics((SemanticObject("box", "a flat red box.", (0.1, 0.2, 0.4, 0.6)),
                     SemanticObject("sky", "a clear blue sky.", (0.5, 0.0, 1.0, 0.25)),
                     SemanticObject("tree", "a tall green tree.", (0.6, 0.5, 0.95, 1.0))),
                    "A red box under a blue sky beside a tree.")
    enc = encode_image(IMAGE[:80, :128], sem, EncoderConfig(map=MapConfig("boxes"))).encoded
    return sem, progressive_stages(enc)


def _as_float(img):
    img = np.asarray(img)
    return img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)


def check_notebook_schedule(decoder, stage, log, sem, reference_of):
    """Every pass of a pixel stage against the notebook: prompts, steps, guidance, negative prompt, which
    mask each object pass lands in, and the per-pass wavelet colour fix."""
    from miscnet.core.map_codec import upsample_mask
    from miscnet.receiver.diffusion import wavelet_color_fix

    out = decoder.render(stage)
    objects = [j for j, m in enumerate(stage.masks) if m.any()] if stage.masks is not None else []
    assert len(log) == len(objects) + 1
    for call, j in zip(log, objects, strict=False):
        assert call["prompt"] == sem.objects[j].detail
        assert call["guidance_scale"] == NOTEBOOK_OBJECT_CFG and call["unet_steps"] == NOTEBOOK_OBJECT_STEPS
    last = log[-1]
    assert last["prompt"] == sem.caption
    assert last["guidance_scale"] == NOTEBOOK_GLOBAL_CFG and last["unet_steps"] == NOTEBOOK_GLOBAL_STEPS
    assert all(call["negative_prompt"] == NOTEBOOK_NEGATIVE for call in log)
    # data flow: the first pass starts from the reference; each object pass's colour-fixed output replaces
    # the picture inside its mask only; the global pass's colour-fixed output, resized, is the stage
    current = _as_float(log[0]["image"])
    h, w = current.shape[:2]
    assert np.abs(current - reference_of(w, h)).max() <= 1 / 255 + 1e-6
    for k, call in enumerate(log):
        assert np.abs(_as_float(call["image"]) - current).max() <= 1 / 255 + 1e-6
        condition = call["condition"] if call["condition"] is not None else _as_float(call["image"])
        fixed = wavelet_color_fix(call["output"], condition)
        assert np.abs(fixed - np.clip(call["output"], 0, 1)).max() > 0.01  # the colour fix did something
        if k < len(objects):
            inside = upsample_mask(stage.masks[objects[k]], w, h)
            assert 0 < inside.sum() < inside.size
            current = np.where(inside[..., None], fixed, current)
        else:
            current = fixed
    expect = np.asarray(Image.fromarray(np.clip(np.rint(current * 255), 0, 255).astype(np.uint8)).resize(
        (stage.width, stage.height), Image.Resampling.LANCZOS))
    assert np.abs(out.astype(int) - expect.astype(int)).max() <= 1
    return out


@pytest.fixture(scope="module")
def schedule():
    return schedule_stages()


@pytest.mark.parametrize("mode", ["img2img", "controlnet"])
def test_schedule_is_the_notebooks(tiny, schedule, mode, monkeypatch, clean_env):
    """MISC's decoder cell on the pixel stage with maps, every constant at its default (none overridden)."""
    from miscnet.core.pixel import decode_pixels
    from miscnet.receiver.diffusion import DiffusionDecoder

    sem, stages = schedule
    extra = {"controlnet": str(tiny / "controlnet")} if mode == "controlnet" else {}
    decoder = DiffusionDecoder(model=str(tiny / "diffusion"), device="cpu", restore=mode, **extra)
    log = recording(decoder, monkeypatch)
    pixel = stages[2]
    assert [m.any() for m in pixel.masks] == [True, True, True]
    check_notebook_schedule(decoder, pixel, log, sem,
                            lambda w, h: decode_pixels(pixel.pixel_levels, w, h).astype(np.float32) / 255)
    want = getattr(decoder.pipelines(), {"img2img": "img2img", "controlnet": "control"}[mode]).pipe
    assert all(call["pipe"] is want for call in log)


def test_schedule_is_the_notebooks_with_diffbir(tiny, schedule, monkeypatch, clean_env):
    """The same, on MISC's own decoder: each pass colour-fixed against SwinIR's cleaned picture."""
    from miscnet.core.pixel import decode_pixels
    from miscnet.receiver.diffbir import DiffBIRPipeline
    from miscnet.receiver.diffusion import DiffusionDecoder

    sem, stages = schedule
    decoder = DiffusionDecoder(diffbir=str(tiny / "diffbir"), device="cpu", size=64)  # auto: diffbir
    assert decoder.mode == "diffbir" and decoder.model_path is None  # no diffusers pipeline needed
    log = recording(decoder, monkeypatch)
    pixel = stages[2]
    check_notebook_schedule(decoder, pixel, log, sem,
                            lambda w, h: decode_pixels(pixel.pixel_levels, w, h).astype(np.float32) / 255)
    assert all(isinstance(call["pipe"], DiffBIRPipeline) for call in log)
    for call in log:  # the condition the colour fix used is not the pass's input: SwinIR cleaned it
        assert np.abs(call["condition"] - call["image"]).max() > 0.01


def test_schedule_without_maps_is_the_global_pass_only(tiny, monkeypatch, clean_env):
    from miscnet.core.config import EncoderConfig, MapConfig
    from miscnet.core.pixel import decode_pixels
    from miscnet.core.semantics import SemanticObject, Semantics
    from miscnet.receiver.diffusion import DiffusionDecoder
    from miscnet.receiver.stages import progressive_stages
    from miscnet.sender.encoder import encode_image

    sem = Semantics((SemanticObject("box", "a flat red box."),), "A red box.")
    enc = encode_image(IMAGE[:80, :128], sem, EncoderConfig(map=MapConfig("none"))).encoded
    stages = progressive_stages(enc)
    assert [s.name for s in stages][:2] == ["semantic", "pixel.0"]
    decoder = DiffusionDecoder(model=str(tiny / "diffusion"), device="cpu", restore="img2img")
    log = recording(decoder, monkeypatch)
    check_notebook_schedule(decoder, stages[1], log, sem,
                            lambda w, h: decode_pixels(stages[1].pixel_levels, w, h).astype(np.float32) / 255)


def test_semantic_stage_draws_at_the_native_size(tiny, schedule, monkeypatch, clean_env):
    from miscnet.receiver.diffusion import DiffusionDecoder

    sem, stages = schedule
    decoder = DiffusionDecoder(model=str(tiny / "diffusion"), device="cpu", restore="img2img")
    log = recording(decoder, monkeypatch)
    native = decoder.pipelines().native
    assert decoder.working_size(128, 80)[0] == 2 * native  # working at twice the native size ...
    out = decoder.render(stages[0])
    (call,) = log
    assert (call["width"], call["height"]) == decoder.native_size(128, 80)
    assert call["width"] == native and call["height"] < native  # ... but drawing at the native size
    assert call["prompt"] == sem.caption and call["negative_prompt"] == NOTEBOOK_NEGATIVE
    assert out.shape == (80, 128, 3)

"""The net pixel codec (core/pixel/net.py): a tiny random-weight cheng2020-anchor, coded for real.

Round trips are bit-exact in the latents; the layer holds the constriction stream and its 2-byte check
and nothing else; cut, corrupted and oversized payloads fail in one line; weights load by CompressAI's
key names; missing weights and a missing torch say what to do.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from miscnet.cli.main import main
from miscnet.core.errors import BitstreamError, MiscError
from miscnet.core.pixel import PixelLevel, PixelSettings, decode_pixels, decode_raster, encode_pixels, net
from miscnet.experiments.models import tiny_net_state_dict, write_tiny_net
from miscnet.v1 import bitstream_pb2 as pb

torch = pytest.importorskip("torch")
constriction = pytest.importorskip("constriction")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_tiny_net(tmp_path_factory.mktemp("net"))


@pytest.fixture(scope="module")
def model(weights):
    return net.load_model(weights)


@pytest.fixture(autouse=True)
def _configured(weights):
    net.use_model(weights)
    yield
    net.use_model(None)


def _raster(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth picture with some texture (not noise: the codec must see structure)."""
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([xx * 255 / max(1, w - 1), yy * 255 / max(1, h - 1), (xx + yy) % 64 * 4], axis=-1)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("size", [(64, 64), (96, 40)])  # one padded to 128 x 64 inside
def test_round_trip_is_bit_exact_in_the_latents(model, size):
    w, h = size
    raster = _raster(w, h)
    lat = net.analyse(model, raster)
    payload, x_hat = net.encode_raster(model, raster)
    z, y, decoded = net.decode_latents(model, payload, w, h)
    assert np.array_equal(z, lat.z_symbols) and np.array_equal(y, lat.y_symbols)
    assert np.array_equal(decoded, x_hat) and decoded.shape == (h, w, 3)
    # the latent shapes follow from the raster: z is 1/64, y 1/16 of the padded raster
    ph, pw = -(-h // 64) * 64, -(-w // 64) * 64
    assert len(z) == model.N * (ph // 64) * (pw // 64) and len(y) == model.M * (ph // 16) * (pw // 16)
    assert net.encode_raster(model, raster)[0] == payload  # same input, same bytes


def test_the_registry_codes_and_decodes_net_levels(model):
    image = _raster(160, 120, seed=1)
    levels = encode_pixels(image, PixelSettings("net", 80, 60))
    assert [(lv.level, lv.codec, lv.params.width, lv.params.height) for lv in levels] == \
        [(0, pb.CODEC_PIXEL_NET, 80, 60)]
    raster = decode_raster(levels)
    small = np.asarray(Image.fromarray(image).resize((80, 60), net.DOWN_FILTER))
    assert np.array_equal(raster, net.encode_raster(model, small)[1])
    assert decode_pixels(levels, 160, 120).shape == (120, 160, 3)


# ---------------------------------------------------------------------------- honest bytes


def test_the_layer_is_the_constriction_stream_and_a_two_byte_check(model):
    raster = _raster(64, 64, seed=2)
    payload, _ = net.encode_raster(model, raster)
    lat = net.analyse(model, raster)
    # the stream coded here directly with constriction, from the symbols and their models
    enc = constriction.stream.queue.RangeEncoder()
    enc.encode(lat.z_symbols.astype(np.int32), constriction.stream.model.Categorical(perfect=False), lat.z_probs)
    enc.encode(lat.y_symbols.astype(np.int32), constriction.stream.model.QuantizedGaussian(-net.Y_RANGE, net.Y_RANGE),
               np.zeros(len(lat.y_symbols)), lat.y_stds)
    words = enc.get_compressed().astype("<u4").tobytes()
    body = payload[net.CHECK_BYTES:]
    assert len(words) - 3 <= len(body) <= len(words) and words.startswith(body)
    assert words[len(body):] == b"\0" * (len(words) - len(body))  # only zero bytes of the last word left out
    assert len(payload) == net.CHECK_BYTES + len(body)


def test_cut_or_corrupted_payloads_fail_in_one_line(model):
    raster = _raster(64, 64, seed=3)
    payload, x_hat = net.encode_raster(model, raster)
    for n in range(len(payload)):
        with pytest.raises(BitstreamError) as err:
            net.decode_payload(model, payload[:n], 64, 64)
        assert "\n" not in str(err.value)
    failed = 0
    for i in range(len(payload)):
        for bit in (0x01, 0x80):
            bad = bytearray(payload)
            bad[i] ^= bit
            try:
                out = net.decode_payload(model, bytes(bad), 64, 64)
            except BitstreamError as exc:
                assert "\n" not in str(exc)
                failed += 1
            else:  # a flip the decoder never reads changes nothing
                assert np.array_equal(out, x_hat)
    assert failed >= 2 * len(payload) - 4
    junk = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    with pytest.raises(BitstreamError):
        net.decode_payload(model, junk, 64, 64)


def test_other_weights_are_refused_not_painted(model, tmp_path):
    payload, _ = net.encode_raster(model, _raster(64, 64, seed=4))
    other = net.load_model(write_tiny_net(tmp_path, seed=1))
    with pytest.raises(BitstreamError, match="other weights"):
        net.decode_payload(other, payload, 64, 64)


def test_the_work_a_payload_may_ask_for_is_bounded(model):
    with pytest.raises(BitstreamError, match="latent positions"):  # 4096 positions for 5 bytes
        net.decode_payload(model, b"\0" * 5, 1024, 1024)
    level = PixelLevel(0, pb.CODEC_PIXEL_NET, pb.PixelParams(width=2048, height=64), b"\0" * 100000)
    with pytest.raises(BitstreamError, match="over 1024"):
        decode_raster([level])
    with pytest.raises(MiscError, match="at most 1024"):
        encode_pixels(_raster(64, 64), PixelSettings("net", 1100, 64))
    with pytest.raises(MiscError, match="one level"):
        encode_pixels(_raster(64, 64), PixelSettings("net", 64, 64, levels=2))


# ---------------------------------------------------------------------------- weights


def _compressai_keys(n: int) -> set[str]:
    """Cheng2020Anchor(N=n).state_dict() keys as CompressAI names them (read from its models/waseda.py,
    models/google.py, layers/layers.py, layers/gdn.py, entropy_models/entropy_models.py)."""
    gdn = ["beta", "gamma", "beta_reparam.pedestal", "beta_reparam.lower_bound.bound", "gamma_reparam.pedestal",
           "gamma_reparam.lower_bound.bound"]
    wb = ("weight", "bias")
    keys: list[str] = []
    for i in (0, 2, 4):  # ResidualBlockWithStride
        keys += [f"g_a.{i}.{c}.{t}" for c in ("conv1", "conv2", "skip") for t in wb]
        keys += [f"g_a.{i}.gdn.{g}" for g in gdn]
    for i in (1, 3, 5):  # ResidualBlock, no skip
        keys += [f"g_a.{i}.{c}.{t}" for c in ("conv1", "conv2") for t in wb]
    keys += [f"g_a.6.{t}" for t in wb]
    keys += [f"h_a.{i}.{t}" for i in (0, 2, 4, 6, 8) for t in wb]
    keys += [f"h_s.{i}.{t}" for i in (0, 4, 8) for t in wb] + [f"h_s.{i}.0.{t}" for i in (2, 6) for t in wb]
    for i in (0, 2, 4, 6):
        keys += [f"g_s.{i}.{c}.{t}" for c in ("conv1", "conv2") for t in wb]
    for i in (1, 3, 5):  # ResidualBlockUpsample
        keys += [f"g_s.{i}.{c}.{t}" for c in ("subpel_conv.0", "conv", "upsample.0") for t in wb]
        keys += [f"g_s.{i}.igdn.{g}" for g in gdn]
    keys += [f"g_s.7.0.{t}" for t in wb]
    eb = "entropy_bottleneck"
    keys += [f"{eb}.{b}" for b in ("_offset", "_quantized_cdf", "_cdf_length", "likelihood_lower_bound.bound",
                                   "quantiles", "target")]
    keys += [f"{eb}.matrices.{k}" for k in range(5)] + [f"{eb}.biases.{k}" for k in range(5)]
    keys += [f"{eb}.factors.{k}" for k in range(4)]
    keys += ["context_prediction.weight", "context_prediction.bias", "context_prediction.mask"]
    keys += [f"entropy_parameters.{i}.{t}" for i in (0, 2, 4) for t in wb]
    gc = "gaussian_conditional"
    keys += [f"{gc}.{b}" for b in ("_offset", "_quantized_cdf", "_cdf_length", "scale_table", "scale_bound",
                                   "likelihood_lower_bound.bound", "lower_bound_scale.bound")]
    assert len(keys) == len(set(keys))
    return set(keys)


def test_the_tiny_checkpoint_has_compressai_keys_and_shapes():
    state = tiny_net_state_dict(width=8)
    assert set(state) == _compressai_keys(8)
    n = 8
    assert tuple(state["g_a.0.conv1.weight"].shape) == (n, 3, 3, 3)
    assert tuple(state["h_s.8.weight"].shape) == (2 * n, n * 3 // 2, 3, 3)
    assert tuple(state["entropy_parameters.0.weight"].shape) == (n * 10 // 3, n * 12 // 3, 1, 1)
    assert tuple(state["context_prediction.weight"].shape) == (2 * n, n, 5, 5)
    assert tuple(state["entropy_bottleneck.matrices.0"].shape) == (n, 3, 1)
    assert tuple(state["g_s.7.0.weight"].shape) == (12, n, 3, 3)
    mask = state["context_prediction.mask"][0, 0]
    assert mask[:2].all() and mask[2, :2].all() and not mask[2, 2:].any() and not mask[3:].any()


def test_old_names_training_checkpoints_and_safetensors_load_alike(model, tmp_path):
    from safetensors.torch import save_file

    state = tiny_net_state_dict(width=8)
    old = {}  # the zoo's released files: _matrix0 / _bias0 / _factor0, and DataParallel's module. prefix
    for k, v in state.items():
        for new, was in (("matrices.", "_matrix"), ("biases.", "_bias"), ("factors.", "_factor")):
            k = k.replace(f"entropy_bottleneck.{new}", f"entropy_bottleneck.{was}")
        old["module." + k] = v
    torch.save({"epoch": 3, "state_dict": old}, tmp_path / "checkpoint.pth.tar")
    save_file({k: v for k, v in state.items() if v.numel()}, str(tmp_path / "model.safetensors"))
    for name in ("checkpoint.pth.tar", "model.safetensors"):
        assert net.load_model(tmp_path / name).digest == model.digest, name


def test_wrong_or_unsafe_weights_fail_in_one_line(tmp_path):
    state = tiny_net_state_dict(width=8)
    missing = dict(state)
    del missing["g_s.3.igdn.gamma"]
    with pytest.raises(MiscError, match="missing key g_s.3.igdn.gamma"):
        net.model_from_state_dict(missing)
    wrong = dict(state, **{"h_a.4.weight": torch.zeros(8, 8, 5, 5)})
    with pytest.raises(MiscError, match="h_a.4.weight has shape"):
        net.model_from_state_dict(wrong)
    torch.save({"weights": state, "extra": Path("/")}, tmp_path / "pickled.pth")  # not weights-only
    with pytest.raises(MiscError, match="cannot read weights") as err:
        net.load_model(tmp_path / "pickled.pth")
    assert "\n" not in str(err.value)


def test_missing_weights_name_the_path(tmp_path, monkeypatch, capsys):
    gone = tmp_path / "nowhere" / "cheng.pth.tar"
    with pytest.raises(MiscError, match=f"no weights at {gone}"):
        net.model_path(gone)
    rc = main(["encode", "sample:astronaut", "-o", str(tmp_path / "a.misc"), "--pixel", "net", "--levels", "1",
               "--net-model", str(gone)])
    assert rc == 2 and capsys.readouterr().err == \
        f"miscnet: net pixel codec: no weights at {gone} (give --net-model PATH or set {net.NET_MODEL_ENV})\n"


def test_without_torch_net_names_the_extra(tmp_path):
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'constriction'):\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from miscnet.cli.main import main\n"
            f"sys.exit(main(['encode', 'sample:astronaut', '-o', {str(tmp_path / 'a.misc')!r}, '--pixel', 'net',"
            " '--levels', '1', '--net-model', '/nowhere.pth']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "miscnet: the net pixel codec needs torch and constriction: " \
        "pip install 'miscnet[models]'"


# ---------------------------------------------------------------------------- the command line


def test_encode_and_the_classical_decoder_round_trip_a_net_layer(weights, tmp_path, monkeypatch, capsys):
    from skimage import data

    Image.fromarray(data.astronaut()).resize((128, 128)).save(tmp_path / "astro.png")
    (tmp_path / "astro.json").write_text((ROOT / "src/miscnet/core/samples/astronaut.json").read_text())
    misc, png = str(tmp_path / "a.misc"), str(tmp_path / "a.png")
    # one level without being told: --levels defaults to 1 for the net codec
    assert main(["encode", str(tmp_path / "astro.png"), "-o", misc, "--pixel", "net", "--net-model", str(weights)]) == 0
    assert main(["info", misc]) == 0
    assert " net " in capsys.readouterr().out
    assert main(["decode", misc, "-o", png, "--net-model", str(weights)]) == 0
    assert Image.open(png).size == (128, 128)
    net.use_model(None)
    for var in (net.NET_MODEL_ENV, net.MODELS_DIR_ENV):
        monkeypatch.delenv(var, raising=False)
    capsys.readouterr()
    assert main(["decode", misc, "-o", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert "no weights configured" in err and err.count("\n") == 1

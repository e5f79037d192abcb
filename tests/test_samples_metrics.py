"""Bundled samples (paths, sidecars, export) and the PSNR / SSIM / MS-SSIM metrics."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import signal
from skimage.metrics import structural_similarity

from miscnet.core.errors import MiscError
from miscnet.core.samples import (
    SAMPLE_NAMES,
    export_samples,
    resolve_image_arg,
    sample_image_path,
    sample_sidecar_path,
)
from miscnet.experiments import metrics
from miscnet.experiments.metrics import ms_ssim, psnr, quality, ssim


def _load(name: str) -> np.ndarray:
    with Image.open(sample_image_path(name)) as im:
        return np.asarray(im.convert("RGB"))


def _jpeg(img: np.ndarray, q: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=q)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


# --- samples -----------------------------------------------------------------------------------


def test_sample_names():
    assert SAMPLE_NAMES == ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_resolves_and_loads(name):
    for arg in (f"sample:{name}", name):
        image, sidecar = resolve_image_arg(arg)
        assert image == sample_image_path(name)
        assert sidecar == sample_sidecar_path(name)
    with Image.open(image) as im:
        im.load()
        assert im.width >= 300 and im.height >= 300
        assert im.convert("RGB").mode == "RGB"


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sidecar_schema(name):
    doc = json.loads(sample_sidecar_path(name).read_text(encoding="utf-8"))
    assert set(doc) == {"objects", "caption"}
    assert len(doc["objects"]) == 3
    for obj in doc["objects"]:
        assert set(obj) == {"name", "detail", "box"}
        assert isinstance(obj["name"], str) and 1 <= len(obj["name"].split()) <= 3
        assert isinstance(obj["detail"], str) and 1 <= len(obj["detail"].split()) <= 10
        box = obj["box"]
        assert isinstance(box, list) and len(box) == 4
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        x0, y0, x1, y1 = box
        assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
    assert isinstance(doc["caption"], str) and 40 <= len(doc["caption"].split()) <= 65
    assert len({o["name"] for o in doc["objects"]}) == 3


def test_unknown_sample_is_misc_error():
    with pytest.raises(MiscError, match="astronaut"):
        resolve_image_arg("sample:nosuch")
    with pytest.raises(MiscError, match="valid samples"):
        sample_image_path("nosuch")
    with pytest.raises(MiscError):
        sample_sidecar_path("nosuch")


def test_plain_paths(tmp_path, monkeypatch):
    img = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(img)
    assert resolve_image_arg(str(img)) == (img, None)
    (tmp_path / "photo.json").write_text("{}")
    assert resolve_image_arg(str(img)) == (img, tmp_path / "photo.json")
    # A real file named like a sample wins over the sample; an unknown bare name stays a path.
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "coffee", format="PNG")
    assert resolve_image_arg("coffee") == (Path("coffee"), None)
    assert resolve_image_arg("sample:coffee")[0] == sample_image_path("coffee")
    assert resolve_image_arg("nothing_here.png") == (Path("nothing_here.png"), None)


def test_export_samples(tmp_path):
    out = tmp_path / "out"
    paths = export_samples(out)
    assert sorted(p.name for p in paths) == sorted(
        [f"{n}.png" for n in SAMPLE_NAMES] + [f"{n}.json" for n in SAMPLE_NAMES]
    )
    for name in SAMPLE_NAMES:
        with Image.open(out / f"{name}.png") as im:
            assert im.format == "PNG" and im.mode == "RGB"
            exported = np.asarray(im)
        assert np.array_equal(exported, _load(name))  # lossless
        assert json.loads((out / f"{name}.json").read_text()) == json.loads(
            sample_sidecar_path(name).read_text()
        )


# --- metrics -----------------------------------------------------------------------------------


def test_identical_images():
    a = _load("chelsea")
    assert psnr(a, a) == math.inf
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ms_ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert quality(a, a) == {"psnr": math.inf, "ssim": pytest.approx(1.0), "ms_ssim": pytest.approx(1.0)}


def test_psnr_hand_computed():
    a = np.zeros((4, 5, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 10  # one error of 10 over 60 values: MSE = 100 / 60
    b[1, 2, 1] = 255  # and one of 255: MSE = (100 + 65025) / 60
    mse = (100 + 255**2) / 60
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-12)
    assert psnr(a[..., 0], b[..., 0]) == pytest.approx(10 * math.log10(255**2 / (100 / 20)), abs=1e-12)
    assert psnr(a, b, data_range=1.0) == pytest.approx(10 * math.log10(1 / mse), abs=1e-12)


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_ssim_matches_skimage(name):
    a = _load(name)
    b = _jpeg(a, 20)
    ref = structural_similarity(
        a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    got = ssim(a, b)
    assert abs(got - ref) < 1e-3
    assert abs(got - ref) < 1e-9  # in fact the same computation, up to rounding
    grey_ref = structural_similarity(
        a[..., 1], b[..., 1], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert ssim(a[..., 1], b[..., 1]) == pytest.approx(grey_ref, abs=1e-9)


def _naive_ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Straightforward per-channel MS-SSIM (2-D convolutions, explicit zero-padded pooling)."""
    g = np.exp(-(np.arange(-5, 6) ** 2) / (2 * 1.5**2))
    win = np.outer(g, g) / g.sum() ** 2
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def f(z):
        return signal.convolve2d(z, win, mode="valid")

    out = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch].astype(float), b[..., ch].astype(float)
        vals = []
        for level in range(5):
            mx, my = f(x), f(y)
            vx, vy, vxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
            cs = (2 * vxy + c2) / (vx + vy + c2)
            if level < 4:
                vals.append(max(cs.mean(), 0.0))
                pads = [(s % 2, s % 2) for s in x.shape]
                x, y = np.pad(x, pads), np.pad(y, pads)
                h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
                x = x[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
                y = y[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
            else:
                vals.append(max(((2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs).mean(), 0.0))
        out.append(np.prod(np.array(vals) ** np.array(metrics.MS_SSIM_WEIGHTS)))
    return float(np.mean(out))


def test_ms_ssim_matches_naive_reference():
    a = _load("chelsea")[:, :225]  # 300x225: odd width on several scales
    b = _jpeg(a, 15)
    assert ms_ssim(a, b) == pytest.approx(_naive_ms_ssim(a, b), abs=1e-9)


def test_pool_matches_torch_convention():
    # torch avg_pool2d(kernel 2, padding 1, count_include_pad) on a 3x3: zeros in front, divisor 4.
    x = np.arange(1.0, 10.0).reshape(1, 3, 3)
    expected = np.array([[1 / 4, (2 + 3) / 4], [(4 + 7) / 4, (5 + 6 + 8 + 9) / 4]])
    assert np.allclose(metrics._pool(x)[0], expected)
    assert metrics._pool(np.ones((1, 4, 6))).shape == (1, 2, 3)


def test_ms_ssim_monotone_in_noise():
    a = _load("astronaut")
    rng = np.random.default_rng(0)
    scores = []
    for sigma in (2, 8, 20, 50):
        noisy = np.clip(a + rng.normal(0, sigma, a.shape), 0, 255).astype(np.uint8)
        scores.append(ms_ssim(a, noisy))
    assert all(s1 > s2 for s1, s2 in zip(scores, scores[1:], strict=False))
    assert 0.0 <= scores[-1] < scores[0] < 1.0


@pytest.mark.parametrize("shape", [(37, 91, 3), (91, 37, 3), (160, 200, 3), (12, 12), (5, 3, 3), (1, 1, 3)])
def test_small_and_non_square(shape):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, shape), 0, 255).astype(np.uint8)
    q = quality(a, b)
    assert set(q) == {"psnr", "ssim", "ms_ssim"}
    assert all(math.isfinite(v) for v in q.values())
    assert -1.0 <= q["ssim"] <= 1.0 and 0.0 <= q["ms_ssim"] <= 1.0
    assert ms_ssim(a, a) == pytest.approx(1.0)


def test_fewer_scales_for_small_images():
    assert metrics._n_scales(161, 161) == 5
    assert metrics._n_scales(160, 512) == 4
    assert metrics._n_scales(37, 91) == 2
    assert metrics._n_scales(10, 10) == 1
    # One scale is plain SSIM (renormalised weight 1).
    a = _load("coffee")[:20, :30]
    b = _jpeg(a, 10)
    assert ms_ssim(a, b) == pytest.approx(max(ssim(a, b), 0.0), abs=1e-12)


def test_shape_mismatch_raises():
    a = np.zeros((20, 20, 3), np.uint8)
    for f in (psnr, ssim, ms_ssim, quality):
        with pytest.raises(ValueError):
            f(a, a[:, :19])
        with pytest.raises(ValueError):
            f(a, a[..., 0])


# --- against standard implementations, and the perceptual metrics -------------------------------


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_ms_ssim_matches_pytorch_msssim(name):
    """Ours against pytorch_msssim (the one CompressAI reports with), on each sample (a 256 x 200 crop with
    an odd side, still five scales: kept small, torch's float64 convolutions are slow on two cores) under
    two distortions: JPEG and an 8x upsampled thumbnail, our decoder's kind of blur."""
    torch = pytest.importorskip("torch")
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    full = _load(name)
    top, left = (full.shape[0] - 201) // 2, (full.shape[1] - 256) // 2
    ref = np.ascontiguousarray(full[top:top + 201, left:left + 256])
    small = np.asarray(Image.fromarray(ref).resize((32, 25), Image.Resampling.BOX)
                       .resize((256, 201), Image.Resampling.BICUBIC))
    for distorted in (_jpeg(ref, 10), small):
        x, y = (torch.from_numpy(a.transpose(2, 0, 1)[None].astype(np.float64)) for a in (ref, distorted))
        theirs = float(pytorch_msssim.ms_ssim(x, y, data_range=255, size_average=True))
        # 1e-5: pytorch_msssim builds its Gaussian window in float32 (then casts it), ours in float64
        assert ms_ssim(ref, distorted) == pytest.approx(theirs, abs=1e-5)


def test_pytorch_msssim_refuses_what_our_small_image_rule_measures():
    """Under 161 px on the short side pytorch_msssim asserts; ours uses fewer scales (module docstring)."""
    torch = pytest.importorskip("torch")
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    ref = _load("astronaut")[:120, :200]
    distorted = _jpeg(ref, 20)
    x, y = (torch.from_numpy(a.transpose(2, 0, 1)[None].astype(np.float64)) for a in (ref, distorted))
    with pytest.raises(AssertionError):
        pytorch_msssim.ms_ssim(x, y, data_range=255)
    assert metrics._n_scales(120, 200) == 4
    assert 0.0 < ms_ssim(ref, distorted) < 1.0


def test_perceptual_metrics_order_jpeg_qualities():
    """SSIMULACRA2 (higher is better) and FLIP (lower is better) rank JPEG qualities as they should."""
    ref = _load("coffee")[100:300, 200:456]
    s2 = [metrics.ssimulacra2(ref, _jpeg(ref, q)) for q in (90, 50, 10)]
    fl = [metrics.flip(ref, _jpeg(ref, q)) for q in (90, 50, 10)]
    assert s2 == sorted(s2, reverse=True) and fl == sorted(fl)
    assert metrics.ssimulacra2(ref, ref) == pytest.approx(100.0) and metrics.flip(ref, ref) == 0.0
    assert metrics.ssimulacra2(ref[:6, :6], ref[:6, :6]) is None  # no scale to measure
    grey = ref[..., 0]
    assert metrics.flip(grey, grey) == 0.0
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.flip(ref, ref[:-1])


def test_quality_report_and_learned_metrics_status(tmp_path):
    ref = _load("chelsea")
    report = metrics.quality_report(ref, _jpeg(ref, 30))
    assert list(report) == list(metrics.QUALITY_METRICS)
    assert report["psnr"] == pytest.approx(psnr(ref, _jpeg(ref, 30)))
    with pytest.raises(ValueError, match="unknown quality metric"):
        metrics.quality_report(ref, ref, ("lpips",))
    status = metrics.learned_metrics_status({})
    assert set(status) == {"lpips", "dists", "fid", "kid", "clip_score"}
    assert all(v.startswith("skipped: no weights configured") for v in status.values())
    weights = tmp_path / "lpips.pth"
    weights.write_bytes(b"")  # exists, but is no torch file: skipped with the reason (or torch's absence)
    status = metrics.learned_metrics_status({"MISCNET_LPIPS_WEIGHTS": str(weights),
                                             "MISCNET_LPIPS_BACKBONE": str(weights),
                                             "MISCNET_DISTS_WEIGHTS": str(tmp_path / "missing"),
                                             "MISCNET_DISTS_BACKBONE": str(weights)})
    assert status["lpips"].startswith("skipped: ") and ("lpips.pth: cannot be read" in status["lpips"]
                                                         or "pip install 'miscnet[models]'" in status["lpips"])
    assert status["dists"] == f"skipped: MISCNET_DISTS_WEIGHTS={tmp_path / 'missing'} does not exist"

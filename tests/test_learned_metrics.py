"""The learned metrics (experiments/learned_metrics.py): LPIPS, DISTS, FID/KID and CLIP-score, each loaded from
random-weight files written here in the layouts their publishers ship (torchvision's AlexNet / VGG16 state
dicts, lpips' v0.1 heads, DISTS_pytorch's alpha/beta, pytorch-fid's InceptionV3, a transformers CLIP
folder), and checked for properties that random weights cannot give by accident."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from miscnet.core.errors import MiscError
from miscnet.experiments import learned_metrics as lm
from miscnet.experiments.metrics import learned_metrics_status

# torchvision's layouts, written out here rather than taken from the loader's modules: a naming error shows.
ALEX_CONVS = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3),
              10: (256, 256, 3, 3)}
VGG16_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
               14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512),
               28: (512, 512)}


def _kaiming(torch, gen, shape):
    fan_in = int(np.prod(shape[1:]))
    return torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5


def alexnet_state(torch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i, shape in ALEX_CONVS.items():
        state[f"features.{i}.weight"] = _kaiming(torch, gen, shape)
        state[f"features.{i}.bias"] = 0.01 * torch.randn(shape[0], generator=gen)
    state["classifier.6.bias"] = torch.zeros(1000)  # the classifier is in the real file, and ignored
    return state


def vgg16_state(torch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i, (co, ci) in VGG16_CONVS.items():
        state[f"features.{i}.weight"] = _kaiming(torch, gen, (co, ci, 3, 3))
        state[f"features.{i}.bias"] = 0.01 * torch.randn(co, generator=gen)
    state["classifier.6.bias"] = torch.zeros(1000)
    return state


def lpips_heads(torch, channels, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {f"lin{i}.model.1.weight": torch.rand((1, c, 1, 1), generator=gen) / c for i, c in enumerate(channels)}


def dists_weights(torch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"alpha": torch.rand((1, 1475, 1, 1), generator=gen), "beta": torch.rand((1, 1475, 1, 1), generator=gen)}


def inception_state(torch, seed=0):
    """pytorch-fid's pt_inception layout: the FID InceptionV3's tensors (no num_batches_tracked) and fc."""
    from miscnet.experiments.learned_nets import InceptionV3

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in InceptionV3().state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("conv.weight"):
            state[k] = _kaiming(torch, gen, tuple(v.shape))
        elif k.endswith("running_var") or k.endswith("bn.weight"):
            state[k] = torch.ones_like(v)
        else:
            state[k] = torch.zeros_like(v)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    # shapes every copy of the real file has (checked independently of the module above)
    assert tuple(state["Conv2d_1a_3x3.conv.weight"].shape) == (32, 3, 3, 3)
    assert tuple(state["Mixed_7c.branch_pool.conv.weight"].shape) == (192, 2048, 1, 1)
    assert tuple(state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape) == (192, 192, 1, 7)
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Every learned metric's files, random, in the published layouts; returns {name: path}."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from miscnet.experiments.models import tiny_clip_tokenizer, write_tiny_clip

    d = tmp_path_factory.mktemp("learned")
    files = {"alex_backbone": (alexnet_state(torch), "alexnet-owt-7be5be79.pth"),
             "vgg_backbone": (vgg16_state(torch), "vgg16-397923af.pth"),
             "alex_heads": (lpips_heads(torch, (64, 192, 384, 256, 256)), "alex.pth"),
             "vgg_heads": (lpips_heads(torch, (64, 128, 256, 512, 512)), "vgg.pth"),
             "dists": (dists_weights(torch), "weights.pt"),
             "inception": (inception_state(torch), "pt_inception-2015-12-05-6726825d.pth")}
    out = {}
    for name, (state, filename) in files.items():
        torch.save(state, d / filename)
        out[name] = str(d / filename)
    write_tiny_clip(d / "clip", tiny_clip_tokenizer(d))
    out["clip"] = str(d / "clip")
    return out


def env_for(w):
    return {"MISCNET_LPIPS_WEIGHTS": w["alex_heads"], "MISCNET_LPIPS_BACKBONE": w["alex_backbone"],
            "MISCNET_DISTS_WEIGHTS": w["dists"], "MISCNET_DISTS_BACKBONE": w["vgg_backbone"],
            "MISCNET_INCEPTION_WEIGHTS": w["inception"], "MISCNET_CLIP_WEIGHTS": w["clip"],
            "MISCNET_METRICS_DEVICE": "cpu"}


def _photo(seed=0, h=48, w=56):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx * yy) % 256], axis=-1).astype(np.float64)
    img[h // 4 : h // 2, w // 3 : 2 * w // 3] = (200, 40, 40)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def _noisy(img, sigma, seed=1):
    noise = np.random.default_rng(seed).normal(0, 1, img.shape)  # one pattern, scaled: a strict ordering
    return np.clip(img + sigma * noise, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- no torch

def test_importing_the_metrics_needs_no_torch(tmp_path):
    for name in ("a.pth", "b.pth"):
        (tmp_path / name).write_bytes(b"x")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any 'import torch' now fails, as on an install without the extra
        from miscnet.experiments import metrics
        status = metrics.learned_metrics_status({{"MISCNET_LPIPS_WEIGHTS": "{tmp_path / 'a.pth'}",
                                                 "MISCNET_LPIPS_BACKBONE": "{tmp_path / 'b.pth'}"}})
        print(status["lpips"])
        print(status["fid"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("skipped: needs the model packages: pip install 'miscnet[models]'")
    assert lines[1] == "skipped: no weights configured (set MISCNET_INCEPTION_WEIGHTS)"


# ---------------------------------------------------------------------------------------------- LPIPS / DISTS

@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_is_zero_for_identical_images_and_grows_with_distortion(weights, net):
    heads, backbone = weights[f"{net}_heads"], weights[f"{net}_backbone"]
    ref = _photo()
    assert lm.lpips(ref, ref, heads, backbone, "cpu") == pytest.approx(0.0, abs=1e-7)
    values = [lm.lpips(ref, _noisy(ref, s), heads, backbone, "cpu") for s in (4, 16, 48)]
    assert 0 < values[0] < values[1] < values[2]
    if net == "alex":
        assert lm.lpips(ref[:20, :20], ref[:20, :20], heads, backbone, "cpu") is None  # no fifth level
        grey = ref[..., 0]
        assert lm.lpips(grey, grey, heads, backbone, "cpu") == pytest.approx(0.0, abs=1e-7)


def test_dists_is_zero_for_identical_images_and_grows_with_distortion(weights):
    ref = _photo()
    args = (weights["dists"], weights["vgg_backbone"], "cpu")
    assert lm.dists(ref, ref, *args) == pytest.approx(0.0, abs=1e-6)
    values = [lm.dists(ref, _noisy(ref, s), *args) for s in (4, 16, 48)]
    assert 0 < values[0] < values[1] < values[2] < 1
    with pytest.raises(ValueError, match="shape mismatch"):
        lm.dists(ref, ref[:-1], *args)


def test_wrong_files_are_one_line_errors_naming_the_path(weights, tmp_path):
    torch = pytest.importorskip("torch")
    from miscnet.experiments import learned_nets

    # heads for AlexNet with a VGG16 backbone
    with pytest.raises(MiscError, match=r"LPIPS backbone weights .*vgg16-397923af\.pth: not torchvision AlexNet "
                                        r"\(it looks like torchvision VGG16\)"):
        learned_nets.load_lpips(weights["alex_heads"], weights["vgg_backbone"])
    # keys renamed (a state dict of some other model)
    renamed = {k.replace("lin", "layer"): v for k, v in lpips_heads(torch, (64, 192, 384, 256, 256)).items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(MiscError, match=r"renamed\.pth: not the lpips package's v0\.1"):
        learned_nets.load_lpips(tmp_path / "renamed.pth", weights["alex_backbone"])
    # a layer of the wrong size
    state = vgg16_state(torch)
    state["features.28.weight"] = state["features.28.weight"][:256]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(MiscError, match=r"cut\.pth: features\.28\.weight has shape \(256, 512, 3, 3\), "
                                        r"expected \(512, 512, 3, 3\)"):
        learned_nets.load_dists(weights["dists"], tmp_path / "cut.pth")
    # a missing InceptionV3 block, a truncated file, a pickle that would run code, no file at all
    state = inception_state(torch)
    del state["Mixed_7c.branch3x3dbl_3b.bn.running_var"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(MiscError, match=r"partial\.pth: no tensor Mixed_7c\.branch3x3dbl_3b\.bn\.running_var"):
        learned_nets.load_inception(tmp_path / "partial.pth")
    data = (tmp_path / "cut.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    torch.save({"alpha": torch.zeros(1, 1475, 1, 1), "beta": ValueError("not a tensor")}, tmp_path / "code.pt")
    for name in ("truncated.pth", "code.pt"):
        with pytest.raises(MiscError, match=rf"{name}: cannot be read as a torch state dict"):
            learned_nets.read_state_dict(tmp_path / name, "DISTS")
    with pytest.raises(MiscError, match=r"absent\.pth: no such file"):
        learned_nets.read_state_dict(tmp_path / "absent.pth", "DISTS")
    # through the status a sweep records: skipped, with the reason, never a traceback
    env = {**env_for(weights), "MISCNET_DISTS_BACKBONE": str(tmp_path / "cut.pth"),
           "MISCNET_INCEPTION_WEIGHTS": str(tmp_path / "truncated.pth"), "MISCNET_CLIP_WEIGHTS": str(tmp_path)}
    status = learned_metrics_status(env)
    assert status["lpips"] == "computed"
    assert status["dists"].startswith("skipped: DISTS backbone weights ") and "\n" not in status["dists"]
    assert status["fid"] == status["kid"] and "truncated.pth: cannot be read" in status["fid"]
    assert status["clip_score"].startswith(f"skipped: cannot load the CLIP-score model from {tmp_path}")


def test_the_status_names_what_is_missing(tmp_path):
    status = learned_metrics_status({"MISCNET_LPIPS_WEIGHTS": str(tmp_path / "alex.pth"),
                                     "MISCNET_DISTS_WEIGHTS": str(tmp_path), "MISCNET_DISTS_BACKBONE": str(tmp_path),
                                     "MISCNET_INCEPTION_WEIGHTS": str(tmp_path / "absent.pth")})
    assert status["lpips"] == "skipped: MISCNET_LPIPS_BACKBONE not set (needs MISCNET_LPIPS_WEIGHTS and " \
                              "MISCNET_LPIPS_BACKBONE)"
    assert status["fid"] == f"skipped: MISCNET_INCEPTION_WEIGHTS={tmp_path / 'absent.pth'} does not exist"
    assert status["clip_score"] == "skipped: no weights configured (set MISCNET_CLIP_WEIGHTS)"


# ---------------------------------------------------------------------------------------------- FID / KID

def _reference_fid(x, y):
    """The textbook formula, with scipy's general matrix square root."""
    from scipy import linalg

    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * root))


@pytest.mark.parametrize("n", [200, 6])  # more samples than dimensions, and fewer (the low-rank path)
def test_fid_matches_the_formula(n):
    rng = np.random.default_rng(3)
    d = 16
    x = rng.normal(0, 1, (n, d)) @ rng.normal(0, 1, (d, d))
    y = rng.normal(0.5, 1.5, (n + 3, d))
    if n > d:
        assert lm.fid(x, y) == pytest.approx(_reference_fid(x, y), rel=1e-6)
    else:  # sqrtm of a singular product is unreliable; the nuclear-norm path is exact: check it from its eigenvalues
        a, b = x - x.mean(0), y - y.mean(0)
        s1, s2 = a.T @ a / (len(x) - 1), b.T @ b / (len(y) - 1)
        tr_root = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
        diff = x.mean(0) - y.mean(0)
        assert lm.fid(x, y) == pytest.approx(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_root, rel=1e-6)
    assert lm.fid(x, x) == pytest.approx(0.0, abs=1e-8 * np.trace(np.cov(x, rowvar=False)))
    with pytest.raises(ValueError, match="at least 2"):
        lm.fid(x[:1], y)


def test_kid_is_unbiased_near_zero_for_one_distribution():
    rng = np.random.default_rng(5)
    d, n = 32, 40

    def biased(x, y):  # the V-statistic (diagonals kept): positive on average even for one distribution
        k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
        return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()

    same, plugin = [], []
    for s in range(200):
        x, y = rng.normal(0, 1, (n, d)), rng.normal(0, 1, (n, d))
        same.append(lm.kid(x, y, subsets=1, seed=s)[0])
        plugin.append(biased(x, y))
    se = np.std(same) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 3 * se  # unbiased: centred on 0 at this small n
    assert np.mean(plugin) > 10 * se
    other = lm.kid(rng.normal(0, 1, (150, d)), rng.normal(0.3, 1, (150, d)), subsets=20, subset_size=100)[0]
    assert other > 30 * se
    x = rng.normal(0, 1, (40, d))
    assert lm.kid(x, x, subsets=3, seed=1) == lm.kid(x, x, subsets=3, seed=1)  # seeded


def test_inception_features_and_fid_of_image_sets(weights):
    images = [_photo(i, 48 + 8 * i, 56) for i in range(2)]  # sizes differ: each is resized to 299 x 299
    feats = lm.inception_features(images, weights["inception"], "cpu")
    assert feats.shape == (2, 2048) and np.isfinite(feats).all() and feats.std(axis=0).max() > 0
    blurred = lm.inception_features([_noisy(im, 60, seed=i) for i, im in enumerate(images)], weights["inception"],
                                    "cpu")
    scale = np.trace(np.cov(feats, rowvar=False))
    assert lm.fid(feats, feats) == pytest.approx(0.0, abs=1e-9 * scale)
    assert lm.fid(blurred, feats) > 1e-3 * scale
    result = lm.set_metrics(blurred, feats)
    assert result["n_reconstructions"] == 2 and result["kid"] is not None and result["fid"] > 0
    assert "fewer than the 2048 feature dimensions" in lm.set_note(2, 2)
    assert lm.set_note(1, 4).startswith("not computed")


# ---------------------------------------------------------------------------------------------- CLIP-score

def test_clip_score_is_the_models_own_cosine(weights):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    image, caption = _photo(2), "a red box on a gradient"
    score = lm.clip_score(image, caption, weights["clip"], "cpu")
    model = CLIPModel.from_pretrained(weights["clip"], local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(weights["clip"], local_files_only=True)
    inputs = processor(text=[caption], images=[image], return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model(**inputs)
    cos = float((out.image_embeds * out.text_embeds).sum())  # CLIPModel's embeddings are unit vectors
    assert score == pytest.approx(100 * max(cos, 0.0), abs=1e-4)
    others = [lm.clip_score(image, text, weights["clip"], "cpu") for text in ("a photo of the cat", "x y z")]
    assert all(0 <= s <= 100 for s in [score, *others]) and len({round(s, 6) for s in [score, *others]}) > 1
    assert lm.clip_score(image, "  ", weights["clip"], "cpu") is None


# ---------------------------------------------------------------------------------------------- sweeps

SCENARIO = """
name = "learned"
[images]
paths = ["{photos}"]
[encoder]
pixel = "jpeg"
levels = 2
[link]
rate = "256kbit"
[baselines]
codecs = []
"""


def test_a_sweep_reports_the_configured_metrics(weights, tmp_path, monkeypatch):
    from PIL import Image

    from miscnet.experiments.scenario import load_scenario
    from miscnet.experiments.sweep import run_sweep

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(_photo(i, 48, 64)).save(photos / f"p{i}.png")
        (photos / f"p{i}.json").write_text(json.dumps({
            "objects": [{"name": "Red Box", "detail": "A flat red rectangle.", "box": [0.33, 0.25, 0.66, 0.5]}],
            "caption": f"Picture {i}: a red rectangle on a smooth colour gradient."}))
    (tmp_path / "s.toml").write_text(SCENARIO.format(photos=photos))
    spec = load_scenario(tmp_path / "s.toml")
    env = env_for(weights)
    del env["MISCNET_DISTS_WEIGHTS"]  # one left unconfigured: reported skipped beside the others
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MISCNET_DISTS_WEIGHTS", raising=False)
    run_sweep(spec, tmp_path / "out", workers=1, quiet=True, plots=False)

    import csv

    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    pixel_rows = [r for r in rows if r["psnr"]]
    assert pixel_rows and all(r["lpips"] and r["clip_score"] and not r["dists"] for r in pixel_rows)
    assert all(float(r["lpips"]) > 0 for r in pixel_rows)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for res in summary["results"]:
        status = res["learned-metrics"]
        assert status["lpips"] == status["clip_score"] == "computed"
        assert status["dists"].startswith("skipped: MISCNET_DISTS_WEIGHTS not set")
        assert "fewer than the 2048 feature dimensions" in status["fid"]
        r = res["results"]
        assert len(r["fid"]) == len(r["kid"]) == len(r["stage"]) == len(r["lpips"])
        assert all(v is not None and v >= 0 for v in r["fid"]) and r["fid-images"] == [2] * len(r["stage"])
        assert "dists" not in r
        # more pixel levels, closer to the references: the last stage's LPIPS is the lowest of its curve
        assert r["lpips"][-1] == min(r["lpips"])
    cj = json.loads((tmp_path / "out" / "compressai" / "c000-misc.json").read_text())
    assert cj["results"]["fid"] == summary["results"][0]["results"]["fid"]
    assert cj["learned-metrics"] == summary["results"][0]["learned-metrics"]

"""Cross-check of experiments/learned_metrics.py against the reference implementations' own code.

    python -m miscnet.experiments.crosscheck_learned [WORK_DIR]

Fetches with ``pip download --no-deps`` (nothing is installed) the wheels of lpips 0.1.4, DISTS_pytorch 0.1,
pytorch-fid 0.3.0 and torchvision 0.28.0, unpacks them into WORK_DIR (default: a temporary folder) and
imports their Python code from there. torchvision's compiled ops are left out: only its model definitions
(AlexNet, VGG16, Inception3) are used, which need none. Then, on the same random ImageNet backbones saved
as torchvision state dicts (with non-trivial batch-norm statistics), and on the linear heads the lpips and
DISTS_pytorch wheels ship (their real v0.1 alex.pth / vgg.pth and weights.pt), it compares:

- LPIPS-alex and LPIPS-vgg: ``lpips.LPIPS(...)(x, y, normalize=True)`` against ``learned_metrics.lpips``;
- DISTS: ``DISTS_pytorch.DISTS()(x, y)`` against ``learned_metrics.dists``;
- the pool3 features of ``pytorch_fid.inception.InceptionV3([3])`` (its FID Inception, from a torchvision
  Inception3 state dict with 1008 classes: the pt_inception layout) against ``inception_features``;
- ``pytorch_fid.fid_score.calculate_frechet_distance`` against ``learned_metrics.fid``.

Prints each pair and exits 1 when one differs by more than 1e-5 (relative). Needs torch and a package
index; it is a developer check, not part of the test suite (which builds its own layouts offline).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

WHEELS = ("lpips==0.1.4", "DISTS-pytorch==0.1", "pytorch-fid==0.3.0", "torchvision==0.28.0")
TOLERANCE = 1e-5


def _unpack(work: Path) -> Path:
    wheels = work / "wheels"
    src = work / "src"
    if not (src / "torchvision").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *WHEELS],
                       check=True)
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(src)
        tv = src / "torchvision"
        for lib in tv.glob("*.so"):  # compiled ops built for another torch: never loaded
            lib.unlink()
        (tv / "__init__.py").write_text('__version__ = "0.28.0"  # model definitions only (crosscheck_learned)\n')
        (tv / "models" / "__init__.py").write_text("from .alexnet import *\nfrom .vgg import *\n"
                                                   "from .inception import *\n")
    return src


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx * yy) % 256], -1).astype(np.float64)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    work = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="miscnet-crosscheck-"))
    src = _unpack(work)
    sys.path.insert(0, str(src))
    import torch
    import torchvision.models as tvm

    from miscnet.experiments import learned_metrics as lm

    torch.manual_seed(0)

    def randomised(model):
        for mod in model.modules():
            if isinstance(mod, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                if mod.bias is not None:
                    torch.nn.init.normal_(mod.bias, 0, 0.01)
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.data.uniform_(0.5, 1.5)
                mod.bias.data.normal_(0, 0.1)
        return model.eval()

    files = work / "files"
    files.mkdir(exist_ok=True)
    alex, vgg = randomised(tvm.alexnet()), randomised(tvm.vgg16())
    inception = randomised(tvm.inception_v3(num_classes=1008, aux_logits=False, init_weights=False))
    torch.save(alex.state_dict(), files / "alexnet.pth")
    torch.save(vgg.state_dict(), files / "vgg16.pth")
    torch.save(inception.state_dict(), files / "pt_inception.pth")

    a = _photo(96, 128, 1)
    b = np.clip(a + np.random.default_rng(0).normal(0, 25, a.shape), 0, 255).astype(np.uint8)

    def tensor(im):
        return torch.from_numpy(im.astype(np.float32) / 255).permute(2, 0, 1)[None]

    pairs: list[tuple[str, float, float]] = []
    import lpips

    heads_dir = src / "lpips" / "weights" / "v0.1"
    for net, model, backbone in (("alex", alex, "alexnet.pth"), ("vgg", vgg, "vgg16.pth")):
        ref = lpips.LPIPS(net=net, version="0.1", pnet_rand=True, verbose=False,
                          model_path=str(heads_dir / f"{net}.pth")).eval()
        for k in range(1, 6):  # lpips slices torchvision's features: give them the same random backbone
            for name, mod in getattr(ref.net, f"slice{k}").named_children():
                if isinstance(mod, torch.nn.Conv2d):
                    mod.load_state_dict(model.features[int(name)].state_dict())
        with torch.no_grad():
            want = float(ref(tensor(a), tensor(b), normalize=True).flatten()[0])
        pairs.append((f"LPIPS-{net}", want, lm.lpips(a, b, str(heads_dir / f"{net}.pth"), str(files / backbone),
                                                     "cpu")))

    tvm.vgg16 = lambda *args, **kw: vgg  # DISTS_pytorch asks torchvision for pretrained VGG16: give it ours
    import DISTS_pytorch.DISTS_pt as dists_pt

    ref = dists_pt.DISTS(load_weights=False)
    dists_file = src / "DISTS_pytorch" / "weights.pt"
    weights = torch.load(dists_file, weights_only=True)
    ref.alpha.data, ref.beta.data = weights["alpha"], weights["beta"]
    with torch.no_grad():
        want = float(ref(tensor(a), tensor(b)))
    pairs.append(("DISTS", want, lm.dists(a, b, str(dists_file), str(files / "vgg16.pth"), "cpu")))

    import pytorch_fid.inception as pfi
    from pytorch_fid.fid_score import calculate_frechet_distance

    state = inception.state_dict()
    pfi.load_state_dict_from_url = lambda *args, **kw: state  # instead of its download
    ref = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
    images = [a, b, _photo(64, 80, 3)]
    with torch.no_grad():
        want_f = np.stack([ref(tensor(im))[0].flatten().double().numpy() for im in images])
    got_f = lm.inception_features(images, str(files / "pt_inception.pth"), "cpu")
    distance = [float(np.linalg.norm(want_f[i] - got_f[i]) / np.linalg.norm(want_f[i])) for i in range(len(images))]
    x = np.random.default_rng(1).normal(0, 1, (300, 64))
    y = np.random.default_rng(2).normal(0.2, 1.2, (280, 64))
    pairs.append(("FID 300 vs 280 x 64", float(calculate_frechet_distance(
        x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))), lm.fid(x, y)))

    worst = max(distance)
    print(f"{'InceptionV3 pool3, 3 images':28s} |miscnet - reference| / |reference| at most {worst:.1e}")
    for name, want, got in pairs:
        rel = abs(got - want) / max(abs(want), 1e-12)
        worst = max(worst, rel)
        print(f"{name:28s} reference {want:.8g}  miscnet {got:.8g}  relative difference {rel:.1e}")
    print(f"worst relative difference {worst:.1e} (limit {TOLERANCE:g})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())

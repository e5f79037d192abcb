"""The networks behind the learned metrics (experiments/learned_metrics.py), in torch, under the parameter
names of the files their publishers ship, so those very files load:

- AlexNet and VGG16 feature stacks as torchvision builds them (``features.0.weight`` ...; the
  ``classifier.*`` tensors of a full torchvision file are read and ignored): alexnet-owt-7be5be79.pth,
  vgg16-397923af.pth. torchvision itself is not used: it pins its own torch and breaks beside ours.
- LPIPS v0.1 (Zhang et al. 2018): the ``lpips`` package's linear heads (alex.pth / vgg.pth, keys
  ``lin0.model.1.weight`` ... of shape 1xCx1x1) over those features.
- DISTS (Ding et al. 2020): DISTS_pytorch's weights.pt (``alpha``, ``beta``, 1x1475x1x1) over VGG16 with
  its max pools replaced by L2 pooling, as DISTS_pytorch builds it.
- InceptionV3 for FID (pytorch-fid's FID variant of torchvision's Inception3, the TensorFlow 2015-12-05
  graph): pt_inception-2015-12-05-6726825d.pth, keys ``Conv2d_1a_3x3.conv.weight`` ... ``Mixed_7c.*``
  (``fc.*`` read and ignored); the pool3 features, 2048 per image.

Files are read with safetensors or ``torch.load(weights_only=True)`` only, and every key and shape is
checked before anything loads: a wrong file is one MiscError line naming it. This module imports torch;
experiments/learned_metrics.py imports it only when a metric is used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from miscnet.core.errors import MiscError

ALEX_CHANNELS = (64, 192, 384, 256, 256)
VGG_CHANNELS = (64, 128, 256, 512, 512)
DISTS_CHANNELS = (3, *VGG_CHANNELS)  # DISTS also compares the input image itself
# torchvision's feature stacks, as (out channels, kernel, stride, padding) for a conv, "M" for a max pool
_ALEX = [(64, 11, 4, 2), "M", (192, 5, 1, 2), "M", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1), "M"]
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# index in ``features`` of the ReLU whose output each LPIPS/DISTS layer taps (relu1 .. relu5)
ALEX_TAPS = (1, 4, 7, 9, 11)
VGG_TAPS = (3, 8, 15, 22, 29)
# LPIPS's ScalingLayer (inputs in [-1, 1]) and DISTS's ImageNet normalisation (inputs in [0, 1])
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_SIDE = 32  # below this the five feature levels of AlexNet / VGG16 run out of pixels


# ---------------------------------------------------------------------------------------------- files

def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Named tensors from a .safetensors file or a torch file read with weights_only (no code runs)."""
    p = Path(path)
    if not p.is_file():
        raise MiscError(f"{what} weights {p}: no such file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, a pickle with code in it, not a torch file at all, ...
        raise MiscError(f"{what} weights {p}: cannot be read as a torch state dict or safetensors file "
                        f"({type(exc).__name__}: {_short(exc)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a training checkpoint
        state = state["state_dict"]
    if (not isinstance(state, dict) or not state
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise MiscError(f"{what} weights {p}: not a state dict of named tensors")
    return state


def _check(state: dict, expected: dict[str, tuple[int, ...]], path, what: str, layout: str,
           ignore: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of ``expected`` (name -> shape) from ``state``, or MiscError naming the first mismatch."""
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MiscError(f"{what} weights {path}: no tensor {missing[0]}{more}: not {layout}")
    extra = [k for k in state if k not in expected and not k.startswith(ignore) and
             not k.endswith("num_batches_tracked")]
    if extra:
        raise MiscError(f"{what} weights {path}: unexpected tensor {extra[0]}: not {layout}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise MiscError(f"{what} weights {path}: {k} has shape {tuple(state[k].shape)}, expected {shape} "
                            f"({layout})")
        if not state[k].is_floating_point():
            raise MiscError(f"{what} weights {path}: {k} is {state[k].dtype}, not floating point")
    return {k: state[k].float() for k in expected}


def _load(module: nn.Module, state: dict, path, what: str, layout: str, ignore: tuple[str, ...] = ()) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    module.load_state_dict(_check(state, expected, path, what, layout, ignore), strict=False)


# ---------------------------------------------------------------------------------------------- backbones

def _features(layers: list, pool) -> nn.Sequential:
    """torchvision's ``features`` stack; ``pool(channels)`` makes each pooling layer."""
    out: list[nn.Module] = []
    c = 3
    for layer in layers:
        if layer == "M":
            out.append(pool(c))
            continue
        co, k, s, p = layer if isinstance(layer, tuple) else (layer, 3, 1, 1)
        out += [nn.Conv2d(c, co, k, stride=s, padding=p), nn.ReLU()]
        c = co
    return nn.Sequential(*out)


class L2Pool(nn.Module):
    """DISTS's L2 pooling: sqrt of a 3x3 Hanning-weighted mean of squares, stride 2 (DISTS_pytorch L2pooling)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        a = np.hanning(5)[1:-1]
        g = torch.tensor(a[:, None] * a[None, :], dtype=torch.float32)
        self.register_buffer("filter", (g / g.sum())[None, None].repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x):
        out = F.conv2d(x * x, self.filter, stride=2, padding=1, groups=x.shape[1])
        return (out + 1e-12).sqrt()


class Backbone(nn.Module):
    """A torchvision AlexNet or VGG16 feature stack that returns the ReLU outputs at ``taps``."""

    def __init__(self, net: str, l2_pool: bool = False) -> None:
        super().__init__()
        if net == "alex":
            self.features = _features(_ALEX, lambda c: nn.MaxPool2d(3, 2))
            self.taps = ALEX_TAPS
        else:
            pool = L2Pool if l2_pool else (lambda c: nn.MaxPool2d(2, 2))
            self.features = _features(_VGG16, pool)
            self.taps = VGG_TAPS
        self.net = net

    def forward(self, x) -> list:
        out = []
        for i, layer in enumerate(self.features[: self.taps[-1] + 1]):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


def backbone_kind(state: dict) -> str | None:
    """'alex' or 'vgg' from the first conv of a torchvision state dict, None for anything else."""
    w = state.get("features.0.weight")
    if w is None:
        return None
    return {(64, 3, 11, 11): "alex", (64, 3, 3, 3): "vgg"}.get(tuple(w.shape))


def load_backbone(path, what: str, want: str | None = None, l2_pool: bool = False) -> Backbone:
    state = read_state_dict(path, what)
    kind = backbone_kind(state)
    names = {"alex": "torchvision AlexNet", "vgg": "torchvision VGG16"}
    if kind is None or (want is not None and kind != want):
        layout = names[want] if want else "a torchvision AlexNet or VGG16 state dict"
        found = f" (it looks like {names[kind]})" if kind else ""
        raise MiscError(f"{what} weights {path}: not {layout}{found}")
    model = Backbone(kind, l2_pool)
    _load(model, state, path, what, f"a {names[kind]} state dict", ignore=("classifier.",))
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- LPIPS

class Lpips(nn.Module):
    """LPIPS v0.1: unit-normalised features, squared differences weighted by the linear heads, averaged."""

    def __init__(self, backbone: Backbone, heads: list) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ParameterList([nn.Parameter(h, requires_grad=False) for h in heads])
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def forward(self, x, y):  # x, y in [0, 1], Bx3xHxW
        fx = self.backbone((2 * x - 1 - self.shift) / self.scale)
        fy = self.backbone((2 * y - 1 - self.shift) / self.scale)
        total = 0
        for a, b, w in zip(fx, fy, self.heads, strict=True):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + F.conv2d((a - b) ** 2, w).mean((2, 3))
        return total[:, 0]


def load_lpips(heads_path, backbone_path) -> Lpips:
    state = read_state_dict(heads_path, "LPIPS heads")
    channels = tuple(int(state[f"lin{i}.model.1.weight"].shape[1]) if f"lin{i}.model.1.weight" in state else 0
                     for i in range(5))
    net = {ALEX_CHANNELS: "alex", VGG_CHANNELS: "vgg"}.get(channels)
    layout = "the lpips package's v0.1 alex.pth or vgg.pth (lin0.model.1.weight ... lin4.model.1.weight)"
    if net is None:
        raise MiscError(f"LPIPS heads weights {heads_path}: not {layout}")
    chans = ALEX_CHANNELS if net == "alex" else VGG_CHANNELS
    heads = _check(state, {f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate(chans)}, heads_path,
                   "LPIPS heads", layout)
    backbone = load_backbone(backbone_path, "LPIPS backbone", want=net)
    return Lpips(backbone, list(heads.values())).eval()


# ---------------------------------------------------------------------------------------------- DISTS

class Dists(nn.Module):
    """DISTS: structure and texture similarity of VGG16 (L2-pooled) features, weighted by alpha and beta."""

    def __init__(self, backbone: Backbone, alpha, beta) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("alpha", alpha, persistent=False)
        self.register_buffer("beta", beta, persistent=False)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x, y):  # x, y in [0, 1], Bx3xHxW
        fx = [x, *self.backbone((x - self.mean) / self.std)]
        fy = [y, *self.backbone((y - self.mean) / self.std)]
        w_sum = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / w_sum, DISTS_CHANNELS, dim=1)
        betas = torch.split(self.beta / w_sum, DISTS_CHANNELS, dim=1)
        c1 = c2 = 1e-6
        d1 = d2 = 0
        for a, b, wa, wb in zip(fx, fy, alphas, betas, strict=True):
            ma, mb = a.mean((2, 3), keepdim=True), b.mean((2, 3), keepdim=True)
            d1 = d1 + (wa * (2 * ma * mb + c1) / (ma**2 + mb**2 + c1)).sum(1, keepdim=True)
            va, vb = ((a - ma) ** 2).mean((2, 3), keepdim=True), ((b - mb) ** 2).mean((2, 3), keepdim=True)
            cov = (a * b).mean((2, 3), keepdim=True) - ma * mb
            d2 = d2 + (wb * (2 * cov + c2) / (va + vb + c2)).sum(1, keepdim=True)
        return 1 - (d1 + d2).flatten()


def load_dists(weights_path, backbone_path) -> Dists:
    state = read_state_dict(weights_path, "DISTS")
    n = sum(DISTS_CHANNELS)
    ab = _check(state, {"alpha": (1, n, 1, 1), "beta": (1, n, 1, 1)}, weights_path, "DISTS",
                "DISTS_pytorch's weights.pt (alpha, beta)")
    backbone = load_backbone(backbone_path, "DISTS backbone", want="vgg", l2_pool=True)
    return Dists(backbone, ab["alpha"], ab["beta"]).eval()


# ---------------------------------------------------------------------------------------------- InceptionV3

class _Conv(nn.Module):  # torchvision's BasicConv2d: conv (no bias), batch norm (eps 0.001), ReLU
    def __init__(self, cin: int, cout: int, **kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # the TF graph's average pools leave the padding out of the mean
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _A(nn.Module):
    def __init__(self, cin: int, pool: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, kernel_size=1)
        self.branch5x5_1 = _Conv(cin, 48, kernel_size=1)
        self.branch5x5_2 = _Conv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _Conv(cin, pool, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class _B(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _C(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, kernel_size=1)
        self.branch7x7_1 = _Conv(cin, c7, kernel_size=1)
        self.branch7x7_2 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class _D(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, kernel_size=1)
        self.branch3x3_2 = _Conv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = _Conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _E(nn.Module):
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool  # the last block (Mixed_7c) max-pools its pool branch in the TF graph
        self.branch1x1 = _Conv(cin, 320, kernel_size=1)
        self.branch3x3_1 = _Conv(cin, 384, kernel_size=1)
        self.branch3x3_2a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """pytorch-fid's FID InceptionV3 up to pool3: images -> 2048 features."""

    FEATURES = 2048

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, kernel_size=3)
        self.Mixed_5b = _A(192, 32)
        self.Mixed_5c = _A(256, 64)
        self.Mixed_5d = _A(288, 64)
        self.Mixed_6a = _B(288)
        self.Mixed_6b = _C(768, 128)
        self.Mixed_6c = _C(768, 160)
        self.Mixed_6d = _C(768, 160)
        self.Mixed_6e = _C(768, 192)
        self.Mixed_7a = _D(768)
        self.Mixed_7b = _E(1280, max_pool=False)
        self.Mixed_7c = _E(2048, max_pool=True)

    def forward(self, x):  # x in [0, 1], Bx3xHxW, any size
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean((2, 3))


def load_inception(path) -> InceptionV3:
    model = InceptionV3()
    _load(model, read_state_dict(path, "InceptionV3"), path, "InceptionV3",
          "pytorch-fid's pt_inception-2015-12-05 state dict", ignore=("fc.", "AuxLogits."))
    return model.eval().requires_grad_(False)


def to_tensor(image: np.ndarray, device) -> torch.Tensor:
    """HxWx3 (or HxW) uint8 -> 1x3xHxW float32 in [0, 1]."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 or HxW image, got shape {a.shape}")
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / 255.0)
    return t.permute(2, 0, 1)[None].to(device)

"""Learned quality metrics, computed only from weights already on this machine: LPIPS, DISTS, FID, KID and
CLIP-score. Nothing is downloaded and no Hub id is named: each metric is configured by environment
variables that point at local files (the ones their publishers ship), and is reported skipped, with the
reason, when they are unset, missing or not what they should be.

- ``MISCNET_LPIPS_WEIGHTS``: the ``lpips`` package's v0.1 linear heads, ``lpips/weights/v0.1/alex.pth`` or
  ``vgg.pth`` (keys ``lin0.model.1.weight`` ... ``lin4.model.1.weight``);
- ``MISCNET_LPIPS_BACKBONE``: torchvision's ImageNet AlexNet or VGG16 state dict matching those heads
  (``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``);
- ``MISCNET_DISTS_WEIGHTS``: DISTS_pytorch's ``weights.pt`` (``alpha``, ``beta``);
- ``MISCNET_DISTS_BACKBONE``: torchvision's VGG16 state dict (``vgg16-397923af.pth``);
- ``MISCNET_INCEPTION_WEIGHTS``: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (FID and KID);
- ``MISCNET_CLIP_WEIGHTS``: a transformers CLIP folder (config.json, weights, tokenizer,
  preprocessor_config.json);
- ``MISCNET_METRICS_DEVICE``: ``auto`` (default: CUDA when present), ``cpu`` or ``cuda[:N]``; always float32.

Files are read with safetensors or ``torch.load(weights_only=True)``, CLIP with
``from_pretrained(folder, local_files_only=True)``; a wrong file is one MiscError line naming the path.
torch (the 'models' extra) is imported only when a metric is loaded (experiments/learned_nets.py). On the
same weights the values equal those of the reference packages' own code (lpips 0.1.4, DISTS_pytorch 0.1,
pytorch-fid 0.3.0): ``python -m miscnet.experiments.crosscheck_learned``.

Definitions (images uint8 RGB; grey is repeated to three channels)
---------------------------------------------------------------------
LPIPS (Zhang et al. 2018), v0.1, lower is better, 0 for identical images
    The lpips package's ``LPIPS(net=..., version="0.1")`` at full resolution: inputs scaled to [-1, 1] and
    through its ScalingLayer, the five ReLU outputs unit-normalised over channels, squared differences
    weighted by the 1x1 heads, averaged over space and summed over layers.
DISTS (Ding et al. 2020), lower is better, 0 for identical images
    DISTS_pytorch's ``DISTS()(x, y)`` at full resolution (its demo first resizes to 256 px on the short
    side; this does not): the image and five L2-pooled VGG16 stages, structure and texture terms weighted
    by alpha and beta. Images under 32 px on a side have no fifth stage: LPIPS and DISTS are None.
FID (Heusel et al. 2017) and KID (Binkowski et al. 2018), set metrics, lower is better
    InceptionV3 pool3 features (2048 per image; the image resized to 299x299 bilinear as pytorch-fid does)
    of a set of reconstructions and of their references. FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)
    with sample covariances; the trace of the root is taken exactly from the eigenvalues (``fid``). KID is
    the unbiased MMD^2 estimate with the polynomial kernel (x.y / d + 1)^3, averaged over ``subsets``
    random subsets of ``min(1000, n1, n2)`` images each (seeded), with its standard deviation. With fewer
    images than the 2048 feature dimensions the covariances are rank-deficient: such an FID says which of
    two settings is closer on the same images, but is not comparable to published FIDs (10k-50k images).
CLIP-score (Hessel et al. 2021), higher is better
    ``100 * max(cos(E_image, E_text), 0)`` between the CLIP embeddings of the reconstruction (through the
    folder's image processor) and of the image's caption from the semantic layer (truncated to the text
    model's 77 tokens); None when there is no caption.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import numpy as np

from miscnet.core.errors import MiscError

# metric -> the environment variables it needs (all of them)
LEARNED_METRICS: dict[str, tuple[str, ...]] = {
    "lpips": ("MISCNET_LPIPS_WEIGHTS", "MISCNET_LPIPS_BACKBONE"),
    "dists": ("MISCNET_DISTS_WEIGHTS", "MISCNET_DISTS_BACKBONE"),
    "fid": ("MISCNET_INCEPTION_WEIGHTS",),
    "kid": ("MISCNET_INCEPTION_WEIGHTS",),
    "clip_score": ("MISCNET_CLIP_WEIGHTS",),
}
DEVICE_ENV = "MISCNET_METRICS_DEVICE"
IMAGE_METRICS = ("lpips", "dists", "clip_score")  # one value per reconstruction
SET_METRICS = ("fid", "kid")  # one value per set of reconstructions
FEATURE_DIMS = 2048  # InceptionV3 pool3
COMPUTED = "computed"


@dataclass(frozen=True)
class LearnedWeights:
    """The local files of the learned metrics that will be computed (None: not computed). Picklable, so
    sweep workers (local or on a Dask cluster, where the same paths must exist) load their own copies."""

    lpips: tuple[str, str] | None = None  # (heads, backbone)
    dists: tuple[str, str] | None = None  # (alpha/beta, VGG16)
    inception: str | None = None
    clip: str | None = None
    device: str = "auto"

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self) if f.name != "device")

    def metrics(self) -> tuple[str, ...]:
        """The per-image metrics these weights give, in IMAGE_METRICS order."""
        have = {"lpips": self.lpips, "dists": self.dists, "clip_score": self.clip}
        return tuple(m for m in IMAGE_METRICS if have[m])


def _configured(environ, metric: str) -> tuple[tuple[str, ...] | None, str | None]:
    """(paths, None) when every variable of ``metric`` names an existing path, else (None, why not)."""
    variables = LEARNED_METRICS[metric]
    unset = [v for v in variables if not environ.get(v)]
    if unset:
        if len(unset) == len(variables):
            return None, f"skipped: no weights configured (set {' and '.join(variables)})"
        return None, f"skipped: {' and '.join(unset)} not set (needs {' and '.join(variables)})"
    paths = tuple(environ[v] for v in variables)
    for v, p in zip(variables, paths, strict=True):
        if not os.path.exists(p):
            return None, f"skipped: {v}={p} does not exist"
    return paths, None


def resolve(environ=None, load: bool = True) -> tuple[LearnedWeights, dict[str, str]]:
    """The usable learned metrics and {metric: COMPUTED or "skipped: <reason>"} for every metric.

    With ``load`` each configured model is loaded once here (and kept for this process), so a wrong file
    is reported as skipped before any work, never as a failure halfway through a sweep.
    """
    environ = os.environ if environ is None else environ
    device = environ.get(DEVICE_ENV) or "auto"
    status: dict[str, str] = {}
    found: dict[str, tuple[str, ...]] = {}
    for metric in LEARNED_METRICS:
        paths, why = _configured(environ, metric)
        if why:
            status[metric] = why
        else:
            found[metric] = paths
    if found and load:
        try:
            import torch  # noqa: F401
        except ImportError:
            for metric in found:
                status[metric] = "skipped: needs the model packages: pip install 'miscnet[models]' (torch)"
            found = {}
    loaders = {"lpips": lambda p: lpips_model(*p, device=device), "dists": lambda p: dists_model(*p, device=device),
               "fid": lambda p: inception_model(p[0], device=device),
               "kid": lambda p: inception_model(p[0], device=device),
               "clip_score": lambda p: clip_model(p[0], device=device)}
    for metric, paths in list(found.items()):
        if load:
            try:
                loaders[metric](paths)
            except MiscError as exc:
                status[metric] = f"skipped: {exc}"
                del found[metric]
                continue
            except (OSError, RuntimeError, ValueError) as exc:  # e.g. no memory left on the device
                text = " ".join(str(exc).split())[:200]
                status[metric] = f"skipped: {metric} weights {' + '.join(paths)}: {type(exc).__name__}: {text}"
                del found[metric]
                continue
        status[metric] = COMPUTED
    inception = found.get("fid") or found.get("kid")
    weights = LearnedWeights(lpips=found.get("lpips"), dists=found.get("dists"),
                             inception=inception[0] if inception else None,
                             clip=found["clip_score"][0] if "clip_score" in found else None, device=device)
    return weights, {m: status[m] for m in LEARNED_METRICS}


# ---------------------------------------------------------------------------------------------- models
# Each loads once per (path, device) and process: a sweep worker measures many stages with one copy.

_MODELS: dict[tuple, object] = {}


def _cached(key: tuple, make):
    if key not in _MODELS:
        _MODELS[key] = make()
    return _MODELS[key]


def _device(device: str) -> str:
    from miscnet.core.pretrained import pick_device

    return pick_device(device)[0]  # the device only: metrics run in float32 everywhere


def lpips_model(heads: str, backbone: str, device: str = "auto"):
    def make():
        from miscnet.experiments import learned_nets

        return learned_nets.load_lpips(heads, backbone).to(_device(device))

    return _cached(("lpips", heads, backbone, device), make)


def dists_model(weights: str, backbone: str, device: str = "auto"):
    def make():
        from miscnet.experiments import learned_nets

        return learned_nets.load_dists(weights, backbone).to(_device(device))

    return _cached(("dists", weights, backbone, device), make)


def inception_model(path: str, device: str = "auto"):
    def make():
        from miscnet.experiments import learned_nets

        return learned_nets.load_inception(path).to(_device(device))

    return _cached(("inception", path, device), make)


@dataclass
class ClipScorer:
    model: object
    tokenizer: object
    processor: object
    device: str

    def _features(self, out):
        import torch

        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def text_embedding(self, text: str):
        import torch

        max_len = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        tok = self.tokenizer([text], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        with torch.inference_mode():
            return self._features(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                                attention_mask=tok["attention_mask"].to(self.device)))

    def image_embedding(self, image: np.ndarray):
        import torch

        pixels = self.processor(images=[_rgb(image)], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            return self._features(self.model.get_image_features(pixel_values=pixels.to(self.device)))

    def score(self, image: np.ndarray, text: str) -> float | None:
        if not text or not text.strip():
            return None
        cos = float((self.image_embedding(image) * self.text_embedding(text)).sum())
        return 100.0 * max(cos, 0.0)


def clip_model(path: str, device: str = "auto") -> ClipScorer:
    def make():
        from pathlib import Path

        from miscnet.core.pretrained import load_error, quiet_loading

        folder = Path(path)
        if not folder.is_dir():
            raise MiscError(f"CLIP weights {folder}: not a folder (MISCNET_CLIP_WEIGHTS names a transformers CLIP "
                            "folder: config.json, model.safetensors, tokenizer, preprocessor_config.json)")
        import torch
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        with quiet_loading():
            try:
                model = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
                tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
                processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
            except Exception as e:  # many exception types mean "this folder does not load"
                raise load_error("CLIP-score", folder, e) from None
        vocab = model.config.text_config.vocab_size
        if not 2 < len(tokenizer) <= vocab:
            raise MiscError(f"CLIP weights {folder}: its tokenizer has {len(tokenizer)} tokens but the text model "
                            f"expects {vocab} (a missing or broken tokenizer)")
        dev = _device(device)
        return ClipScorer(model.to(dev).eval(), tokenizer, processor, dev)

    return _cached(("clip", path, device), make)


def _rgb(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- measuring

def _pair_tensors(reference, reconstruction, device):
    from miscnet.experiments.learned_nets import to_tensor

    a, b = _rgb(reference), _rgb(reconstruction)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return to_tensor(a, device), to_tensor(b, device)


def _full_reference(model, reference, reconstruction) -> float | None:
    """A full-reference network's score of a pair (LPIPS, DISTS); None below MIN_SIDE px on a side."""
    import torch

    from miscnet.experiments.learned_nets import MIN_SIDE

    if min(np.asarray(reference).shape[:2]) < MIN_SIDE:
        return None
    x, y = _pair_tensors(reference, reconstruction, next(model.parameters()).device)
    with torch.inference_mode():
        return float(model(x, y)[0])


def lpips(reference, reconstruction, heads: str, backbone: str, device: str = "auto") -> float | None:
    """LPIPS v0.1 of ``reconstruction`` against ``reference`` (uint8); None below 32 px on a side."""
    return _full_reference(lpips_model(heads, backbone, device), reference, reconstruction)


def dists(reference, reconstruction, weights: str, backbone: str, device: str = "auto") -> float | None:
    """DISTS of ``reconstruction`` against ``reference`` (uint8); None below 32 px on a side."""
    return _full_reference(dists_model(weights, backbone, device), reference, reconstruction)


def inception_features(images, path: str, device: str = "auto") -> np.ndarray:
    """(N, 2048) float64 pool3 features of uint8 images (any sizes)."""
    import torch

    from miscnet.experiments.learned_nets import to_tensor

    model = inception_model(path, device)
    dev = next(model.parameters()).device
    rows = []
    with torch.inference_mode():
        for image in images:  # one at a time: the images of a set can differ in size
            rows.append(model(to_tensor(_rgb(image), dev))[0].double().cpu().numpy())
    return np.stack(rows) if rows else np.zeros((0, FEATURE_DIMS))


def clip_score(image, caption: str, path: str, device: str = "auto") -> float | None:
    """CLIP-score of ``image`` against ``caption``: 100 * max(cosine, 0); None without a caption."""
    return clip_model(path, device).score(image, caption)


class LearnedMeter:
    """Measures reconstructions with the metrics ``weights`` configure (what a sweep's prepare task uses)."""

    def __init__(self, weights: LearnedWeights) -> None:
        self.weights = weights

    def measure(self, reference, image, caption: str | None) -> dict[str, float | None]:
        """{metric: value} for the per-image metrics configured (LearnedWeights.metrics())."""
        w = self.weights
        out: dict[str, float | None] = {}
        if w.lpips:
            out["lpips"] = lpips(reference, image, *w.lpips, device=w.device)
        if w.dists:
            out["dists"] = dists(reference, image, *w.dists, device=w.device)
        if w.clip:
            out["clip_score"] = clip_score(image, caption or "", w.clip, w.device)
        return out

    def features(self, image) -> np.ndarray | None:
        """The image's (2048,) InceptionV3 features (float32, what FID/KID use later), or None."""
        if not self.weights.inception:
            return None
        return inception_features([image], self.weights.inception, self.weights.device)[0].astype(np.float32)


# ---------------------------------------------------------------------------------------------- set metrics

def _features_2d(f, name: str) -> np.ndarray:
    a = np.asarray(f, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected (N, D) features, got shape {a.shape}")
    return a


def fid(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (N >= 2 each).

    Tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of S1 S2, which are those of
    (A B^T)(A B^T)^T / ((n1-1)(n2-1)) for the centred features A, B: the nuclear norm of A B^T when the
    sets are smaller than D, else from the D x D symmetric S1^1/2 S2 S1^1/2 (no non-symmetric sqrtm).
    """
    x, y = _features_2d(features_a, "features_a"), _features_2d(features_b, "features_b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {len(x)} and {len(y)}")
    n1, n2, d = len(x), len(y), x.shape[1]
    a, b = x - x.mean(0), y - y.mean(0)
    diff = x.mean(0) - y.mean(0)
    tr1, tr2 = float((a * a).sum()) / (n1 - 1), float((b * b).sum()) / (n2 - 1)
    if max(n1, n2) <= d:
        tr_root = float(np.linalg.svd(a @ b.T, compute_uv=False).sum()) / np.sqrt((n1 - 1) * (n2 - 1))
    else:
        s1, s2 = a.T @ a / (n1 - 1), b.T @ b / (n2 - 1)
        vals, vecs = np.linalg.eigh(s1)
        root1 = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
        tr_root = float(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum())
    return max(float(diff @ diff) + tr1 + tr2 - 2 * tr_root, 0.0)  # >= 0; rounding can dip below


def kid(features_a, features_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over ``subsets`` random subsets of the unbiased polynomial-kernel MMD^2 (Binkowski et al.):
    k(x, y) = (x.y / d + 1)^3, subsets of min(subset_size, n1, n2) drawn without replacement (seeded)."""
    x, y = _features_2d(features_a, "features_a"), _features_2d(features_b, "features_b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        xs = x[rng.choice(len(x), m, replace=False)]
        ys = y[rng.choice(len(y), m, replace=False)]
        kxx = (xs @ xs.T / d + 1) ** 3
        kyy = (ys @ ys.T / d + 1) ** 3
        kxy = (xs @ ys.T / d + 1) ** 3
        values[i] = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                     - 2 * kxy.sum() / (m * m))
    return float(values.mean()), float(values.std())


def set_note(n_reconstructions: int, n_references: int) -> str | None:
    """Why an FID/KID over sets this small means little, or None when the sets are large enough."""
    n = min(n_reconstructions, n_references)
    if n < 2:
        return f"not computed: {n} image(s) in the set, at least 2 needed"
    if n < FEATURE_DIMS:
        return (f"{n} images, fewer than the {FEATURE_DIMS} feature dimensions: the covariances are rank-deficient, "
                "so compare settings on the same images only, not with published FIDs")
    return None


def set_metrics(reconstructions: np.ndarray, references: np.ndarray, seed: int = 0) -> dict[str, float | None]:
    """FID, KID (mean, std) and the set sizes of two feature sets; None where a set is under 2 images."""
    out: dict[str, float | None] = {"fid": None, "kid": None, "kid_std": None,
                                    "n_reconstructions": len(reconstructions), "n_references": len(references)}
    if min(len(reconstructions), len(references)) >= 2:
        out["fid"] = fid(reconstructions, references)
        out["kid"], out["kid_std"] = kid(reconstructions, references, seed=seed)
    return out

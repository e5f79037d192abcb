"""Full-reference quality metrics, none with learned weights: PSNR, SSIM and MS-SSIM (here, numpy + scipy),
SSIMULACRA2 (the ``ssimulacra2`` package) and FLIP (``flip-evaluator``, NVIDIA's own implementation).

All take two arrays of the same shape, HxWx3 (RGB) or HxW (grey), normally uint8 with ``data_range``
255; a shape mismatch raises ValueError. Arithmetic is float64. ``quality_report`` gives every metric
reported beside a stage (QUALITY_METRICS); ``learned_metrics_status`` says, for LPIPS, DISTS, FID/KID and
CLIP-score, whether each is computed or why it is skipped: their weights are never downloaded and count
only when configured by environment variable (experiments/learned_metrics.py, which defines them):

- ``MISCNET_LPIPS_WEIGHTS`` + ``MISCNET_LPIPS_BACKBONE``: lpips' v0.1 alex.pth / vgg.pth heads and
  torchvision's AlexNet / VGG16 state dict (alexnet-owt-7be5be79.pth, vgg16-397923af.pth);
- ``MISCNET_DISTS_WEIGHTS`` + ``MISCNET_DISTS_BACKBONE``: DISTS_pytorch's weights.pt and torchvision's VGG16;
- ``MISCNET_INCEPTION_WEIGHTS``: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (FID and KID, set metrics);
- ``MISCNET_CLIP_WEIGHTS``: a transformers CLIP folder (CLIP-score against the semantic layer's caption);
- ``MISCNET_METRICS_DEVICE``: auto (default), cpu or cuda.

Definitions
-----------
PSNR
    ``10 * log10(data_range**2 / MSE)`` with the MSE averaged jointly over every pixel and channel
    (one number for RGB, not a mean of per-channel PSNRs); ``inf`` when the images are identical.

SSIM (Wang, Bovik, Sheikh, Simoncelli 2004)
    Local statistics are taken with an 11-tap Gaussian window (sigma 1.5, weights normalised to sum
    to 1), applied separably with *valid* filtering (no padding: the SSIM map is (H-10)x(W-10)).
    With mu, sigma^2 the windowed means/variances (population form, E[x^2] - mu^2) and sigma_xy the
    windowed covariance, C1 = (0.01 * L)^2, C2 = (0.03 * L)^2, L = data_range::

        cs   = (2 sigma_xy + C2) / (sigma_x^2 + sigma_y^2 + C2)
        ssim = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) * cs

    The map is averaged per channel, then the channels are averaged with equal weight. This equals
    ``skimage.metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255)``: skimage filters with reflect padding and then crops
    5 pixels from each border, which leaves exactly the valid region.

MS-SSIM (Wang, Simoncelli, Bovik 2003), the "ms-ssim-rgb" CompressAI reports via pytorch_msssim
    Five scales with weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333). At scales 1..4 the mean of the
    cs map is kept; between scales both images are 2x2 average-pooled, and a side of odd length is
    first padded with one zero on each side and pooled with the zeros counted (torch's
    ``avg_pool2d(kernel_size=2, padding=side % 2)``). At scale 5 the mean full SSIM is kept. Each value is
    clipped at 0 (relu) and the result is ``prod(value_i ** weight_i)``, per channel, then averaged
    over the channels.

Small images
    Five scales need the short side to be at least 161 px (so that the fifth scale still holds an
    11-px window); pytorch_msssim refuses smaller images. Here MS-SSIM instead uses the largest
    number of scales n (1..5) whose coarsest scale still fits the window, and the first n weights
    renormalised to sum to 1 (at 5 scales the published weights are used unchanged). If the short
    side is below 11 px, SSIM and MS-SSIM shrink the window to the largest odd size that fits (the
    same sigma-1.5 Gaussian, truncated and renormalised), down to a single pixel. Empty images raise
    ValueError. From 161 px up the values equal pytorch_msssim's ``ms_ssim(X, Y, data_range=255)``
    (tests/test_samples_metrics.py checks it on the bundled samples); below, they are this module's own.

SSIMULACRA2 (Cloudinary / JPEG XL, 2022)
    ``ssimulacra2.compute_ssimulacra2`` on the two images (RGB, sRGB); 100 is identical, about 90 is
    visually lossless, 70 high quality, 50 medium, 30 low; it can go negative. Grey images are given as
    RGB. Images under 8 px on a side have no scale to measure: None.

FLIP (Andersson et al. 2020, LDR-FLIP)
    The mean of ``flip_evaluator.evaluate(ref, test, "LDR")``'s error map at its default viewing
    conditions (67 pixels per degree); 0 is identical, 1 is the largest error. Lower is better.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from miscnet.experiments import learned_metrics as _learned

__all__ = ["MS_SSIM_WEIGHTS", "QUALITY_METRICS", "flip", "learned_metrics_status", "ms_ssim", "psnr", "quality",
           "quality_report", "ssim", "ssimulacra2"]

# Reported beside every stage (simulate, sweeps, fleets, the demo, the live view), in this order.
QUALITY_METRICS = ("psnr", "ms_ssim", "ssimulacra2", "flip")
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WIN_SIZE = 11
SIGMA = 1.5
K1 = 0.01
K2 = 0.03


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes and return float64 CxHxW copies (C=1 for grey)."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"expected HxW or HxWxC images, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"empty image: shape {a.shape}")
    if a.ndim == 2:
        a, b = a[None], b[None]
    else:
        # Channels first: each image row is then a contiguous line for ndimage, about 2x faster.
        a, b = a.transpose(2, 0, 1), b.transpose(2, 0, 1)
    return np.ascontiguousarray(a, dtype=np.float64), np.ascontiguousarray(b, dtype=np.float64)


def _window(size: int) -> np.ndarray:
    r = size // 2
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-(x**2) / (2 * SIGMA**2))
    return w / w.sum()


def _valid_filter(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation over the last two axes (the window is symmetric: = convolution)."""
    r = len(w) // 2
    # correlate1d pads internally; cropping r on each side keeps only outputs that never saw padding.
    # Cropping after the first pass saves the second pass the columns that would be discarded anyway.
    y = ndimage.correlate1d(x, w, axis=2, mode="constant")
    if r:
        y = y[:, :, r:-r]
    y = ndimage.correlate1d(y, w, axis=1, mode="constant")
    if r:
        y = y[:, r:-r]
    return y


def _ssim_cs(a: np.ndarray, b: np.ndarray, data_range: float, win: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean SSIM and mean cs for CxHxW float arrays, both shape (C,)."""
    w = _window(win)
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    c = a.shape[0]
    # SSIM only needs var_x + var_y, so E[x^2 + y^2] is filtered as one map: 4 maps instead of 5,
    # all channels in one call.
    f = _valid_filter(np.concatenate([a, b, a * a + b * b, a * b]), w)
    mx, my, e2, exy = f[:c], f[c : 2 * c], f[2 * c : 3 * c], f[3 * c :]
    mxy = mx * my
    m2 = mx * mx + my * my
    cs_map = (2 * (exy - mxy) + c2) / (e2 - m2 + c2)
    ssim_map = (2 * mxy + c1) / (m2 + c1) * cs_map
    return ssim_map.mean(axis=(1, 2)), cs_map.mean(axis=(1, 2))


def _win_for(h: int, w: int) -> int:
    side = min(h, w, WIN_SIZE)
    return side if side % 2 else side - 1


def _pool(x: np.ndarray) -> np.ndarray:
    """2x2 average pooling of CxHxW as torch's avg_pool2d(kernel 2, padding=side % 2, count_include_pad)."""
    ph, pw = x.shape[1] % 2, x.shape[2] % 2
    if ph or pw:
        x = np.pad(x, ((0, 0), (ph, ph), (pw, pw)))
    # With padding on both sides of an odd side the trailing zero falls outside the last full window.
    h2, w2 = x.shape[1] // 2, x.shape[2] // 2
    x = x[:, : 2 * h2, : 2 * w2]
    return 0.25 * (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2])


def _pooled_size(n: int) -> int:
    return n // 2 + n % 2


def _n_scales(h: int, w: int) -> int:
    """Largest number of scales (<= 5) whose coarsest scale still holds an 11-px window."""
    n = 1
    while n < len(MS_SSIM_WEIGHTS):
        h, w = _pooled_size(h), _pooled_size(w)
        if min(h, w) < WIN_SIZE:
            break
        n += 1
    return n


def psnr(a, b, data_range: float = 255) -> float:
    """PSNR in dB over all pixels and channels jointly; inf for identical images."""
    x, y = _pair(a, b)
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def ssim(a, b, data_range: float = 255) -> float:
    """Mean SSIM (Gaussian 11 / sigma 1.5, valid region), averaged over channels."""
    x, y = _pair(a, b)
    s, _ = _ssim_cs(x, y, data_range, _win_for(*x.shape[1:]))
    return float(s.mean())


def ms_ssim(a, b, data_range: float = 255) -> float:
    """MS-SSIM with pytorch_msssim's conventions, per channel then averaged; see the module docstring."""
    x, y = _pair(a, b)
    n = _n_scales(*x.shape[1:])
    weights = np.asarray(MS_SSIM_WEIGHTS[:n])
    if n < len(MS_SSIM_WEIGHTS):
        weights = weights / weights.sum()
    values = []
    for i in range(n):
        s, cs = _ssim_cs(x, y, data_range, _win_for(*x.shape[1:]))
        if i < n - 1:
            values.append(np.maximum(cs, 0.0))
            x, y = _pool(x), _pool(y)
        else:
            values.append(np.maximum(s, 0.0))
    per_channel = np.prod(np.stack(values) ** weights[:, None], axis=0)
    return float(per_channel.mean())


def _rgb_uint8(a) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a, dtype=np.uint8)


def ssimulacra2(a, b) -> float | None:
    """SSIMULACRA2 score of ``b`` against the reference ``a`` (uint8); None below 8 px on a side."""
    import io

    from PIL import Image
    from ssimulacra2 import compute_ssimulacra2

    x, y = _rgb_uint8(a), _rgb_uint8(b)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {x.shape} vs {y.shape}")
    if min(x.shape[:2]) < 8:
        return None
    files = []
    for image in (x, y):  # the package reads files: hand it in-memory PNGs (lossless)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", compress_level=0)
        buf.seek(0)
        files.append(buf)
    return float(compute_ssimulacra2(*files))


def flip(a, b) -> float:
    """Mean LDR-FLIP error of ``b`` against the reference ``a`` (uint8, sRGB); 0 is identical."""
    import flip_evaluator

    x, y = _rgb_uint8(a), _rgb_uint8(b)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {x.shape} vs {y.shape}")
    _, mean, _ = flip_evaluator.evaluate((x / 255.0).astype(np.float32), (y / 255.0).astype(np.float32), "LDR",
                                         applyMagma=False)
    return float(mean)


def quality(reference, reconstruction) -> dict[str, float]:
    """PSNR, SSIM and MS-SSIM of a reconstruction against its reference (uint8, range 255)."""
    return {
        "psnr": psnr(reference, reconstruction),
        "ssim": ssim(reference, reconstruction),
        "ms_ssim": ms_ssim(reference, reconstruction),
    }


def quality_report(reference, reconstruction, metrics: tuple[str, ...] = QUALITY_METRICS) -> dict[str, float | None]:
    """The named metrics (default QUALITY_METRICS) of a reconstruction against its reference."""
    functions = {"psnr": psnr, "ssim": ssim, "ms_ssim": ms_ssim, "ssimulacra2": ssimulacra2, "flip": flip}
    unknown = [m for m in metrics if m not in functions]
    if unknown:
        raise ValueError(f"unknown quality metric(s) {unknown}; known: {sorted(functions)}")
    return {m: functions[m](reference, reconstruction) for m in metrics}


# Learned metrics (LPIPS, DISTS, FID, KID, CLIP-score) live in experiments/learned_metrics.py: computed only
# from weights already on this machine, named by the environment variables of LEARNED_METRICS.
LEARNED_METRICS = _learned.LEARNED_METRICS


def learned_metrics_status(environ=None, load: bool = True) -> dict[str, str]:
    """{metric: "computed" or "skipped: <why>"} for LPIPS, DISTS, FID, KID and CLIP-score.

    ``environ`` (default os.environ) holds the variables of LEARNED_METRICS; with ``load`` each configured
    model is loaded once to check it (a missing or malformed file is skipped, with the path and the reason).
    """
    return _learned.resolve(environ, load=load)[1]

"""``net``: MISC's learned pixel mode, a cheng2020-anchor codec whose bits are entropy coded for real.

The model is Cheng et al. 2020's anchor variant (residual blocks, sub-pixel convolutions, a hyperprior
with a 5x5 masked-convolution context model and Gaussian conditionals) in plain torch, with CompressAI's
module layout, so CompressAI state dicts (``.pth.tar`` / ``.pth`` through ``torch.load(weights_only=True)``,
or ``.safetensors``) load by key. CompressAI itself is not used (it breaks beside our torch pin) and its
entropy coder tables (``_quantized_cdf`` and friends) are not read: this module builds its own models
from the weights, so the bitstream is this project's, not CompressAI's.

Bitstream of one level (the raster is PixelParams width x height, padded to a multiple of 64 inside):

    check (2 bytes) | one range-coder stream (constriction ``RangeEncoder``, 32-bit words, little-endian,
                      trailing zero bytes of the last word dropped)

The stream holds z first (the factorised prior: one learned categorical per channel over the integers
within the model's quantiles around its median, channel by channel in raster order), then y position by
position in raster order, all channels of a position together, each a zero-mean quantised Gaussian of the
scale-table std (64 scales, CompressAI's table) chosen from the hyperprior and the context, coding
``round(y - mean)`` (ŷ = symbol + mean). Latent shapes follow from the raster and are never sent. The
check is BLAKE2s (16 bits) keyed with the weights' digest over every symbol: a payload corrupted, cut, or
decoded with other weights than it was coded with fails with one line instead of painting noise.

Limits (documented, deliberate):

* symbols out of range are clamped, not escape coded: z to the model's quantile range, y to +-Y_RANGE
  (the encoder reconstructs from the clamped values, so both ends agree);
* the context model's decode repeats the encoder's ops in the same order on the same tensors (one
  shared loop), so decoding is bit-exact on the same torch build and CPU; across machines float results
  may differ and the check turns that into an error, not a wrong picture;
* the work a level can ask for is bounded: raster sides up to NET_MAX_RASTER and at most
  MAX_POSITIONS_PER_BYTE latent positions per payload byte.

torch, safetensors and constriction are imported only when a ``net`` level is coded or decoded, so the
core install runs without them and ``--pixel net`` then says which extra to install.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from miscnet.core.errors import BitstreamError, MiscError
from miscnet.core.pixel.base import PixelCodec, PixelLevel, PixelSettings, Scratch, register
from miscnet.core.pixel.imaging import DOWN_FILTER
from miscnet.v1 import bitstream_pb2 as pb

NET_MODEL_ENV = "MISCNET_NET_MODEL"
MODELS_DIR_ENV = "MISCNET_MODELS_DIR"  # $MISCNET_MODELS_DIR/net holds the weights (miscnet models tiny writes it)
WEIGHT_SUFFIXES = (".safetensors", ".pth.tar", ".pth", ".pt")
NET_MAX_RASTER = 1024  # raster side: at most 64 x 64 latent positions, each one step of the context loop
MAX_POSITIONS_PER_BYTE = 64  # y positions a level may ask to decode per payload byte
CHECK_BYTES = 2
Y_RANGE = 4096  # |round(y - mean)| is clamped to this
STRIDE = 64  # g_a and h_a downsample 16 x 4
KERNEL, PAD = 5, 2  # the context model's masked convolution
SCALES = (0.11, 256.0, 64)  # CompressAI's scale table: 64 log-spaced stds from 0.11 to 256
EXTRA = "pip install 'miscnet[models]'"

_configured: str | None = None  # --net-model, set by the CLI


def use_model(path: str | os.PathLike[str] | None) -> None:
    """Make ``path`` the weights every ``net`` level is coded and decoded with (None: environment)."""
    global _configured
    _configured = None if path is None else str(path)


def model_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The weights file: ``path``, else --net-model, else $MISCNET_NET_MODEL, else $MISCNET_MODELS_DIR/net.
    A folder must hold exactly one weights file. Missing: one MiscError line naming the path tried."""
    value = path if path is not None else _configured or os.environ.get(NET_MODEL_ENV)
    if value is None and os.environ.get(MODELS_DIR_ENV):
        value = Path(os.environ[MODELS_DIR_ENV]) / "net"
    if value is None:
        raise MiscError(f"net pixel codec: no weights configured (give --net-model PATH or set {NET_MODEL_ENV})")
    p = Path(value).expanduser()
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
        if len(found) != 1:
            raise MiscError(f"net pixel codec: {p} holds {len(found)} weights files "
                            f"({', '.join(WEIGHT_SUFFIXES)}); name one")
        p = found[0]
    if not p.is_file():
        raise MiscError(f"net pixel codec: no weights at {p} (give --net-model PATH or set {NET_MODEL_ENV})")
    return p


def require_stack():
    """(torch, constriction), or a one-line MiscError naming the extra."""
    try:
        import constriction
        import torch
    except ImportError:
        raise MiscError(f"the net pixel codec needs torch and constriction: {EXTRA}") from None
    return torch, constriction


# ============================================================================ the model (CompressAI's layout)

_MODULES: dict | None = None


def _modules() -> dict:
    """The torch module classes, built on first use (torch is imported here, not at import time)."""
    global _MODULES
    if _MODULES is not None:
        return _MODULES
    torch, _ = require_stack()
    from torch import nn
    from torch.nn import functional as F

    class LowerBound(nn.Module):
        def __init__(self, bound: float) -> None:
            super().__init__()
            self.register_buffer("bound", torch.Tensor([float(bound)]))

        def forward(self, x):
            return torch.max(x, self.bound)

    class NonNegativeParametrizer(nn.Module):
        def __init__(self, minimum: float = 0.0, reparam_offset: float = 2**-18) -> None:
            super().__init__()
            self.register_buffer("pedestal", torch.Tensor([reparam_offset**2]))
            self.lower_bound = LowerBound((minimum + reparam_offset**2) ** 0.5)

        def forward(self, x):
            return self.lower_bound(x) ** 2 - self.pedestal

    class GDN(nn.Module):
        def __init__(self, channels: int, inverse: bool = False) -> None:
            super().__init__()
            self.inverse = inverse
            self.beta_reparam = NonNegativeParametrizer(minimum=1e-6)
            self.beta = nn.Parameter(torch.sqrt(torch.ones(channels) + self.beta_reparam.pedestal))
            self.gamma_reparam = NonNegativeParametrizer()
            self.gamma = nn.Parameter(torch.sqrt(0.1 * torch.eye(channels) + self.gamma_reparam.pedestal))

        def forward(self, x):
            c = x.shape[1]
            norm = F.conv2d(x**2, self.gamma_reparam(self.gamma).reshape(c, c, 1, 1), self.beta_reparam(self.beta))
            return x * (torch.sqrt(norm) if self.inverse else torch.rsqrt(norm))

    def conv3x3(i: int, o: int, stride: int = 1):
        return nn.Conv2d(i, o, 3, stride=stride, padding=1)

    def subpel_conv3x3(i: int, o: int, r: int):
        return nn.Sequential(nn.Conv2d(i, o * r * r, 3, padding=1), nn.PixelShuffle(r))

    def leaky():
        return nn.LeakyReLU()

    class ResidualBlockWithStride(nn.Module):
        def __init__(self, i: int, o: int, stride: int = 2) -> None:
            super().__init__()
            self.conv1, self.leaky_relu, self.conv2 = conv3x3(i, o, stride), leaky(), conv3x3(o, o)
            self.gdn = GDN(o)
            self.skip = nn.Conv2d(i, o, 1, stride=stride) if stride != 1 or i != o else None

        def forward(self, x):
            out = self.gdn(self.conv2(self.leaky_relu(self.conv1(x))))
            return out + (x if self.skip is None else self.skip(x))

    class ResidualBlockUpsample(nn.Module):
        def __init__(self, i: int, o: int, r: int = 2) -> None:
            super().__init__()
            self.subpel_conv, self.leaky_relu, self.conv = subpel_conv3x3(i, o, r), leaky(), conv3x3(o, o)
            self.igdn = GDN(o, inverse=True)
            self.upsample = subpel_conv3x3(i, o, r)

        def forward(self, x):
            return self.igdn(self.conv(self.leaky_relu(self.subpel_conv(x)))) + self.upsample(x)

    class ResidualBlock(nn.Module):
        def __init__(self, i: int, o: int) -> None:
            super().__init__()
            self.conv1, self.leaky_relu, self.conv2 = conv3x3(i, o), leaky(), conv3x3(o, o)
            self.skip = nn.Conv2d(i, o, 1) if i != o else None

        def forward(self, x):
            out = self.leaky_relu(self.conv2(self.leaky_relu(self.conv1(x))))
            return out + (x if self.skip is None else self.skip(x))

    class MaskedConv2d(nn.Conv2d):
        """Type-A mask: a position sees the rows above and the positions to its left only."""

        def __init__(self, i: int, o: int) -> None:
            super().__init__(i, o, KERNEL, padding=PAD)
            mask = torch.ones_like(self.weight.data)
            mask[:, :, KERNEL // 2, KERNEL // 2:] = 0
            mask[:, :, KERNEL // 2 + 1:] = 0
            self.register_buffer("mask", mask)

        def forward(self, x):
            return F.conv2d(x, self.weight * self.mask, self.bias, padding=PAD)

    class EntropyBottleneck(nn.Module):
        """The factorised prior of z (Ballé et al. 2018): a small per-channel monotone MLP of the CDF."""

        def __init__(self, channels: int, filters=(3, 3, 3, 3), init_scale: float = 10.0) -> None:
            super().__init__()
            dims = (1, *filters, 1)
            scale = init_scale ** (1 / (len(filters) + 1))
            self.filters = tuple(filters)
            self.matrices, self.biases, self.factors = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
            for k in range(len(filters) + 1):
                init = float(np.log(np.expm1(1 / scale / dims[k + 1])))
                self.matrices.append(nn.Parameter(torch.full((channels, dims[k + 1], dims[k]), init)))
                self.biases.append(nn.Parameter(torch.rand(channels, dims[k + 1], 1) - 0.5))
                if k < len(filters):
                    self.factors.append(nn.Parameter(torch.zeros(channels, dims[k + 1], 1)))
            self.quantiles = nn.Parameter(torch.Tensor([-init_scale, 0, init_scale]).repeat(channels, 1, 1))
            target = float(np.log(2 / 1e-9 - 1))
            self.register_buffer("target", torch.Tensor([-target, 0, target]))
            self.likelihood_lower_bound = LowerBound(1e-9)

        def logits_cumulative(self, x):
            for k in range(len(self.filters) + 1):
                x = torch.matmul(F.softplus(self.matrices[k].double()), x) + self.biases[k].double()
                if k < len(self.filters):
                    x = x + torch.tanh(self.factors[k].double()) * torch.tanh(x)
            return x

    class GaussianConditional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale_bound", torch.Tensor([SCALES[0]]))
            self.likelihood_lower_bound = LowerBound(1e-9)
            self.lower_bound_scale = LowerBound(SCALES[0])

    class Cheng2020Anchor(nn.Module):
        def __init__(self, N: int) -> None:
            super().__init__()
            M = N  # the anchor model has one width
            self.N = self.M = N
            self.entropy_bottleneck = EntropyBottleneck(N)
            self.g_a = nn.Sequential(
                ResidualBlockWithStride(3, N), ResidualBlock(N, N), ResidualBlockWithStride(N, N),
                ResidualBlock(N, N), ResidualBlockWithStride(N, N), ResidualBlock(N, N), conv3x3(N, N, 2))
            self.h_a = nn.Sequential(
                conv3x3(N, N), leaky(), conv3x3(N, N), leaky(), conv3x3(N, N, 2), leaky(), conv3x3(N, N), leaky(),
                conv3x3(N, N, 2))
            self.h_s = nn.Sequential(
                conv3x3(N, N), leaky(), subpel_conv3x3(N, N, 2), leaky(), conv3x3(N, N * 3 // 2), leaky(),
                subpel_conv3x3(N * 3 // 2, N * 3 // 2, 2), leaky(), conv3x3(N * 3 // 2, N * 2))
            self.g_s = nn.Sequential(
                ResidualBlock(N, N), ResidualBlockUpsample(N, N), ResidualBlock(N, N), ResidualBlockUpsample(N, N),
                ResidualBlock(N, N), ResidualBlockUpsample(N, N), ResidualBlock(N, N), subpel_conv3x3(N, 3, 2))
            self.entropy_parameters = nn.Sequential(
                nn.Conv2d(M * 12 // 3, M * 10 // 3, 1), leaky(), nn.Conv2d(M * 10 // 3, M * 8 // 3, 1), leaky(),
                nn.Conv2d(M * 8 // 3, M * 6 // 3, 1))
            self.context_prediction = MaskedConv2d(M, 2 * M)
            self.gaussian_conditional = GaussianConditional()

    _MODULES = {"Cheng2020Anchor": Cheng2020Anchor}
    return _MODULES


# CompressAI state dict entries that are its own coder's tables: rebuilt here from the weights, not read.
_CODER_TABLES = ("entropy_bottleneck._offset", "entropy_bottleneck._quantized_cdf", "entropy_bottleneck._cdf_length",
                 "gaussian_conditional._offset", "gaussian_conditional._quantized_cdf",
                 "gaussian_conditional._cdf_length", "gaussian_conditional.scale_table")
_OLD_EB = {"_matrix": "matrices", "_bias": "biases", "_factor": "factors"}


def compressai_key(key: str) -> str:
    """A key as today's CompressAI names it: DataParallel's ``module.`` dropped, ``downsample`` -> ``skip``,
    the entropy bottleneck's old ``_matrix0`` / ``_bias0`` / ``_factor0`` -> ``matrices.0`` / ...
    (the zoo's released checkpoints use the old names)."""
    key = key.removeprefix("module.").replace(".downsample.", ".skip.")
    head = "entropy_bottleneck."
    if key.startswith(head):
        rest = key[len(head):]
        for old, new in _OLD_EB.items():
            if rest.startswith(old) and rest[len(old):].isdigit():
                return f"{head}{new}.{rest[len(old):]}"
    return key


def read_state_dict(path: Path) -> dict:
    """Tensors of a weights file: safetensors, else torch.load(weights_only=True); a training checkpoint's
    ``state_dict`` entry is used when present."""
    torch, _ = require_stack()
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: one line, never a traceback
        raise MiscError(f"net pixel codec: cannot read weights {path}: {str(exc).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MiscError(f"net pixel codec: {path} is not a state dict of tensors")
    return state


def model_from_state_dict(state: dict, where: str = "state dict"):
    """A Cheng2020Anchor with these weights (CompressAI key names); MiscError naming a wrong key."""
    torch, _ = require_stack()
    state = {compressai_key(k): v for k, v in state.items()}
    first = state.get("g_a.0.conv1.weight")
    if first is None or first.ndim != 4:
        raise MiscError(f"net pixel codec: {where} is not a cheng2020-anchor model (no g_a.0.conv1.weight)")
    n = int(first.shape[0])
    if not 1 <= n <= 1024:
        raise MiscError(f"net pixel codec: {where}: width {n} is outside 1..1024")
    model = _modules()["Cheng2020Anchor"](n)
    weights = {k: v for k, v in state.items() if k not in _CODER_TABLES}
    mine = model.state_dict()
    missing = [k for k in mine if k not in weights]
    unexpected = [k for k in weights if k not in mine]
    if missing or unexpected:
        what = f"missing key {missing[0]}" if missing else f"unexpected key {unexpected[0]}"
        raise MiscError(f"net pixel codec: {where} is not a cheng2020-anchor state dict ({what}; "
                        f"{len(missing)} missing, {len(unexpected)} unexpected)")
    bad = next((k for k in mine if tuple(weights[k].shape) != tuple(mine[k].shape)), None)
    if bad is not None:
        raise MiscError(f"net pixel codec: {where}: {bad} has shape {tuple(weights[bad].shape)}, "
                        f"expected {tuple(mine[bad].shape)} for width {n}")
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    model.eval()
    h = hashlib.sha256()
    for k in sorted(mine):
        h.update(k.encode() + b"\0" + weights[k].float().contiguous().numpy().tobytes())
    model.digest = h.digest()  # keys the check: other weights fail to decode
    return model


_LOADED: dict[tuple[str, int, int], object] = {}


def load_model(path: str | os.PathLike[str] | None = None):
    """The model of ``model_path(path)``, loaded once per file version."""
    require_stack()  # the missing extra first: no weights file helps without it
    p = model_path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _LOADED:
        state = read_state_dict(p)
        _LOADED.clear()
        _LOADED[key] = model_from_state_dict(state, str(p))
    return _LOADED[key]


# ============================================================================ entropy models


def scale_table() -> np.ndarray:
    lo, hi, n = SCALES
    return np.exp(np.linspace(np.log(lo), np.log(hi), n)).astype(np.float32)


def _z_tables(model) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(medians float32, lowest and highest symbol per channel, probabilities (C, L) float64) of z."""
    torch, _ = require_stack()
    eb = model.entropy_bottleneck
    with torch.no_grad():
        q = eb.quantiles.detach()[:, 0, :].double()
        medians = q[:, 1]
        low = torch.clamp(torch.ceil(medians - q[:, 0]), 0, 255).to(torch.int64)
        high = torch.clamp(torch.ceil(q[:, 2] - medians), 0, 255).to(torch.int64)
        length = int((low + high + 1).max())
        offsets = torch.arange(length, dtype=torch.float64)[None, :] - low[:, None].double()
        samples = (offsets + medians[:, None])[:, None, :]  # (C, 1, L)
        upper = torch.sigmoid(eb.logits_cumulative(samples + 0.5))
        lower = torch.sigmoid(eb.logits_cumulative(samples - 0.5))
        pmf = (upper - lower)[:, 0, :].clamp_min(0)
        inside = offsets <= high[:, None].double()
        pmf = torch.where(inside, pmf, torch.zeros_like(pmf))
    return (eb.quantiles.detach()[:, 0, 1].float().numpy(), (-low).numpy(), high.numpy(), pmf.numpy())


class _Latents:
    """What one level codes: z and y symbols, their models, and the reconstruction."""

    def __init__(self) -> None:
        self.z_symbols = self.z_probs = self.y_symbols = self.y_stds = self.x_hat = None


def _ar_loop(model, params, y_height: int, y_width: int, symbols_at):
    """The context model's raster-order loop, shared by encoder and decoder so both run the very same
    float ops: ``symbols_at(h, w, stds, means)`` returns the position's integer symbols (the encoder
    quantises y, the decoder reads the stream); ŷ = symbol + mean is written back for the next positions."""
    torch, _ = require_stack()
    m = model.M
    table = torch.from_numpy(scale_table())
    table_np = scale_table().astype(np.float64)
    weight = model.context_prediction.weight * model.context_prediction.mask
    bias = model.context_prediction.bias
    y_hat = torch.zeros((1, m, y_height + 2 * PAD, y_width + 2 * PAD))
    all_symbols = np.zeros((y_height, y_width, m), np.int32)
    all_stds = np.zeros((y_height, y_width, m), np.float64)
    for h in range(y_height):
        for w in range(y_width):
            crop = y_hat[:, :, h:h + KERNEL, w:w + KERNEL]
            ctx = torch.nn.functional.conv2d(crop, weight, bias)
            gp = model.entropy_parameters(torch.cat((params[:, :, h:h + 1, w:w + 1], ctx), dim=1))[0, :, 0, 0]
            scales, means = gp[:m], gp[m:]
            index = torch.searchsorted(table[:-1].contiguous(), torch.clamp(scales, min=SCALES[0]).contiguous())
            stds = table_np[index.numpy()]
            symbols = symbols_at(h, w, stds, means)
            y_hat[0, :, h + PAD, w + PAD] = torch.from_numpy(symbols.astype(np.float32)) + means
            all_symbols[h, w], all_stds[h, w] = symbols, stds
    return y_hat[:, :, PAD:PAD + y_height, PAD:PAD + y_width], all_symbols, all_stds


@contextlib.contextmanager
def _one_thread():
    """Run the entropy model's inputs (h_s, the context loop) on one thread: the same reduction order
    whatever thread count either end has, and tiny per-position ops are faster without thread hand-offs."""
    torch, _ = require_stack()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _padded(side: int) -> int:
    return -(-side // STRIDE) * STRIDE


def analyse(model, raster: np.ndarray) -> _Latents:
    """Run the encoder on a uint8 RGB raster: the symbols to code, their models, and the decoded raster."""
    torch, _ = require_stack()
    h, w = raster.shape[:2]
    out = _Latents()
    with torch.no_grad():
        x = torch.from_numpy(np.array(raster, np.uint8)).permute(2, 0, 1)[None].float() / 255.0
        x = torch.nn.functional.pad(x, (0, _padded(w) - w, 0, _padded(h) - h), mode="replicate")
        y = model.g_a(x)
        z = model.h_a(y)
        medians, low, high, probs = _z_tables(model)
        zc = z[0].numpy()
        zs = np.rint(zc - medians[:, None, None])
        zs = np.clip(zs, low[:, None, None], high[:, None, None]).astype(np.int32)
        z_hat = torch.from_numpy(zs.astype(np.float32) + medians[:, None, None])[None]
        y_pos = y[0].permute(1, 2, 0)  # (H, W, M)

        def quantise(hh: int, ww: int, stds, means):
            q = torch.clamp(torch.round(y_pos[hh, ww] - means), -Y_RANGE, Y_RANGE)
            return q.numpy().astype(np.int32)

        with _one_thread():
            params = model.h_s(z_hat)
            y_hat, ys, stds = _ar_loop(model, params, y.shape[2], y.shape[3], quantise)
        out.x_hat = _to_raster(model.g_s(y_hat), w, h)
    out.z_symbols = (zs - low[:, None, None]).reshape(-1)  # 0-based, channel-major
    out.z_probs = np.repeat(probs, zs.shape[1] * zs.shape[2], axis=0)
    out.y_symbols, out.y_stds = ys.reshape(-1), stds.reshape(-1)
    return out


def _to_raster(x_hat, w: int, h: int) -> np.ndarray:
    img = x_hat[0, :, :h, :w].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0
    return img.astype(np.float32)


def _y_model():
    _, constriction = require_stack()
    return constriction.stream.model.QuantizedGaussian(-Y_RANGE, Y_RANGE)


def _check(model, z_symbols: np.ndarray, y_symbols: np.ndarray) -> bytes:
    h = hashlib.blake2s(digest_size=CHECK_BYTES, key=model.digest)
    h.update(np.ascontiguousarray(z_symbols, "<i4").tobytes())
    h.update(np.ascontiguousarray(y_symbols, "<i4").tobytes())
    return h.digest()


def range_code(lat: _Latents) -> bytes:
    """The constriction range-coder stream of z then y, as bytes (trailing zero bytes of the last word
    dropped: the decoder puts them back)."""
    _, constriction = require_stack()
    enc = constriction.stream.queue.RangeEncoder()
    enc.encode(lat.z_symbols.astype(np.int32), constriction.stream.model.Categorical(perfect=False), lat.z_probs)
    enc.encode(lat.y_symbols.astype(np.int32), _y_model(), np.zeros(len(lat.y_symbols)), lat.y_stds)
    data = enc.get_compressed().astype("<u4").tobytes()
    cut = len(data)
    while cut > len(data) - 3 and cut > 0 and data[cut - 1] == 0:
        cut -= 1
    return data[:cut]


def encode_raster(model, raster: np.ndarray) -> tuple[bytes, np.ndarray]:
    """(payload, decoded raster) of a uint8 RGB raster."""
    lat = analyse(model, raster)
    return _check(model, lat.z_symbols, lat.y_symbols) + range_code(lat), lat.x_hat


def decode_payload(model, payload: bytes, width: int, height: int) -> np.ndarray:
    """The raster a payload codes, float32 RGB 0..255; BitstreamError for anything wrong."""
    return decode_latents(model, payload, width, height)[2]


def decode_latents(model, payload: bytes, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z symbols, y symbols, raster) of a payload, the symbols as ``analyse`` lists them."""
    torch, constriction = require_stack()
    ph, pw = _padded(height), _padded(width)
    positions = (ph // 16) * (pw // 16)
    if len(payload) <= CHECK_BYTES:
        raise BitstreamError("net level: payload holds no stream")
    if positions > MAX_POSITIONS_PER_BYTE * len(payload):
        raise BitstreamError(f"net level: a {width}x{height} raster needs {positions} latent positions, more "
                             f"than {MAX_POSITIONS_PER_BYTE} per byte of a {len(payload)}-byte payload")
    body = payload[CHECK_BYTES:]
    body += b"\0" * (-len(body) % 4)
    dec = constriction.stream.queue.RangeDecoder(np.frombuffer(body, "<u4").astype(np.uint32))
    medians, low, high, probs = _z_tables(model)
    zh, zw = ph // STRIDE, pw // STRIDE
    y_model = _y_model()
    try:
        z0 = dec.decode(constriction.stream.model.Categorical(perfect=False),
                        np.repeat(probs, zh * zw, axis=0)).astype(np.int32)
        if np.any(z0 > (high - low)[:, None].repeat(zh * zw, axis=1).reshape(-1)):
            raise BitstreamError("net level: corrupt stream (z symbol out of range)")
        zs = z0.reshape(-1, zh, zw) + low[:, None, None]
        with torch.no_grad():
            z_hat = torch.from_numpy(zs.astype(np.float32) + medians[:, None, None])[None]

            def read(hh: int, ww: int, stds, means):
                return np.asarray(dec.decode(y_model, np.zeros(len(stds)), stds), np.int32)

            with _one_thread():
                params = model.h_s(z_hat)
                y_hat, ys, _ = _ar_loop(model, params, ph // 16, pw // 16, read)
            raster = _to_raster(model.g_s(y_hat), width, height)
    except BitstreamError:
        raise
    except (AssertionError, ValueError, RuntimeError) as exc:  # constriction refuses what cannot be decoded
        raise BitstreamError(f"net level: corrupt stream ({str(exc).splitlines()[0][:120]})") from None
    if not dec.maybe_exhausted() or _check(model, z0, ys.reshape(-1)) != payload[:CHECK_BYTES]:
        raise BitstreamError("net level: check failed (payload corrupt or cut, or coded with other weights "
                             "than the ones given)")
    return z0, ys.reshape(-1), raster


# ============================================================================ the pixel codec


class NetCodec(PixelCodec):
    """One level: the raster, resized from the image, coded by the learned codec. The model fixes the
    rate at each raster, so rate control's quality search sees one size per raster (``quality`` is
    ignored, and one encode per raster is kept in the scratch)."""

    name = "net"
    codec_id = pb.CODEC_PIXEL_NET
    max_levels = 1
    quality_search = True
    ladder_smallest = 64

    def __init__(self) -> None:
        self._decoded: dict[tuple, np.ndarray] = {}  # a few recent decodes (deterministic, so safe to reuse)

    def check_settings(self, settings: PixelSettings) -> None:
        if settings.levels != 1:
            raise MiscError("pixel layer: the net codec codes one level")
        if max(settings.width, settings.height) > NET_MAX_RASTER:
            raise MiscError(f"pixel layer: net rasters are at most {NET_MAX_RASTER} on a side, not "
                            f"{settings.width}x{settings.height}")

    def encode(self, image: np.ndarray, settings: PixelSettings, scratch: Scratch | None = None
               ) -> list[PixelLevel]:
        from PIL import Image

        model = load_model()
        key = ("net", model.digest, settings.width, settings.height)
        if scratch is not None and key in scratch:
            return scratch[key]
        raster = image
        if (settings.width, settings.height) != (image.shape[1], image.shape[0]):
            raster = np.asarray(Image.fromarray(image).resize((settings.width, settings.height), DOWN_FILTER))
        payload, _ = encode_raster(model, raster)
        levels = [PixelLevel(0, self.codec_id, pb.PixelParams(width=settings.width, height=settings.height),
                             payload)]
        if scratch is not None:
            scratch[key] = levels
        return levels

    def decode(self, levels: Sequence[PixelLevel]) -> np.ndarray:
        if len(levels) != 1:
            raise BitstreamError("net level: the net codec has one level")
        p = levels[0].params
        if max(p.width, p.height) > NET_MAX_RASTER:
            raise BitstreamError(f"net level: raster {p.width}x{p.height} is over {NET_MAX_RASTER} on a side")
        model = load_model()
        key = (model.digest, bytes(levels[0].payload), p.width, p.height)
        if key not in self._decoded:  # rate control decodes one raster's level once per quality it probes
            if len(self._decoded) >= 8:
                self._decoded.pop(next(iter(self._decoded)))
            self._decoded[key] = decode_payload(model, key[1], p.width, p.height)
        return self._decoded[key].copy()


register(NetCodec())

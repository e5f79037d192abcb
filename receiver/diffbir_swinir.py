"""SwinIR as DiffBIR v1 uses it for its cleaning stage (stage 1), sized from a checkpoint's own tensors.

The architecture is SwinIR's (Liang et al., 2021: residual Swin Transformer blocks of shifted-window
attention with a relative position bias), in the variant DiffBIR v1's ``general_full_v1`` checkpoint holds
under ``preprocess_model.``: the picture is pixel-unshuffled by 8 before the first convolution and brought
back by three nearest-neighbour x2 up-samplings ("nearest+conv"), so the output has the input's size.
Parameter names follow that checkpoint (``conv_first.1``, ``layers.i.residual_group.blocks.j.attn.qkv``,
``conv_up1``, ...), so its state dict loads as is; the buffers it also carries (``attn_mask``,
``relative_position_index``) are recomputed for each input size instead.

``SwinIRConfig.from_state_dict`` reads every size from the tensors (embedding width, depths, heads and
window from the relative position tables, MLP ratio, unshuffle and up-sampling factors), so the full
model and the tiny test models load through the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from miscnet.core.errors import MiscError

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # SwinIR's image mean for 3 channels (img_range 1.0)


@dataclass(frozen=True)
class SwinIRConfig:
    embed_dim: int = 180
    depths: tuple[int, ...] = (6,) * 8
    num_heads: tuple[int, ...] = (6,) * 8
    window_size: int = 8
    mlp_ratio: float = 2.0
    unshuffle: int = 8  # pixel unshuffle factor before conv_first (1: none)
    upscale: int = 8  # nearest+conv up-sampling factor (a power of two)
    in_chans: int = 3

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this (windows tile the unshuffled feature map)."""
        return self.unshuffle * self.window_size

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], where: str) -> SwinIRConfig:
        def need(key: str) -> torch.Tensor:
            if key not in sd:
                raise MiscError(f"{where}: SwinIR key {key!r} missing (not a DiffBIR v1 SwinIR)")
            return sd[key]

        if "layers.0.conv.weight" not in sd:
            raise MiscError(f"{where}: SwinIR key 'layers.0.conv.weight' missing (only the '1conv' residual "
                            "connection of DiffBIR v1 is supported)")
        first = need("conv_first.1.weight") if "conv_first.1.weight" in sd else need("conv_first.weight")
        embed_dim, in_ch = first.shape[0], first.shape[1]
        out_ch = need("conv_last.weight").shape[0]
        unshuffle = math.isqrt(in_ch // out_ch) if "conv_first.1.weight" in sd else 1
        if unshuffle * unshuffle * out_ch != in_ch:
            raise MiscError(f"{where}: conv_first takes {in_ch} channels, not a pixel unshuffle of {out_ch}")
        depths, heads = [], []
        i = 0
        while f"layers.{i}.conv.weight" in sd:
            j = 0
            while f"layers.{i}.residual_group.blocks.{j}.norm1.weight" in sd:
                j += 1
            if j == 0:
                raise MiscError(f"{where}: SwinIR layer {i} has no blocks")
            table = need(f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table")
            depths.append(j)
            heads.append(table.shape[1])
            i += 1
        table = need("layers.0.residual_group.blocks.0.attn.relative_position_bias_table")
        window = (math.isqrt(table.shape[0]) + 1) // 2
        if (2 * window - 1) ** 2 != table.shape[0]:
            raise MiscError(f"{where}: relative position table of {table.shape[0]} rows is not a square window")
        hidden = need("layers.0.residual_group.blocks.0.mlp.fc1.weight").shape[0]
        ups = 0
        while f"conv_up{ups + 1}.weight" in sd:
            ups += 1
        if ups == 0:
            raise MiscError(f"{where}: SwinIR key 'conv_up1.weight' missing (only the 'nearest+conv' up-sampler of "
                            "DiffBIR v1 is supported)")
        return cls(embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(heads), window_size=window,
                   mlp_ratio=hidden / embed_dim, unshuffle=unshuffle, upscale=2 ** ups, in_chans=out_ch)


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the (2w-1)^2 bias table for every pair of tokens in a w x w window."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # 2, N
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # 2, N, N, each in 0 .. 2w-2
    return rel[0] * (2 * window - 1) + rel[1]


def shift_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(windows, N, N): 0 where two tokens of a cyclically shifted window came from the same region, else
    -100 (the wrapped-around pieces must not attend to each other)."""
    region = torch.zeros(height, width)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    n = 0
    for hs in cuts:
        for ws in cuts:
            region[hs, ws] = n
            n += 1
    ids = _windows(region[None, :, :, None], window).squeeze(-1)  # windows, N
    return (ids[:, None, :] != ids[:, :, None]).float() * -100.0


def _windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, window * window, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _unwindows(x: torch.Tensor, window: int, b: int, h: int, w: int) -> torch.Tensor:
    c = x.shape[-1]
    x = x.view(b, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.window, self.heads = window, heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("index", relative_position_index(window), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        bias = bias.unsqueeze(0).to(q.dtype)  # 1, heads, N, N
        if mask is not None:  # one mask per window position, repeated over the batch
            windows = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask.to(q.dtype)[None, :, None]).expand(bw // windows, -1, -1, -1, -1)
            bias = bias.reshape(bw, self.heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # softmax(q k^T / sqrt(d) + bias) v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(round(dim * mlp_ratio))
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        h, w = size
        b, _, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(_windows(y, self.window), mask if self.shift else None)
        y = _unwindows(y, self.window, b, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class ResidualGroup(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock(dim, heads, window, 0 if j % 2 == 0 else window // 2, mlp_ratio)
                                    for j in range(depth))


class RSTB(nn.Module):
    """Residual Swin Transformer block: Swin blocks, a 3x3 convolution, a skip connection."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.residual_group = ResidualGroup(dim, depth, heads, window, mlp_ratio)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        y = x
        for block in self.residual_group.blocks:
            y = block(y, size, mask)
        b, n, c = y.shape
        y = self.conv(y.transpose(1, 2).reshape(b, c, *size))
        return y.flatten(2).transpose(1, 2) + x


class _PatchNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)


class SwinIR(nn.Module):
    """(B, 3, H, W) in [0, 1] -> the cleaned picture, same size (H, W multiples of ``config.multiple``)."""

    def __init__(self, config: SwinIRConfig) -> None:
        super().__init__()
        self.config = c = config
        feat = 64  # SwinIR's reconstruction width
        first = nn.Conv2d(c.in_chans * c.unshuffle ** 2, c.embed_dim, 3, 1, 1)
        self.conv_first = nn.Sequential(nn.PixelUnshuffle(c.unshuffle), first) if c.unshuffle > 1 else first
        self.patch_embed = _PatchNorm(c.embed_dim)
        self.layers = nn.ModuleList(RSTB(c.embed_dim, d, h, c.window_size, c.mlp_ratio)
                                    for d, h in zip(c.depths, c.num_heads, strict=True))
        self.norm = nn.LayerNorm(c.embed_dim)
        self.conv_after_body = nn.Conv2d(c.embed_dim, c.embed_dim, 3, 1, 1)
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(c.embed_dim, feat, 3, 1, 1), nn.LeakyReLU())
        for i in range(int(math.log2(c.upscale))):
            self.add_module(f"conv_up{i + 1}", nn.Conv2d(feat, feat, 3, 1, 1))
        self.conv_hr = nn.Conv2d(feat, feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(feat, c.in_chans, 3, 1, 1)
        self.register_buffer("mean", torch.tensor(RGB_MEAN if c.in_chans == 3 else (0.0,) * c.in_chans)
                             .view(1, -1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:  # what diffusers' pipelines ask of their components
        return self.conv_last.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_last.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        height, width = x.shape[-2:]
        m = c.multiple
        x = F.pad(x, (0, -width % m, 0, -height % m), mode="reflect") if (height % m or width % m) else x
        x = x - self.mean.to(x.dtype)
        feats = self.conv_first(x)
        b, ch, h, w = feats.shape
        mask = shift_mask(h, w, c.window_size, c.window_size // 2).to(x.device)
        tokens = self.patch_embed.norm(feats.flatten(2).transpose(1, 2))
        for layer in self.layers:
            tokens = layer(tokens, (h, w), mask)
        body = self.norm(tokens).transpose(1, 2).reshape(b, ch, h, w)
        y = self.conv_before_upsample(self.conv_after_body(body) + feats)
        for i in range(int(math.log2(c.upscale))):
            y = F.leaky_relu(getattr(self, f"conv_up{i + 1}")(F.interpolate(y, scale_factor=2, mode="nearest")), 0.2)
        y = self.conv_last(F.leaky_relu(self.conv_hr(y), 0.2))
        return (y + self.mean.to(y.dtype))[..., :height, :width]

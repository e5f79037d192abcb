"""The ``clip`` map backend: MISC's map encoder (CLIP Surgery) on a transformers CLIP model.

For each object name, MISC scores every image patch against the name with CLIP and keeps the patches
that score high:

1. patch tokens of the image (the model's input size, the image squashed to a square as CLIP Surgery
   does, so the map covers the whole picture for any aspect ratio), projected into CLIP's joint space and
   L2-normalised. With ``surgery="vv"`` (the default) the last ``surgery_layers`` blocks also run CLIP
   Surgery's value-value attention path (no MLP) beside the original one and the patch tokens come from
   that path, which fixes CLIP's noisy, inverted patch maps; ``surgery="none"`` uses the plain tokens;
2. text features of each name (averaged over a few prompt templates, L2-normalised);
3. feature surgery: similarity = patch . (text(name) - text("")), i.e. the empty prompt's features are
   subtracted so what every prompt shares does not light up every patch;
4. each object's map is min-max normalised over the patches, up-sampled (bilinear) to the image, reduced
   to the N x N grid by the mean over each cell, and thresholded (a cell is set when its mean exceeds
   ``threshold``, 0.35 by default, MISC's value).

Steps 3 and 4 are plain numpy (``surgery_similarity``, ``normalise_maps``, ``maps_to_grid``) so their
arithmetic is testable with hand-made features. The model is named by ``--clip-model`` /
``MISCNET_CLIP_MODEL`` (a folder or a cached id; see miscnet.core.pretrained); torch and transformers are
imported only when a mask is first asked for.
"""

from __future__ import annotations

import functools

import numpy as np

from miscnet.core.config import MAP_THRESHOLD as DEFAULT_THRESHOLD
from miscnet.core.config import MODEL_DEVICE
from miscnet.core.errors import MiscError
from miscnet.core.semantics import Semantics

DEFAULT_SURGERY_LAYERS = 6  # CLIP Surgery's choice for 12-block ViTs
# Our own short prompt ensemble: averaging a few phrasings steadies the text features.
TEMPLATES = (
    "a photo of {}.",
    "a photo of the {}.",
    "a picture showing {}.",
    "a close-up photo of the {}.",
    "a cropped photo of the {}.",
    "there is {} in the scene.",
)
# OpenAI CLIP's normalisation, used when a model folder has no image processor config.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ============================================================================ the arithmetic (numpy)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def surgery_similarity(patches: np.ndarray, texts: np.ndarray, empty: np.ndarray | None) -> np.ndarray:
    """(K, P) similarity of P patch features (P, D) to K text features (K, D), minus the empty prompt.

    Every feature is L2-normalised first (as CLIP compares them); ``empty`` (D,) is the features of the
    empty prompt, subtracted from each text feature (MISC's feature surgery); None skips the surgery.
    """
    p = _unit(patches)
    t = _unit(texts)
    if empty is not None:
        t = t - _unit(empty)[None, :]
    return t @ p.T


def normalise_maps(similarity: np.ndarray) -> np.ndarray:
    """Min-max normalise each row (object) to [0, 1]; a flat row becomes all zeros."""
    s = np.asarray(similarity, dtype=np.float64)
    lo = s.min(axis=1, keepdims=True)
    span = s.max(axis=1, keepdims=True) - lo
    return np.where(span > 1e-12, (s - lo) / np.where(span > 1e-12, span, 1.0), 0.0)


def _bilinear_cell_means(size_in: int, grid: int, oversample: int = 16) -> np.ndarray:
    """(grid, size_in) weights: the mean over each output cell of a bilinear up-sampling.

    Bilinear with half-pixel centres (``align_corners=False``, what CLIP Surgery's interpolation uses),
    evaluated at ``oversample`` points per cell and averaged, so each grid cell gets the mean of the
    up-sampled map over it whatever the image size.
    """
    n_out = grid * oversample
    src = (np.arange(n_out) + 0.5) * size_in / n_out - 0.5
    src = np.clip(src, 0, size_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo
    w = np.zeros((n_out, size_in))
    np.add.at(w, (np.arange(n_out), lo), 1 - frac)
    np.add.at(w, (np.arange(n_out), hi), frac)
    return w.reshape(grid, oversample, size_in).mean(axis=1)


def maps_to_grid(maps: np.ndarray, grid: int, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """(K, gh, gw) maps in [0, 1] -> (K, grid, grid) bool: cell mean of the bilinear up-sampling > threshold."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        raise ValueError("maps must be (objects, height, width)")
    wy = _bilinear_cell_means(maps.shape[1], grid)
    wx = _bilinear_cell_means(maps.shape[2], grid)
    cells = np.einsum("gh,khw,cw->kgc", wy, maps, wx)
    return cells > threshold


# ============================================================================ the model (torch)


@functools.lru_cache(maxsize=2)
def _load_clip(path: str, device: str):
    from pathlib import Path

    from miscnet.core.pretrained import load_error, pick_device, quiet_loading, require_torch

    require_torch("the clip map backend")
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    dev, dtype = pick_device(device)
    with quiet_loading():
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # many exception types mean "this folder does not load"
            raise load_error("clip", Path(path), e) from None
        try:
            processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        except Exception:  # no preprocessor_config.json: CLIP's standard normalisation
            mean, std = _CLIP_MEAN, _CLIP_STD
    vocab = model.config.text_config.vocab_size
    if not 2 < len(tokenizer) <= vocab:
        raise MiscError(f"clip model {path}: its tokenizer has {len(tokenizer)} tokens but the text model expects "
                        f"{vocab} (a missing or broken tokenizer; the folder needs tokenizer.json or "
                        "vocab.json + merges.txt)")
    model.to(dev).eval()
    return model, tokenizer, mean, std, dev


class ClipMapBackend:
    """MISC's map encoder: CLIP Surgery similarity of each object name, reduced to the grid."""

    name = "clip"

    def __init__(self, model: str | None = None, *, threshold: float = DEFAULT_THRESHOLD, device: str = MODEL_DEVICE,
                 surgery: str = "vv", surgery_layers: int = DEFAULT_SURGERY_LAYERS,
                 templates: tuple[str, ...] = TEMPLATES, input_size: int | None = None) -> None:
        from miscnet.core.pretrained import require

        if not 0.0 <= float(threshold) < 1.0:
            raise MiscError(f"map threshold must be in [0, 1), not {threshold}")
        if surgery not in ("vv", "none"):
            raise MiscError(f"unknown CLIP surgery {surgery!r} (use vv or none)")
        if not templates or any("{}" not in t for t in templates):
            raise MiscError("every CLIP prompt template needs a '{}' for the name")
        self.path = require("clip", model)
        self.threshold, self.device, self.surgery = float(threshold), device, surgery
        self.surgery_layers, self.templates, self.input_size = int(surgery_layers), tuple(templates), input_size

    def _loaded(self):
        return _load_clip(str(self.path), self.device)

    # --- features

    def text_features(self, names: list[str]):
        """(len(names) + 1, D) numpy: each name's prompt-ensemble features, then the empty prompt's."""
        import torch

        model, tokenizer, _, _, dev = self._loaded()
        rows = []
        with torch.inference_mode():
            for name in [*names, ""]:
                prompts = [t.format(name).replace("  ", " ").strip() for t in self.templates]
                max_len = getattr(model.config.text_config, "max_position_embeddings", 77)
                tok = tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
                out = model.get_text_features(input_ids=tok["input_ids"].to(dev),
                                              attention_mask=tok["attention_mask"].to(dev))
                feats = out if isinstance(out, torch.Tensor) else out.pooler_output
                feats = torch.nn.functional.normalize(feats.float(), dim=-1).mean(dim=0)
                rows.append(feats.cpu().numpy())
        return np.stack(rows)

    def pixel_values(self, image: np.ndarray):
        """The image squashed to the model's square input size, normalised, as a (1, 3, S, S) tensor."""
        import torch
        from PIL import Image

        model, _, mean, std, dev = self._loaded()
        size = int(self.input_size or model.config.vision_config.image_size)
        im = Image.fromarray(np.ascontiguousarray(image)).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        x = (np.asarray(im, dtype=np.float32) / 255.0 - np.array(mean, np.float32)) / np.array(std, np.float32)
        return torch.from_numpy(x.transpose(2, 0, 1)[None].copy()).to(dev, dtype=model.dtype)

    def patch_features(self, image: np.ndarray) -> tuple[np.ndarray, int, int]:
        """(P, D) projected patch features and the patch grid (gh, gw)."""
        import torch

        model, _, _, _, _ = self._loaded()
        vm = model.vision_model
        pixels = self.pixel_values(image)
        native = model.config.vision_config.image_size
        with torch.inference_mode():
            x = vm.embeddings(pixels, interpolate_pos_encoding=pixels.shape[-1] != native)
            x = vm.pre_layrnorm(x)
            layers = list(vm.encoder.layers)
            start = len(layers) - min(max(self.surgery_layers, 0), len(layers)) if self.surgery == "vv" else len(layers)
            new = None
            for i, layer in enumerate(layers):
                if i < start:
                    x = x + _attention(layer.self_attn, layer.layer_norm1(x), vv=False)
                    x = x + layer.mlp(layer.layer_norm2(x))
                    continue
                h = layer.layer_norm1(x)
                ori = _attention(layer.self_attn, h, vv=False)
                vv = _attention(layer.self_attn, h, vv=True)
                new = (x if new is None else new) + vv  # the v-v path: attention only, no MLP
                x = x + ori
                x = x + layer.mlp(layer.layer_norm2(x))
            tokens = (new if new is not None else x)[:, 1:, :]
            feats = model.visual_projection(vm.post_layernorm(tokens))[0].float().cpu().numpy()
        side = pixels.shape[-1] // model.config.vision_config.patch_size
        return feats, side, side

    # --- maps

    def similarity_maps(self, image: np.ndarray, names: list[str]) -> np.ndarray:
        """(K, gh, gw) min-max normalised maps, one per name."""
        texts = self.text_features(names)
        patches, gh, gw = self.patch_features(image)
        sim = surgery_similarity(patches, texts[:-1], texts[-1])
        return normalise_maps(sim).reshape(len(names), gh, gw)

    def masks(self, image: np.ndarray, semantics: Semantics, grid: int) -> np.ndarray:
        names = [o.name for o in semantics.objects]
        if not names:
            return np.zeros((0, grid, grid), dtype=bool)
        return maps_to_grid(self.similarity_maps(image, names), grid, self.threshold)


def _attention(attn, h, *, vv: bool):
    """One CLIP attention on normalised hidden states h (B, N, C): q-k (the original) or v-v (CLIP Surgery)."""
    import torch

    b, n, c = h.shape
    heads = attn.num_heads
    v = attn.v_proj(h).view(b, n, heads, c // heads).transpose(1, 2)
    if vv:
        q = k = v
    else:
        q = attn.q_proj(h).view(b, n, heads, c // heads).transpose(1, 2)
        k = attn.k_proj(h).view(b, n, heads, c // heads).transpose(1, 2)
    weights = torch.softmax((q @ k.transpose(-2, -1)) * attn.scale, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return attn.out_proj(out)

"""Model configuration for the CLI: what each backend is configured with, whether its weights are here,
and tiny random-weight models for smoke tests.

Where weights come from (a folder, a cached Hub id, the environment, ``MISCNET_MODELS_DIR``) is decided
in miscnet.core.pretrained; this module reports it (``miscnet models``) and writes the tiny models
(``miscnet models tiny DIR``): a Stable Diffusion pipeline, a ControlNet and an upscaler for the
diffusion decoder, a CLIP model for the map encoder, a LLaVA-style vision-language model for the hf
semantic encoder, and a DiffBIR v1 checkpoint (MISC's decoder) written in DiffBIR's own key layout from its
architecture (``diffbir_state_dict``; ``DIFFBIR_FULL`` holds its real sizes, used by experiments/gpu_check.py).
Each is built from a small config with seeded random weights and a tokenizer written offline (vocab.json
+ merges.txt, vocabulary size asserted), saved with save_pretrained (safetensors; the DiffBIR checkpoint
as a torch file, as DiffBIR ships it, read back with weights_only) and loadable with the same
``from_pretrained(path, local_files_only=True)`` calls real weights use. Their outputs are noise: they
prove the path works, not that the pictures are good.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from miscnet.core.errors import MiscError
from miscnet.core.pretrained import MODELS_DIR_ENV, ROLES, hf_cache_dir, locate

# ============================================================================ listing

# (layer, backend, role or None, note) in the order `miscnet models` lists them
BACKENDS = (
    ("semantic", "sidecar", None, "JSON sidecar or MISC CSV beside the image (no model)"),
    ("semantic", "openai", None, "OpenAI-compatible chat endpoint with image input"),
    ("semantic", "hf", "vlm", ROLES["vlm"].what),
    ("map", "boxes", None, "boxes from the semantics (no model)"),
    ("map", "clip", "clip", ROLES["clip"].what),
    ("decoder", "classical", None, "up-sampling and drawing (no model)"),
    ("decoder", "diffusion", "diffbir", ROLES["diffbir"].what + "; MISC's decoder (--restore diffbir)"),
    ("decoder", "diffusion", "diffusion", ROLES["diffusion"].what),
    ("decoder", "diffusion", "controlnet", ROLES["controlnet"].what + "; optional"),
    ("decoder", "diffusion", "upscaler", ROLES["upscaler"].what + "; optional"),
)


def _openai_row(model: str | None = None, endpoint: str | None = None) -> dict:
    from miscnet.sender.semantic_backends import API_KEY_ENV, BASE_URL_ENV, DEFAULT_OPENAI_BASE_URL, LMM_MODEL_ENV

    name = model or os.environ.get(LMM_MODEL_ENV)
    url = endpoint or os.environ.get(BASE_URL_ENV) or DEFAULT_OPENAI_BASE_URL
    key = bool(os.environ.get(API_KEY_ENV))
    needs_key = url.startswith("https://api.openai.com")
    problem = None
    if not name:
        problem = f"no model: give --lmm-model NAME or set {LMM_MODEL_ENV}"
    elif needs_key and not key:
        problem = f"no key: set {API_KEY_ENV}"
    return {"model": name, "source": "option" if model else (f"env {LMM_MODEL_ENV}" if name else "unset"),
            "path": url, "present": problem is None, "remote": True, "api_key_set": key, "problem": problem}


def _diffbir_row(value: str | None) -> dict:
    """A DiffBIR checkpoint is a file (or a folder holding one), not a model folder: located its own way."""
    from miscnet.core.pretrained import configured
    from miscnet.receiver.diffbir_checkpoint import resolve_checkpoint

    configured_value, source = configured("diffbir", value)
    try:
        path, problem = str(resolve_checkpoint(value)), None
    except MiscError as e:
        path, problem = None, str(e)
    return dict(model=configured_value, source=source, path=path, present=path is not None, problem=problem,
                env=ROLES["diffbir"].env, option=ROLES["diffbir"].option)


def list_models(values: dict[str, str | None] | None = None, *, lmm_model: str | None = None,
                lmm_endpoint: str | None = None) -> list[dict]:
    """One row per backend (and model role): what it is configured with and whether it is usable here.

    ``values`` maps roles (diffusion, diffbir, controlnet, upscaler, clip, vlm) to command-line values. A remote
    endpoint is reported as configured or not; it is never contacted.
    """
    values = values or {}
    rows = []
    for layer, backend, role, note in BACKENDS:
        row = {"layer": layer, "backend": backend, "role": role, "what": note}
        if role == "diffbir":
            row.update(_diffbir_row(values.get(role)))
        elif role is not None:
            found = locate(role, values.get(role))
            row.update(model=found.value, source=found.source, path=str(found.path) if found.path else None,
                       present=found.present, problem=found.problem, env=ROLES[role].env,
                       option=ROLES[role].option)
        elif backend == "openai":
            row.update(_openai_row(lmm_model, lmm_endpoint))
        else:
            row.update(model=None, source="built in", path=None, present=True, problem=None)
        rows.append(row)
    return rows


def models_report(rows: list[dict]) -> dict:
    return {"backends": rows, "hf_cache": str(hf_cache_dir()), "models_dir": os.environ.get(MODELS_DIR_ENV),
            "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE")}


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'layer':<9}{'backend':<10}{'role':<11}{'present':<9}model"]
    for r in rows:
        present = "yes" if r["present"] else "NO"
        model = r.get("model") or ("-" if r["source"] == "built in" else "(not configured)")
        where = ""
        if r.get("path") and r.get("path") != r.get("model"):
            where = f"  -> {r['path']}"
        src = f"  [{r['source']}]" if r["source"] not in ("built in",) else ""
        lines.append(f"{r['layer']:<9}{r['backend']:<10}{(r['role'] or '-'):<11}{present:<9}{model}{src}{where}")
        if r.get("problem") and r.get("model"):
            lines.append(f"{'':<39}{r['problem']}")
    return "\n".join(lines)


# ============================================================================ tiny models

TINY_ROLES = ("diffusion", "controlnet", "upscaler", "clip", "vlm", "diffbir")
_WORDS = ("a photo of the cat dog red box sky tree person man woman car house road grass water light dark "
          "blue green white black small large left right top bottom with and in on").split()


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0..255 (GPT-2 / CLIP convention)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def _word_merges(words: list[str], vocab: dict[str, int], suffix: str = "") -> list[str]:
    """Merges that build each word left to right (the last piece carrying ``suffix``), added to vocab."""
    merges = []
    for word in words:
        pieces = list(word)
        if suffix:
            pieces[-1] += suffix
        cur = pieces[0]
        for nxt in pieces[1:]:
            merged = cur + nxt
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append(f"{cur} {nxt}")
            cur = merged
    return merges


def _write_bpe(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _check_vocab(tokenizer, expected: int, what: str) -> None:
    if len(tokenizer) != expected:
        raise MiscError(f"tiny {what} tokenizer has {len(tokenizer)} tokens, expected {expected} "
                        "(the offline tokenizer did not load)")


def tiny_clip_tokenizer(work: Path):
    """A CLIP BPE tokenizer built offline: every byte (plain and word-final) plus merges for a few words."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = _word_merges(_WORDS, vocab, suffix="</w>")
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder = work / "clip-tokenizer-src"
    _write_bpe(folder, vocab, merges)
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=77)
    _check_vocab(tok, len(vocab), "CLIP")
    assert tok("a photo of the cat").input_ids[1:-1] == [vocab[w + "</w>"] for w in "a photo of the cat".split()]
    return tok


def tiny_chat_tokenizer(work: Path, specials: list[str]):
    """A byte-level BPE tokenizer (Qwen2 style, 'Ġ' marks a space) with chat special tokens, built offline."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_chars())}
    merges = _word_merges(["\u0120" + w for w in _WORDS], vocab)
    vocab["<|endoftext|>"] = len(vocab)  # Qwen2Tokenizer's default unknown / end token
    folder = work / "chat-tokenizer-src"
    _write_bpe(folder, vocab, merges)
    tok = Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)
    _check_vocab(tok, len(vocab), "chat")
    tok.add_special_tokens({"additional_special_tokens": specials})
    _check_vocab(tok, len(vocab | dict.fromkeys(specials)), "chat (with special tokens)")
    return tok


def _unet_kwargs() -> dict:
    return dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
                cross_attention_dim=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2)


def _text_encoder(tok):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def write_tiny_diffusion(dest: Path, tok) -> None:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, **_unet_kwargs())
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_text_encoder(tok), tokenizer=tok, unet=unet,
                                   scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(dest), safe_serialization=True)


def write_tiny_controlnet(dest: Path) -> None:
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(1)
    kw = _unet_kwargs()
    kw.pop("up_block_types")
    ControlNetModel(in_channels=4, conditioning_embedding_out_channels=(8, 16), **kw).save_pretrained(
        str(dest), safe_serialization=True)


def write_tiny_upscaler(dest: Path, tok) -> None:
    import torch
    from diffusers import DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

    torch.manual_seed(2)
    unet = UNet2DConditionModel(sample_size=16, in_channels=7, out_channels=4, num_class_embeds=1000,
                                **_unet_kwargs())
    vae = _vae()
    vae.register_to_config(scaling_factor=0.08333)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=_text_encoder(tok), tokenizer=tok, unet=unet,
        low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02),
        scheduler=_scheduler(), max_noise_level=350)
    pipe.save_pretrained(str(dest), safe_serialization=True)


def write_tiny_clip(dest: Path, tok) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(3)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(str(dest), safe_serialization=True)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(str(dest))


# ---------------------------------------------------------------------------- DiffBIR v1, in its own key layout


class _LdmWriter:
    """Random tensors under the names DiffBIR v1's checkpoint uses (LDM / OpenCLIP / SwinIR layouts),
    written from the architecture, not converted from the loader's modules: a mapping error shows."""

    def __init__(self, seed: int, meta: bool = False) -> None:
        import torch

        self.torch = torch
        self.gen = torch.Generator().manual_seed(seed)
        self.meta = meta  # shapes only (no memory): for checking the full-size layout loads
        self.sd: dict = {}

    def rand(self, name: str, *shape: int, std: float = 0.02) -> None:
        if self.meta:
            self.sd[name] = self.torch.empty(*shape, device="meta")
            return
        self.sd[name] = self.torch.randn(*shape, generator=self.gen) * std

    def conv(self, name: str, cin: int, cout: int, k: int, bias: bool = True) -> None:
        self.rand(f"{name}.weight", cout, cin, k, k, std=(cin * k * k) ** -0.5)
        if bias:
            self.rand(f"{name}.bias", cout)

    def linear(self, name: str, cin: int, cout: int, bias: bool = True) -> None:
        self.rand(f"{name}.weight", cout, cin, std=cin ** -0.5)
        if bias:
            self.rand(f"{name}.bias", cout)

    def norm(self, name: str, c: int) -> None:
        self.rand(f"{name}.weight", c)
        if not self.meta:
            self.sd[f"{name}.weight"] += 1
        self.rand(f"{name}.bias", c)

    # --- LDM openaimodel UNet / ControlNet

    def resblock(self, p: str, cin: int, cout: int, emb: int) -> None:
        self.norm(p + "in_layers.0", cin)
        self.conv(p + "in_layers.2", cin, cout, 3)
        self.linear(p + "emb_layers.1", emb, cout)
        self.norm(p + "out_layers.0", cout)
        self.conv(p + "out_layers.3", cout, cout, 3)
        if cin != cout:
            self.conv(p + "skip_connection", cin, cout, 1)

    def transformer(self, p: str, c: int, context: int) -> None:  # SpatialTransformer, linear proj, depth 1
        self.norm(p + "norm", c)
        self.linear(p + "proj_in", c, c)
        b = p + "transformer_blocks.0."
        for attn, kv in (("attn1", c), ("attn2", context)):
            self.linear(f"{b}{attn}.to_q", c, c, bias=False)
            self.linear(f"{b}{attn}.to_k", kv, c, bias=False)
            self.linear(f"{b}{attn}.to_v", kv, c, bias=False)
            self.linear(f"{b}{attn}.to_out.0", c, c)
        self.linear(b + "ff.net.0.proj", c, 8 * c)  # GEGLU: 4c inner, doubled
        self.linear(b + "ff.net.2", 4 * c, c)
        for i in (1, 2, 3):
            self.norm(f"{b}norm{i}", c)
        self.linear(p + "proj_out", c, c)

    def unet_encoder(self, p: str, cin: int, mc: int, mults, layers: int, attention, context: int,
                     zero_convs: bool) -> tuple[list[int], int]:
        emb = 4 * mc
        self.linear(p + "time_embed.0", mc, emb)
        self.linear(p + "time_embed.2", emb, emb)
        self.conv(p + "input_blocks.0.0", cin, mc, 3)
        chans, ch, i = [mc], mc, 1
        for level, m in enumerate(mults):
            for _ in range(layers):
                self.resblock(f"{p}input_blocks.{i}.0.", ch, m * mc, emb)
                ch = m * mc
                if attention[level]:
                    self.transformer(f"{p}input_blocks.{i}.1.", ch, context)
                chans.append(ch)
                i += 1
            if level != len(mults) - 1:
                self.conv(f"{p}input_blocks.{i}.0.op", ch, ch, 3)
                chans.append(ch)
                i += 1
        self.resblock(p + "middle_block.0.", ch, ch, emb)
        self.transformer(p + "middle_block.1.", ch, context)
        self.resblock(p + "middle_block.2.", ch, ch, emb)
        if zero_convs:
            for k, c in enumerate(chans):
                self.conv(f"{p}zero_convs.{k}.0", c, c, 1)
            self.conv(p + "middle_block_out.0", ch, ch, 1)
        return chans, ch

    def unet(self, p: str, mc: int, mults, layers: int, attention, context: int, latent: int = 4) -> None:
        chans, ch = self.unet_encoder(p, latent, mc, mults, layers, attention, context, zero_convs=False)
        emb, i = 4 * mc, 0
        for level in reversed(range(len(mults))):
            for r in range(layers + 1):
                self.resblock(f"{p}output_blocks.{i}.0.", ch + chans.pop(), mults[level] * mc, emb)
                ch, k = mults[level] * mc, 1
                if attention[level]:
                    self.transformer(f"{p}output_blocks.{i}.1.", ch, context)
                    k = 2
                if level and r == layers:
                    self.conv(f"{p}output_blocks.{i}.{k}.conv", ch, ch, 3)
                i += 1
        self.norm(p + "out.0", ch)
        self.conv(p + "out.2", ch, latent, 3)

    # --- LDM autoencoder

    def vae_resnet(self, p: str, cin: int, cout: int) -> None:
        self.norm(p + "norm1", cin)
        self.conv(p + "conv1", cin, cout, 3)
        self.norm(p + "norm2", cout)
        self.conv(p + "conv2", cout, cout, 3)
        if cin != cout:
            self.conv(p + "nin_shortcut", cin, cout, 1)

    def vae_mid(self, p: str, c: int) -> None:
        self.vae_resnet(p + "mid.block_1.", c, c)
        self.norm(p + "mid.attn_1.norm", c)
        for name in ("q", "k", "v", "proj_out"):
            self.conv(f"{p}mid.attn_1.{name}", c, c, 1)
        self.vae_resnet(p + "mid.block_2.", c, c)

    def vae_encoder(self, p: str, ch: int, mults, layers: int, z: int) -> None:
        self.conv(p + "encoder.conv_in", 3, ch, 3)
        cin = ch
        for i, m in enumerate(mults):
            for j in range(layers):
                self.vae_resnet(f"{p}encoder.down.{i}.block.{j}.", cin, ch * m)
                cin = ch * m
            if i != len(mults) - 1:
                self.conv(f"{p}encoder.down.{i}.downsample.conv", cin, cin, 3)
        self.vae_mid(p + "encoder.", cin)
        self.norm(p + "encoder.norm_out", cin)
        self.conv(p + "encoder.conv_out", cin, 2 * z, 3)
        self.conv(p + "quant_conv", 2 * z, 2 * z, 1)

    def vae(self, p: str, ch: int, mults, layers: int, z: int = 4) -> None:
        self.vae_encoder(p, ch, mults, layers, z)
        cin = ch * mults[-1]
        self.conv(p + "post_quant_conv", z, z, 1)
        self.conv(p + "decoder.conv_in", z, cin, 3)
        self.vae_mid(p + "decoder.", cin)
        for i in reversed(range(len(mults))):
            for j in range(layers + 1):
                self.vae_resnet(f"{p}decoder.up.{i}.block.{j}.", cin, ch * mults[i])
                cin = ch * mults[i]
            if i != 0:
                self.conv(f"{p}decoder.up.{i}.upsample.conv", cin, cin, 3)
        self.norm(p + "decoder.norm_out", cin)
        self.conv(p + "decoder.conv_out", cin, 3, 3)

    # --- OpenCLIP text tower

    def open_clip_text(self, p: str, vocab: int, width: int, blocks: int, positions: int = 77) -> None:
        self.rand(p + "token_embedding.weight", vocab, width)
        self.rand(p + "positional_embedding", positions, width, std=0.01)
        for k in range(blocks):
            b = f"{p}transformer.resblocks.{k}."
            self.norm(b + "ln_1", width)
            self.rand(b + "attn.in_proj_weight", 3 * width, width, std=width ** -0.5)
            self.rand(b + "attn.in_proj_bias", 3 * width)
            self.linear(b + "attn.out_proj", width, width)
            self.norm(b + "ln_2", width)
            self.linear(b + "mlp.c_fc", width, 4 * width)
            self.linear(b + "mlp.c_proj", 4 * width, width)
        self.norm(p + "ln_final", width)
        self.rand(p + "text_projection", width, width)
        self.sd[p + "logit_scale"] = self.torch.tensor(4.6052)

    # --- SwinIR (DiffBIR v1: pixel unshuffle 8, nearest+conv x8), with the buffers its state dict carries

    def swinir(self, p: str, dim: int, depths, heads, window: int, mlp_ratio: float, unshuffle: int = 8,
               img_size: int = 64) -> None:
        from miscnet.receiver.diffbir_swinir import relative_position_index, shift_mask

        self.conv(p + "conv_first.1", 3 * unshuffle ** 2, dim, 3)
        self.norm(p + "patch_embed.norm", dim)
        for i, (depth, h) in enumerate(zip(depths, heads, strict=True)):
            for j in range(depth):
                b = f"{p}layers.{i}.residual_group.blocks.{j}."
                self.norm(b + "norm1", dim)
                self.rand(b + "attn.relative_position_bias_table", (2 * window - 1) ** 2, h)
                self.sd[b + "attn.relative_position_index"] = relative_position_index(window)
                self.linear(b + "attn.qkv", dim, 3 * dim)
                self.linear(b + "attn.proj", dim, dim)
                self.norm(b + "norm2", dim)
                self.linear(b + "mlp.fc1", dim, int(dim * mlp_ratio))
                self.linear(b + "mlp.fc2", int(dim * mlp_ratio), dim)
                if j % 2:
                    self.sd[b + "attn_mask"] = shift_mask(img_size, img_size, window, window // 2)
            self.conv(f"{p}layers.{i}.conv", dim, dim, 3)
        self.norm(p + "norm", dim)
        self.conv(p + "conv_after_body", dim, dim, 3)
        self.conv(p + "conv_before_upsample.0", dim, 64, 3)
        for k in range(1, 4):
            self.conv(f"{p}conv_up{k}", 64, 64, 3)
        self.conv(p + "conv_hr", 64, 64, 3)
        self.conv(p + "conv_last", 64, 3, 3)


# DiffBIR v1's real sizes (its cldm.yaml and swinir.yaml), and the tiny ones the tests use
DIFFBIR_FULL = dict(mc=320, mults=(1, 2, 4, 4), layers=2, attention=(True, True, True, False), context=1024,
                    vae_ch=128, vae_mults=(1, 2, 4, 4), vae_layers=2, text_width=1024, text_blocks=24,
                    vocab=49408, swin_dim=180, swin_depths=(6,) * 8, swin_heads=(6,) * 8, swin_window=8,
                    swin_mlp=2.0)
DIFFBIR_TINY = dict(mc=64, mults=(1, 2), layers=1, attention=(False, True), context=64, vae_ch=32,
                    vae_mults=(1, 2), vae_layers=1, text_width=64, text_blocks=2, vocab=None, swin_dim=16,
                    swin_depths=(2,), swin_heads=(2,), swin_window=2, swin_mlp=2.0)


def diffbir_state_dict(sizes: dict, vocab: int, seed: int = 5, meta: bool = False) -> dict:
    """A random-weight DiffBIR v1 ``general_full_v1`` state dict of the given sizes, in its key layout
    (``meta``: shapes only, on torch's meta device)."""
    import torch

    from miscnet.receiver.diffbir import ddpm_scheduler

    w = _LdmWriter(seed, meta)
    z = sizes
    w.unet("model.diffusion_model.", z["mc"], z["mults"], z["layers"], z["attention"], z["context"])
    w.unet_encoder("control_model.", 8, z["mc"], z["mults"], z["layers"], z["attention"], z["context"],
                   zero_convs=True)
    w.vae("first_stage_model.", z["vae_ch"], z["vae_mults"], z["vae_layers"])
    w.vae_encoder("cond_encoder.", z["vae_ch"], z["vae_mults"], z["vae_layers"], 4)
    w.open_clip_text("cond_stage_model.model.", vocab, z["text_width"], z["text_blocks"])
    w.swinir("preprocess_model.", z["swin_dim"], z["swin_depths"], z["swin_heads"], z["swin_window"],
             z["swin_mlp"])
    schedule = ddpm_scheduler()  # LatentDiffusion's registered buffers
    w.sd["betas"] = schedule.betas.clone()
    w.sd["alphas_cumprod"] = schedule.alphas_cumprod.clone()
    w.sd["scale_factor"] = torch.tensor(0.18215)
    return w.sd


def write_tiny_diffbir(dest: Path, tok) -> None:
    """DiffBIR v1's layout at tiny sizes: general_full_v1.ckpt (a Lightning-style {'state_dict': ...} read
    with weights_only) and the CLIP tokenizer beside it."""
    import torch

    dest.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": diffbir_state_dict(DIFFBIR_TINY, len(tok))}, str(dest / "general_full_v1.ckpt"))
    tok.save_pretrained(str(dest / "tokenizer"))


# A minimal chat template in the ChatML layout that Qwen-family models use; images become <image>.
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_vlm(dest: Path, work: Path) -> None:
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tok = tiny_chat_tokenizer(work, specials)
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    ids = tok.convert_tokens_to_ids(specials)
    images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, chat_template=_CHAT_TEMPLATE, patch_size=14,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=ids[0], eos_token_id=ids[2],
                         pad_token_id=ids[0]),
        image_token_index=ids[3], image_seq_length=4, vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(4)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids[2]
    model.generation_config.pad_token_id = ids[0]
    model.save_pretrained(str(dest), safe_serialization=True)
    processor.save_pretrained(str(dest))


_README = """Tiny random-weight models written by `miscnet models tiny` for smoke tests.
Their outputs are noise; they only prove that the loading and decoding paths work without downloads.

  diffusion/   Stable Diffusion pipeline (UNet, VAE, CLIP text encoder, tokenizer, DDIM)  --diffusion-model
  controlnet/  ControlNet matching that UNet                                                  --controlnet-model
  upscaler/    Stable Diffusion upscaler pipeline                                             --upscaler-model
  clip/        CLIP model + tokenizer + image processor (map encoder)                        --clip-model
  vlm/         LLaVA-style vision-language chat model + processor (hf semantics)             --vlm-model
  diffbir/     DiffBIR v1 checkpoint in its own key layout (general_full_v1.ckpt) + tokenizer --diffbir-model

Use all of them at once with:  export MISCNET_MODELS_DIR={dest}
"""


def write_tiny_models(dest: str | os.PathLike[str], *, force: bool = False,
                      roles: tuple[str, ...] = TINY_ROLES) -> dict[str, Path]:
    """Write the tiny models under dest/<role>; return role -> folder. Existing folders need ``force``."""
    try:
        from miscnet.core.pretrained import quiet_loading, require_torch

        require_torch("miscnet models tiny")
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise MiscError("miscnet models tiny needs the model packages: pip install 'miscnet[models]'") from None
    unknown = [r for r in roles if r not in TINY_ROLES]
    if unknown:
        raise MiscError(f"unknown tiny model {unknown[0]!r} (available: {', '.join(TINY_ROLES)})")
    root = Path(dest).expanduser()
    if root.exists() and not root.is_dir():
        raise MiscError(f"{root} exists and is not a folder")
    clash = [r for r in roles if (root / r).exists()]
    if clash and not force:
        raise MiscError(f"{root / clash[0]} already exists (use --force to replace the tiny models)")
    root.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(dir=root, prefix=".tiny-") as tmp, quiet_loading():
        work = Path(tmp)
        clip_tok = tiny_clip_tokenizer(work) if set(roles) & {"diffusion", "upscaler", "clip", "diffbir"} else None
        for role in roles:
            stage = work / role
            if role == "diffusion":
                write_tiny_diffusion(stage, clip_tok)
            elif role == "controlnet":
                write_tiny_controlnet(stage)
            elif role == "upscaler":
                write_tiny_upscaler(stage, clip_tok)
            elif role == "clip":
                write_tiny_clip(stage, clip_tok)
            elif role == "diffbir":
                write_tiny_diffbir(stage, clip_tok)
            else:
                write_tiny_vlm(stage, work)
            final = root / role
            if final.exists():
                shutil.rmtree(final)
            os.replace(stage, final)  # each model appears whole or not at all
            written[role] = final
    (root / "README.txt").write_text(_README.format(dest=root))
    return written


# ============================================================================ net pixel codec (cheng2020-anchor)

TINY_NET_FILE = "cheng2020-anchor-tiny.pth.tar"
# The entropy coder tables a CompressAI model saves (empty until its update() runs); net.py rebuilds its own.
_COMPRESSAI_TABLES = ("entropy_bottleneck._offset", "entropy_bottleneck._quantized_cdf",
                      "entropy_bottleneck._cdf_length", "gaussian_conditional._offset",
                      "gaussian_conditional._quantized_cdf", "gaussian_conditional._cdf_length",
                      "gaussian_conditional.scale_table")


def tiny_net_state_dict(width: int = 8, seed: int = 0) -> dict:
    """A cheng2020-anchor state dict with seeded random weights, keyed exactly as CompressAI's
    ``Cheng2020Anchor(N=width).state_dict()`` is (its coder tables included, empty as before update())."""
    import torch

    from miscnet.core.pixel import net

    torch.manual_seed(seed)
    model = net._modules()["Cheng2020Anchor"](width)
    with torch.no_grad():  # spread the z prior's quantiles as a trained model's are, not CompressAI's init
        model.entropy_bottleneck.quantiles.copy_(torch.tensor([-6.0, 0.0, 6.0]).repeat(width, 1, 1))
    state = dict(model.state_dict())
    for key in _COMPRESSAI_TABLES:
        state[key] = torch.tensor([], dtype=torch.float32 if key.endswith("scale_table") else torch.int32)
    return state


def write_tiny_net(dest: str | os.PathLike[str], *, force: bool = False, width: int = 8, seed: int = 0) -> Path:
    """Write dest/cheng2020-anchor-tiny.pth.tar (torch.save of a plain state dict, as CompressAI's zoo
    files are); return its path. Outputs are noise: it proves the net codec's paths, not its pictures."""
    from miscnet.core.pixel.net import require_stack

    torch, _ = require_stack()
    folder = Path(dest).expanduser()
    path = folder / TINY_NET_FILE
    if path.exists() and not force:
        raise MiscError(f"{path} already exists (use --force to replace it)")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(tiny_net_state_dict(width, seed), tmp)
    os.replace(tmp, path)
    return path


def net_row(value: str | None = None) -> dict:
    """The `miscnet models` row of the net pixel codec: which weights file it would load, and whether it is there."""
    from miscnet.core.pixel.net import NET_MODEL_ENV, model_path

    row = {"layer": "pixel", "backend": "net", "role": "net", "env": NET_MODEL_ENV, "option": "--net-model",
           "what": "cheng2020-anchor learned codec (CompressAI-format state dict)"}
    try:
        path = model_path(value)
        row.update(model=str(path), source="option" if value else "configured", path=str(path), present=True,
                   problem=None)
    except MiscError as exc:
        row.update(model=value, source="option" if value else "unset", path=None, present=False, problem=str(exc))
    return row

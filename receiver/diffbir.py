"""DiffBIR v1, MISC's decoder, loaded from its released checkpoint into diffusers building blocks.

MISC's notebook restores with DiffBIR v1 (Lin et al., 2023; ``general_full_v1.ckpt``): SwinIR cleans the
degraded picture, the cleaned picture's VAE latent conditions a ControlNet on Stable Diffusion 2.1-base,
and IDDPM-respaced DDPM sampling draws the restoration from noise with classifier-free guidance against
the negative prompt; DiffBIR's sampler then applies the wavelet colour fix (done here by the decoder, per
pass, so it is visible to tests). One checkpoint holds everything, under these prefixes:

=================================  =====================================================================
``model.diffusion_model.``         SD 2.1 UNet (LDM layout)  -> diffusers ``UNet2DConditionModel``
``control_model.``                 ControlNet whose first convolution takes [noisy latent, condition
                                   latent] (8 channels) and no hint network -> diffusers
                                   ``ControlNetModel``, that convolution split exactly into ``conv_in``
                                   (the latent's 4 channels, with the bias) and a bias-free 3x3
                                   ``controlnet_cond_embedding`` (the condition's 4): conv(cat(x, c)) ==
                                   conv_x(x) + conv_c(c)
``first_stage_model.``             SD VAE (LDM layout)       -> diffusers ``AutoencoderKL``
``cond_encoder.``                  a second VAE encoder + quant_conv (the condition latent: its mode,
                                   times the latent scale)  -> diffusers ``Encoder`` + a 1x1 conv
``cond_stage_model.model.``        OpenCLIP ViT-H text tower, read at its penultimate layer -> transformers
                                   ``CLIPTextModel`` with the last block dropped
``preprocess_model.``              SwinIR (receiver/diffbir_swinir.py)
=================================  =====================================================================

The LDM -> diffusers key mapping of the SD parts is diffusers' own (``diffusers.loaders.single_file_utils``,
the code behind ``from_single_file``); the DiffBIR-specific parts are mapped here. Every size is read from
the checkpoint's tensors (heads: DiffBIR v1's 64 channels per head), so tiny test checkpoints in the same
layout load through the same code. Weights are read with safetensors or ``torch.load(weights_only=True)``
only (no pickled code runs). The tokenizer is not in the checkpoint: a CLIP tokenizer folder (SD 2.1's
``tokenizer/``) beside the checkpoint, or the configured diffusion model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils as sfu
from diffusers.models.autoencoders.vae import Encoder
from diffusers.utils import BaseOutput
from torch import nn

from miscnet.core.errors import MiscError
from miscnet.receiver.diffbir_checkpoint import read_checkpoint
from miscnet.receiver.diffbir_swinir import SwinIR, SwinIRConfig

PREFIXES = {"unet": "model.diffusion_model.", "controlnet": "control_model.", "vae": "first_stage_model.",
            "cond_encoder": "cond_encoder.", "text_encoder": "cond_stage_model.model.",
            "swinir": "preprocess_model."}
HEAD_CHANNELS = 64  # cldm.yaml: num_head_channels 64 (UNet, ControlNet); OpenCLIP text: width / 64 heads
LATENT_SCALE = 0.18215  # cldm.yaml scale_factor
NATIVE_LATENT = 64  # cldm.yaml image_size: SD 2.1-base's 512 px
TRAIN_STEPS, BETA_START, BETA_END = 1000, 0.00085, 0.0120  # cldm.yaml; LDM's "linear" is diffusers' scaled_linear
NORM_GROUPS = 32  # LDM's Normalize


def _part(sd: dict[str, torch.Tensor], prefix: str, path: Path) -> dict[str, torch.Tensor]:
    part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not part:
        raise MiscError(f"DiffBIR checkpoint {path} has no '{prefix}*' keys (not DiffBIR v1's full checkpoint; "
                        "the stage-1 SwinIR file alone is not enough)")
    return part


def _load(module: nn.Module, sd: dict, what: str, path: Path) -> None:
    sd = {k: v for k, v in sd.items() if v is not None}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        detail = "; ".join(p for p in (f"missing {', '.join(missing[:3])}" if missing else "",
                                       f"unexpected {', '.join(unexpected[:3])}" if unexpected else "") if p)
        raise MiscError(f"DiffBIR checkpoint {path}: its {what} does not match DiffBIR v1's layout ({detail})")


# ============================================================================ sizes from tensors


def _count(sd: dict, pattern: str) -> int:
    n = 0
    while any(k.startswith(pattern.format(n) + ".") for k in sd):
        n += 1
    return n


@dataclass(frozen=True)
class _UNetShape:
    in_channels: int
    model_channels: int
    block_out: tuple[int, ...]
    layers: int
    attention: tuple[bool, ...]
    context: int
    linear: bool

    def diffusers(self) -> dict:
        """The diffusers block layout of this LDM UNet (as create_unet_diffusers_config_from_ldm builds it)."""
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention))
        return dict(in_channels=self.in_channels, down_block_types=down, up_block_types=up,
                    block_out_channels=self.block_out, layers_per_block=self.layers,
                    cross_attention_dim=self.context, use_linear_projection=self.linear,
                    attention_head_dim=tuple(max(1, c // HEAD_CHANNELS) for c in self.block_out),
                    norm_num_groups=NORM_GROUPS)


def _unet_shape(sd: dict, what: str, path: Path) -> _UNetShape:
    try:
        first = sd["input_blocks.0.0.weight"]
        blocks = _count(sd, "input_blocks.{}")
        downs = sum(f"input_blocks.{i}.0.op.weight" in sd for i in range(blocks))
        levels = downs + 1
        layers = (blocks - 1 - downs) // levels
        heads = [1 + level * (layers + 1) for level in range(levels)]
        block_out = tuple(int(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]) for i in heads)
        attention = tuple(f"input_blocks.{i}.1.proj_in.weight" in sd for i in heads)
        context = next(int(v.shape[1]) for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
        with_attention = [i for i, a in zip(heads, attention, strict=True) if a]
        linear = sd[f"input_blocks.{with_attention[0]}.1.proj_in.weight"].ndim == 2
    except (KeyError, StopIteration, IndexError) as e:
        raise MiscError(f"DiffBIR checkpoint {path}: its {what} is not an LDM UNet (no {e})") from None
    return _UNetShape(int(first.shape[1]), int(first.shape[0]), block_out, layers, attention, context, linear)


def _vae_shape(sd: dict, path: Path) -> dict:
    try:
        levels = _count(sd, "encoder.down.{}")
        layers = _count(sd, "encoder.down.0.block.{}")
        block_out = tuple(int(sd[f"encoder.down.{i}.block.{layers - 1}.conv2.weight"].shape[0])
                          for i in range(levels))
        return dict(in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
                    out_channels=int(sd["decoder.conv_out.weight"].shape[0]) if "decoder.conv_out.weight" in sd else 3,
                    latent_channels=int(sd["quant_conv.weight"].shape[0]) // 2, block_out_channels=block_out,
                    layers_per_block=layers, norm_num_groups=NORM_GROUPS,
                    down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels)
    except KeyError as e:
        raise MiscError(f"DiffBIR checkpoint {path}: its VAE is not an LDM autoencoder (no {e})") from None


# ============================================================================ modules


class ConditionEncoder(nn.Module):
    """DiffBIR's condition encoder: a VAE encoder and quant_conv; the latent is the posterior's mode
    (its mean) times the latent scale, of the picture mapped to [-1, 1]."""

    def __init__(self, vae_config: dict, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.encoder = Encoder(in_channels=vae_config["in_channels"], out_channels=vae_config["latent_channels"],
                               down_block_types=vae_config["down_block_types"],
                               block_out_channels=vae_config["block_out_channels"],
                               layers_per_block=vae_config["layers_per_block"],
                               norm_num_groups=vae_config["norm_num_groups"], double_z=True)
        z = 2 * vae_config["latent_channels"]
        self.quant_conv = nn.Conv2d(z, z, 1)

    @property
    def device(self) -> torch.device:  # what diffusers' pipelines ask of their components
        return self.quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def forward(self, image01: torch.Tensor) -> torch.Tensor:
        moments = self.quant_conv(self.encoder(image01 * 2 - 1))
        return moments.chunk(2, dim=1)[0] * self.scale


def _latent_controlnet(shape: _UNetShape, sd: dict, path: Path) -> ControlNetModel:
    """DiffBIR's ControlNet as a diffusers ControlNetModel whose condition is a latent, not an image."""
    latent = shape.in_channels // 2
    cfg = shape.diffusers()
    del cfg["up_block_types"]
    cfg["in_channels"] = latent
    net = ControlNetModel(conditioning_channels=latent, conditioning_embedding_out_channels=(16,), **cfg)
    # DiffBIR concatenates [x, c] into its first convolution; the same sum, split over the two inputs
    net.controlnet_cond_embedding = nn.Conv2d(latent, shape.model_channels, 3, padding=1, bias=False)
    converted = sfu.convert_controlnet_checkpoint(sd, {"layers_per_block": shape.layers})
    both = converted.pop("conv_in.weight")
    converted["conv_in.weight"], converted["controlnet_cond_embedding.weight"] = both[:, :latent], both[:, latent:]
    _load(net, converted, "ControlNet", path)
    return net


def _text_encoder(sd: dict, tokenizer, path: Path):
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        width = int(sd["token_embedding.weight"].shape[1])
        vocab = int(sd["token_embedding.weight"].shape[0])
        positions = int(sd["positional_embedding"].shape[0])
        inner = int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    except KeyError as e:
        raise MiscError(f"DiffBIR checkpoint {path}: its text encoder is not an OpenCLIP text tower (no {e})") from None
    blocks = _count(sd, "transformer.resblocks.{}")
    if len(tokenizer) != vocab:
        raise MiscError(f"DiffBIR tokenizer has {len(tokenizer)} tokens but the checkpoint's text encoder has "
                        f"{vocab} (use SD 2.1's tokenizer folder)")
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=inner,
                            num_hidden_layers=blocks - 1,  # DiffBIR reads the penultimate layer (then ln_final)
                            num_attention_heads=max(1, width // HEAD_CHANNELS), max_position_embeddings=positions,
                            hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=width,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    model = CLIPTextModel(config)
    last = f"transformer.resblocks.{blocks - 1}."
    prefix = PREFIXES["text_encoder"]
    kept = {prefix + k: v for k, v in sd.items()
            if not k.startswith(last) and k not in ("logit_scale", "text_projection", "attn_mask")}
    converted = sfu.convert_open_clip_checkpoint(model, kept, prefix=prefix)
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 dropped the wrapper
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    _load(model, converted, "text encoder", path)
    return model


def respaced_timesteps(steps: int, total: int = TRAIN_STEPS) -> list[int]:
    """IDDPM's respacing of ``total`` training steps into ``steps`` (DiffBIR's SpacedSampler, one section):
    evenly strided from 0 to total - 1, each rounded; descending, as diffusers' schedulers take them."""
    if not 1 <= steps <= total:
        raise MiscError(f"DiffBIR sampling steps must be 1..{total}, not {steps}")
    stride = (total - 1) / (steps - 1) if steps > 1 else 1
    taken, at = [], 0.0
    for _ in range(steps):
        taken.append(round(at))
        at += stride
    return sorted(set(taken), reverse=True)


def ddpm_scheduler() -> DDPMScheduler:
    """DiffBIR's sampler as a diffusers scheduler: DDPM posterior steps, "fixed_small" variance, no clipping."""
    return DDPMScheduler(num_train_timesteps=TRAIN_STEPS, beta_start=BETA_START, beta_end=BETA_END,
                         beta_schedule="scaled_linear", variance_type="fixed_small", clip_sample=False,
                         prediction_type="epsilon")


# ============================================================================ the pipeline


@dataclass
class DiffBIROutput(BaseOutput):
    images: list  # float (H, W, 3), about [0, 1], not clipped (DiffBIR colour-fixes before clamping)
    conditions: list  # SwinIR's cleaned input, float (H, W, 3): what the colour fix takes low frequencies from


class DiffBIRPipeline(DiffusionPipeline):
    """One DiffBIR v1 restoration: ``pipe(image=float (H, W, 3) in [0, 1], prompt, negative_prompt,
    num_inference_steps, guidance_scale, generator)``; H and W multiples of ``multiple``."""

    model_cpu_offload_seq = "text_encoder->swinir->cond_encoder->controlnet->unet->vae"

    def __init__(self, unet, controlnet, vae, cond_encoder, text_encoder, tokenizer, scheduler, swinir) -> None:
        super().__init__()
        self.register_modules(unet=unet, controlnet=controlnet, vae=vae, cond_encoder=cond_encoder,
                              text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, swinir=swinir)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def multiple(self) -> int:
        unet = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        return math.lcm(8, unet, self.swinir.config.multiple)

    def text_to_image_pipeline(self) -> StableDiffusionPipeline:
        """SD 2.1-base text to image over the same UNet, VAE and text encoder (for stages without pixels)."""
        scheduler = DDIMScheduler(num_train_timesteps=TRAIN_STEPS, beta_start=BETA_START, beta_end=BETA_END,
                                  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                  steps_offset=1)
        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def _embed(self, texts: list[str], device) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0]

    @torch.no_grad()
    def __call__(self, image, prompt: str, negative_prompt: str = "", num_inference_steps: int = 50,
                 guidance_scale: float = 1.0, generator: torch.Generator | None = None,
                 output_type: str = "np") -> DiffBIROutput:
        device = self._execution_device
        dtype = self.unet.dtype
        picture = np.asarray(image, dtype=np.float32)
        h, w = picture.shape[:2]
        if h % self.multiple or w % self.multiple:
            raise MiscError(f"DiffBIR input {w}x{h} is not a multiple of {self.multiple}")
        x = torch.from_numpy(picture).permute(2, 0, 1)[None].to(device, dtype)
        condition = self.swinir(x)  # stage 1: the cleaned picture (not clamped, as in DiffBIR)
        c_latent = self.cond_encoder(condition)
        guided = guidance_scale != 1.0  # DiffBIR skips the unconditional branch at cfg 1
        texts = [negative_prompt, prompt] if guided else [prompt]
        context = self._embed(texts, device).to(dtype)
        hint = torch.cat([c_latent] * len(texts))
        self.scheduler.set_timesteps(timesteps=respaced_timesteps(num_inference_steps), device=device)
        vs = self.vae_scale_factor
        noise_shape = (1, self.unet.config.in_channels, h // vs, w // vs)
        # the sampler's own arithmetic stays in fp32 (as DiffBIR v1 runs); only the networks take ``dtype``
        latents = torch.randn(noise_shape, generator=generator, dtype=torch.float32).to(device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents] * len(texts)).to(dtype)
            downs, mid = self.controlnet(model_in, t, encoder_hidden_states=context, controlnet_cond=hint,
                                         return_dict=False)
            eps = self.unet(model_in, t, encoder_hidden_states=context, down_block_additional_residuals=downs,
                            mid_block_additional_residual=mid, return_dict=False)[0].float()
            if guided:
                uncond, cond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(eps, t, latents, generator=generator).prev_sample
        pixels = (self.vae.decode((latents / self.vae.config.scaling_factor).to(dtype)).sample + 1) / 2

        def to_np(t: torch.Tensor) -> np.ndarray:
            return t[0].permute(1, 2, 0).float().cpu().numpy()

        return DiffBIROutput(images=[to_np(pixels)], conditions=[to_np(condition)])


# ============================================================================ loading


def _tokenizer(checkpoint: Path, tokenizer_from: Path | None):
    from transformers import CLIPTokenizer

    tried = [checkpoint.parent / "tokenizer"]
    if tokenizer_from is not None:
        tried.append(Path(tokenizer_from) / "tokenizer")
    for folder in tried:
        if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
            return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    raise MiscError(f"no CLIP tokenizer for DiffBIR (tried {', '.join(str(p) for p in tried)}): copy SD 2.1's "
                    "tokenizer/ folder beside the checkpoint, or give --diffusion-model")


def _check_schedule(sd: dict, path: Path) -> None:
    """A checkpoint that carries its training schedule must carry DiffBIR v1's."""
    if "alphas_cumprod" in sd:
        expect = ddpm_scheduler().alphas_cumprod
        got = sd["alphas_cumprod"].double().cpu()
        if got.shape != expect.shape or not torch.allclose(got, expect.double(), atol=1e-5):
            raise MiscError(f"DiffBIR checkpoint {path} was trained with another noise schedule than "
                            f"{TRAIN_STEPS} steps, betas {BETA_START}..{BETA_END} (scaled linear)")


def load_diffbir(path: Path, *, tokenizer_from: Path | None = None, dtype=None) -> DiffBIRPipeline:
    """Every DiffBIR v1 component from one checkpoint file, as a DiffBIRPipeline (on the CPU, in ``dtype``)."""
    path = Path(path)
    sd = read_checkpoint(path)
    _check_schedule(sd, path)
    return diffbir_from_state_dict(sd, _tokenizer(path, tokenizer_from), path, dtype=dtype)


def diffbir_from_state_dict(sd: dict, tokenizer, path: Path | str, *, dtype=None) -> DiffBIRPipeline:
    """The pipeline from a checkpoint's tensors (``path`` only names them in messages)."""
    parts = {name: _part(sd, prefix, path) for name, prefix in PREFIXES.items()}
    scale = float(sd["scale_factor"]) if "scale_factor" in sd else LATENT_SCALE

    shape = _unet_shape(parts["unet"], "UNet", path)
    out_channels = int(parts["unet"]["out.2.weight"].shape[0]) if "out.2.weight" in parts["unet"] else 4
    unet = UNet2DConditionModel(sample_size=NATIVE_LATENT, out_channels=out_channels, **shape.diffusers())
    ldm = {PREFIXES["unet"] + k: v for k, v in parts["unet"].items()}
    _load(unet, sfu.convert_ldm_unet_checkpoint(ldm, unet.config), "UNet", path)

    control_shape = _unet_shape(parts["controlnet"], "ControlNet", path)
    if control_shape.in_channels != 2 * shape.in_channels:
        raise MiscError(f"DiffBIR checkpoint {path}: its ControlNet takes {control_shape.in_channels} channels, not "
                        f"the latent and the condition latent ({2 * shape.in_channels})")
    controlnet = _latent_controlnet(control_shape, parts["controlnet"], path)

    vae_config = _vae_shape(parts["vae"], path)
    vae = AutoencoderKL(scaling_factor=scale, **vae_config)
    ldm = {PREFIXES["vae"] + k: v for k, v in parts["vae"].items()}
    _load(vae, sfu.convert_ldm_vae_checkpoint(ldm, vae.config), "VAE", path)

    cond_encoder = ConditionEncoder(vae_config, scale)
    ldm = {PREFIXES["vae"] + k: v for k, v in parts["cond_encoder"].items()}
    converted = sfu.convert_ldm_vae_checkpoint(ldm, vae.config)
    _load(cond_encoder, {k: v for k, v in converted.items() if k.startswith(("encoder.", "quant_conv."))},
          "condition encoder", path)

    text_encoder = _text_encoder(parts["text_encoder"], tokenizer, path)

    swin_sd = {k: v for k, v in parts["swinir"].items()
               if not k.endswith(("attn_mask", "relative_position_index")) and not k.startswith("lpips_metric.")}
    swinir = SwinIR(SwinIRConfig.from_state_dict(swin_sd, f"DiffBIR checkpoint {path}"))
    _load(swinir, swin_sd, "SwinIR", path)

    modules = (unet, controlnet, vae, cond_encoder, text_encoder, swinir)
    for m in modules:
        m.eval().requires_grad_(False)
        if dtype is not None:
            m.to(dtype)
    return DiffBIRPipeline(unet=unet, controlnet=controlnet, vae=vae, cond_encoder=cond_encoder,
                           text_encoder=text_encoder, tokenizer=tokenizer, scheduler=ddpm_scheduler(),
                           swinir=swinir)

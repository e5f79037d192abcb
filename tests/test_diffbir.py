"""DiffBIR v1 (receiver/diffbir*.py) from tiny random checkpoints written in DiffBIR's own key layout
(experiments/models.py writes them from the architecture, not from the loader's modules): where each
checkpoint tensor lands, the sampler's schedule against IDDPM's respacing, SwinIR's windows, the
pipeline's calls, safe reading, and the one-line errors."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from miscnet.core.errors import MiscError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from miscnet.experiments.models import write_tiny_models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dest = tmp_path_factory.mktemp("diffbir")
    write_tiny_models(dest, roles=("diffbir",))
    yield dest / "diffbir"
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tiny):
    from miscnet.receiver.diffbir_checkpoint import read_checkpoint

    return read_checkpoint(tiny / "general_full_v1.ckpt")


@pytest.fixture(scope="module")
def pipe(tiny):
    from miscnet.receiver.diffbir import load_diffbir

    p = load_diffbir(tiny / "general_full_v1.ckpt")
    p.set_progress_bar_config(disable=True)
    return p


def _fingerprints(tensors) -> list[tuple[int, float]]:
    return sorted((t.numel(), round(float(t.double().abs().sum()), 3)) for t in tensors)


# ============================================================================ where the tensors land


def test_every_checkpoint_tensor_is_used_once(pipe, checkpoint):
    """Per component, the loaded parameters are the checkpoint's tensors, each once (up to reshapes and the
    ControlNet's split first convolution), nothing invented and nothing left over."""
    def part(prefix, drop=()):
        return [v for k, v in checkpoint.items() if k.startswith(prefix) and not any(d in k for d in drop)]

    assert _fingerprints(pipe.unet.state_dict().values()) == _fingerprints(part("model.diffusion_model."))
    assert _fingerprints(pipe.vae.state_dict().values()) == _fingerprints(part("first_stage_model."))
    assert _fingerprints(pipe.cond_encoder.state_dict().values()) == _fingerprints(part("cond_encoder."))
    swin = part("preprocess_model.", drop=("attn_mask", "relative_position_index"))
    assert _fingerprints(pipe.swinir.state_dict().values()) == _fingerprints(swin)
    control = pipe.controlnet.state_dict()
    split = control.pop("conv_in.weight"), control.pop("controlnet_cond_embedding.weight")
    whole = checkpoint["control_model.input_blocks.0.0.weight"]
    assert torch.equal(torch.cat(split, dim=1), whole)
    rest = [v for k, v in checkpoint.items()
            if k.startswith("control_model.") and k != "control_model.input_blocks.0.0.weight"]
    assert _fingerprints(control.values()) == _fingerprints(rest)


def test_text_encoder_is_the_penultimate_open_clip_layer(pipe, checkpoint):
    p = "cond_stage_model.model."
    blocks = 1 + max(int(k.split(".")[4]) for k in checkpoint if k.startswith(p + "transformer.resblocks."))
    enc = pipe.text_encoder
    assert enc.config.num_hidden_layers == blocks - 1  # the last block is never run
    sd = enc.state_dict()
    key = next(k for k in sd if k.endswith("layers.0.self_attn.q_proj.weight"))
    width = enc.config.hidden_size
    qkv = checkpoint[p + "transformer.resblocks.0.attn.in_proj_weight"]
    assert torch.equal(sd[key], qkv[:width])
    assert torch.equal(sd[key.replace("q_proj", "v_proj")], qkv[2 * width:])
    def named(end):
        return sd[next(k for k in sd if k.endswith(end))]

    assert torch.equal(named("token_embedding.weight"), checkpoint[p + "token_embedding.weight"])
    assert torch.equal(named("final_layer_norm.weight"), checkpoint[p + "ln_final.weight"])
    # what the UNet reads: the penultimate block's output through ln_final, computed here by hand
    ids = pipe.tokenizer(["a red box"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = checkpoint[p + "token_embedding.weight"][ids] + checkpoint[p + "positional_embedding"]
    causal = torch.full((77, 77), float("-inf")).triu(1)
    for b in range(blocks - 1):
        r = f"{p}transformer.resblocks.{b}."
        h = torch.nn.functional.layer_norm(x, (width,), checkpoint[r + "ln_1.weight"], checkpoint[r + "ln_1.bias"])
        q, k, v = (h @ checkpoint[r + "attn.in_proj_weight"].T + checkpoint[r + "attn.in_proj_bias"]).chunk(3, -1)
        heads = width // 64
        split = [t.view(1, 77, heads, -1).transpose(1, 2) for t in (q, k, v)]
        a = torch.nn.functional.scaled_dot_product_attention(*split, attn_mask=causal)
        a = a.transpose(1, 2).reshape(1, 77, width)
        x = x + a @ checkpoint[r + "attn.out_proj.weight"].T + checkpoint[r + "attn.out_proj.bias"]
        h = torch.nn.functional.layer_norm(x, (width,), checkpoint[r + "ln_2.weight"], checkpoint[r + "ln_2.bias"])
        h = torch.nn.functional.gelu(h @ checkpoint[r + "mlp.c_fc.weight"].T + checkpoint[r + "mlp.c_fc.bias"])
        x = x + h @ checkpoint[r + "mlp.c_proj.weight"].T + checkpoint[r + "mlp.c_proj.bias"]
    x = torch.nn.functional.layer_norm(x, (width,), checkpoint[p + "ln_final.weight"], checkpoint[p + "ln_final.bias"])
    with torch.no_grad():
        assert torch.allclose(pipe._embed(["a red box"], "cpu"), x, atol=1e-4)


def test_controlnet_first_convolution_is_the_concatenation(pipe, checkpoint):
    """conv_in(x) + cond_embedding(c) == DiffBIR's conv over cat(x, c)."""
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    w, b = checkpoint["control_model.input_blocks.0.0.weight"], checkpoint["control_model.input_blocks.0.0.bias"]
    net = pipe.controlnet
    with torch.no_grad():
        ours = net.conv_in(x) + net.controlnet_cond_embedding(c)
    assert torch.allclose(ours, torch.nn.functional.conv2d(torch.cat([x, c], 1), w, b, padding=1), atol=1e-5)


def test_condition_encoder_is_the_scaled_posterior_mode(pipe, checkpoint):
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        latent = pipe.cond_encoder(img)
        # the same weights through diffusers' own AutoencoderKL encoder path: mode of the posterior
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_config(pipe.vae.config)
        vae.encoder.load_state_dict(pipe.cond_encoder.encoder.state_dict())
        vae.quant_conv.load_state_dict(pipe.cond_encoder.quant_conv.state_dict())
        expect = vae.encode(img * 2 - 1).latent_dist.mode() * float(checkpoint["scale_factor"])
    assert torch.allclose(latent, expect, atol=1e-5)
    assert not torch.allclose(latent, pipe.vae.encode(img * 2 - 1).latent_dist.mode() * 0.18215, atol=1e-3)


# ============================================================================ the sampler


def test_respacing_is_iddpm_one_section():
    from miscnet.receiver.diffbir import respaced_timesteps

    assert respaced_timesteps(3) == [999, 500, 0]  # round(0), round(499.5) (to even), round(999)
    forty = respaced_timesteps(40)
    assert len(forty) == 40 and forty[0] == 999 and forty[-1] == 0
    assert forty[-2] == round(999 / 39)  # the evenly strided steps, rounded
    assert respaced_timesteps(1) == [0]
    with pytest.raises(MiscError, match="1..1000"):
        respaced_timesteps(0)


def test_scheduler_step_is_the_respaced_ddpm_posterior():
    """diffusers' DDPM step over the respaced timesteps == IDDPM's respaced posterior (fixed_small), by hand."""
    from miscnet.receiver.diffbir import ddpm_scheduler, respaced_timesteps

    s = ddpm_scheduler()
    steps = respaced_timesteps(3)
    s.set_timesteps(timesteps=steps)
    betas = (np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2)  # LDM's "linear"
    abar = np.cumprod(1 - betas)[sorted(steps)]  # respaced: keep the kept steps' alpha-bar
    abar_prev = np.append(1.0, abar[:-1])
    beta = 1 - abar / abar_prev
    coef1 = beta * np.sqrt(abar_prev) / (1 - abar)
    coef2 = (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar)
    var = beta * (1 - abar_prev) / (1 - abar)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    for i, t in enumerate(steps):
        idx = len(steps) - 1 - i
        gen = torch.Generator().manual_seed(10 + i)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + i), dtype=torch.float64)
        x0 = (x - math.sqrt(1 - abar[idx]) * eps) / math.sqrt(abar[idx])
        expect = coef1[idx] * x0 + coef2[idx] * x + (math.sqrt(var[idx]) * noise if idx else 0)
        got = s.step(eps, t, x, generator=gen).prev_sample
        assert torch.allclose(got, expect, atol=1e-6), t
        x = got


def test_pipeline_runs_the_steps_with_guidance_against_the_negative_prompt(pipe):
    calls = {"unet": [], "controlnet": []}
    hooks = [getattr(pipe, name).register_forward_hook(
        lambda m, args, kwargs, out, name=name: calls[name].append(args[0].shape[0]), with_kwargs=True)
        for name in calls]
    img = np.random.default_rng(0).random((32, 48, 3)).astype(np.float32)
    try:
        out = pipe(image=img, prompt="a red box", negative_prompt="Blurry, Low Quality", num_inference_steps=3,
                   guidance_scale=3.5, generator=torch.Generator().manual_seed(0))
        assert calls == {"unet": [2, 2, 2], "controlnet": [2, 2, 2]}  # 3 steps, [negative, prompt] batched
        calls["unet"].clear(), calls["controlnet"].clear()
        plain = pipe(image=img, prompt="a red box", negative_prompt="x", num_inference_steps=2, guidance_scale=1.0,
                     generator=torch.Generator().manual_seed(0))
        assert calls == {"unet": [1, 1], "controlnet": [1, 1]}  # cfg 1: no unconditional branch, as DiffBIR
    finally:
        for h in hooks:
            h.remove()
    assert out.images[0].shape == (32, 48, 3) and out.conditions[0].shape == (32, 48, 3)
    with torch.no_grad():
        swin = pipe.swinir(torch.from_numpy(img).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert np.allclose(out.conditions[0], swin, atol=1e-5)  # the condition is SwinIR's cleaned picture
    again = pipe(image=img, prompt="a red box", negative_prompt="Blurry, Low Quality", num_inference_steps=3,
                 guidance_scale=3.5, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(again.images[0], out.images[0])
    assert not np.allclose(plain.images[0], out.images[0])
    with pytest.raises(MiscError, match="not a multiple of 16"):
        pipe(image=img[:30], prompt="a", num_inference_steps=1)


# ============================================================================ SwinIR


def test_swinir_windows():
    from miscnet.receiver.diffbir_swinir import relative_position_index, shift_mask

    idx = relative_position_index(3)
    assert idx.shape == (9, 9) and idx.min() == 0 and idx.max() == 24
    assert (idx.diagonal() == 12).all()  # zero offset: the table's centre row
    assert idx[0, 8] == 0 and idx[8, 0] == 24  # offsets (-2, -2) and (+2, +2)
    mask = shift_mask(8, 8, 4, 2)  # four windows; only the top-left one holds a single region
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all() and (mask[1:] == -100).any(dim=(1, 2)).all()
    assert set(mask.unique().tolist()) == {0.0, -100.0}


def test_swinir_keeps_the_size_and_pads_what_does_not_divide(pipe):
    sw = pipe.swinir
    assert sw.config.unshuffle == 8 and sw.config.upscale == 8 and sw.config.window_size == 2
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = sw(x)
        z = sw(x[..., :30, :40])
    assert y.shape == x.shape and z.shape == (1, 3, 30, 40)
    assert not torch.allclose(y, x)


# ============================================================================ files and errors


def test_safetensors_and_torch_files_load_the_same(tiny, checkpoint, tmp_path, pipe):
    from safetensors.torch import save_file

    from miscnet.receiver.diffbir import load_diffbir

    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(tmp_path / "general_full_v1.safetensors"))
    (tmp_path / "tokenizer").symlink_to(tiny / "tokenizer")
    other = load_diffbir(tmp_path / "general_full_v1.safetensors")
    for a, b in zip(other.unet.state_dict().values(), pipe.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)


class Payload:
    """Stands for any pickled object a checkpoint could smuggle in (its class would be imported and run)."""


def test_pickled_code_is_refused(tmp_path):
    from miscnet.receiver.diffbir_checkpoint import read_checkpoint

    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": Payload()}, str(bad))
    with pytest.raises(MiscError, match="could not be read as weights only") as e:
        read_checkpoint(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(MiscError, match="junk.ckpt could not be read"):
        read_checkpoint(tmp_path / "junk.ckpt")


def test_wrong_layouts_are_one_line_errors(tiny, checkpoint, tmp_path):
    from miscnet.receiver.diffbir import load_diffbir

    (tmp_path / "tokenizer").symlink_to(tiny / "tokenizer")
    stage1 = {k: v for k, v in checkpoint.items() if k.startswith("preprocess_model.")}
    torch.save(stage1, str(tmp_path / "swinir_only.ckpt"))
    with pytest.raises(MiscError, match="no 'model.diffusion_model.\\*' keys"):
        load_diffbir(tmp_path / "swinir_only.ckpt")
    broken = dict(checkpoint)
    broken.pop("control_model.zero_convs.0.0.weight")
    torch.save(broken, str(tmp_path / "broken.ckpt"))
    with pytest.raises(MiscError, match="its ControlNet does not match DiffBIR v1's layout \\(missing "
                                        "controlnet_down_blocks.0.weight\\)"):
        load_diffbir(tmp_path / "broken.ckpt")
    other = dict(checkpoint)
    other["alphas_cumprod"] = other["alphas_cumprod"] ** 2
    torch.save(other, str(tmp_path / "other.ckpt"))
    with pytest.raises(MiscError, match="another noise schedule"):
        load_diffbir(tmp_path / "other.ckpt")
    alone = tmp_path / "alone"
    alone.mkdir()
    torch.save(checkpoint, str(alone / "general_full_v1.ckpt"))
    with pytest.raises(MiscError, match="no CLIP tokenizer for DiffBIR \\(tried .*alone/tokenizer\\)"):
        load_diffbir(alone / "general_full_v1.ckpt")


def test_resolving_the_checkpoint(tiny, tmp_path, monkeypatch):
    from miscnet.receiver.diffbir_checkpoint import resolve_checkpoint

    for var in ("MISCNET_DIFFBIR_MODEL", "MISCNET_MODELS_DIR"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_checkpoint(str(tiny)) == tiny / "general_full_v1.ckpt"
    assert resolve_checkpoint(str(tiny / "general_full_v1.ckpt")) == tiny / "general_full_v1.ckpt"
    monkeypatch.setenv("MISCNET_DIFFBIR_MODEL", str(tiny))
    assert resolve_checkpoint() == tiny / "general_full_v1.ckpt"
    nope = tmp_path / "nope.ckpt"
    for value, match in [(str(nope), f"DiffBIR model {nope} \\(option\\) does not exist"),
                         (str(tmp_path), "holds no checkpoint")]:
        with pytest.raises(MiscError, match=match) as e:
            resolve_checkpoint(value)
        assert "\n" not in str(e.value)
    monkeypatch.delenv("MISCNET_DIFFBIR_MODEL")
    with pytest.raises(MiscError, match="no DiffBIR model configured: give --diffbir-model"):
        resolve_checkpoint()


def test_decode_command_with_diffbir(tiny, tmp_path):
    """The done criterion: `decode --decoder diffusion --restore diffbir` runs every pass, on CPU."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "miscnet.cli.main"]
    sem = tmp_path / "s.json"
    sem.write_text('{"objects": [{"name": "box", "detail": "a flat red box.", "box": [0.1, 0.2, 0.5, 0.7]}], '
                   '"caption": "A red box on grey."}')
    from PIL import Image

    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    r = subprocess.run([*cli, "encode", str(tmp_path / "a.png"), "--semantics", str(sem), "--map", "boxes",
                        "-o", str(tmp_path / "a.misc")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cli, "decode", str(tmp_path / "a.misc"), "--decoder", "diffusion", "--restore", "diffbir",
                        "--diffbir-model", str(tiny), "--device", "cpu", "--diffusion-size", "64", "--steps", "2",
                        "-o", str(tmp_path / "out.png"), "--stages", str(tmp_path / "stages")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "out.png").size == (80, 48)
    assert len(list((tmp_path / "stages").glob("*.png"))) >= 3
    r = subprocess.run([*cli, "decode", str(tmp_path / "a.misc"), "--decoder", "diffusion", "--restore", "diffbir",
                        "--diffbir-model", str(tmp_path / "missing.ckpt"), "-o", str(tmp_path / "x.png")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and str(tmp_path / "missing.ckpt") in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


# ============================================================================ the GPU check


def test_gpu_check_tiny_runs_every_pass(tiny, capsys):  # (tiny: one torch thread)
    from miscnet.experiments.gpu_check import main

    assert main(["--tiny", "--sizes", "32", "--steps", "1", "--object-steps", "1", "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    passes = report["sizes"]["32"]["passes"]
    assert [(r["stage"], r["pass"]) for r in passes] == [
        ("semantic", "text-to-image"), ("map", "text-to-image"), ("map", "object 1"), ("map", "object 2"),
        ("map", "object 3"), ("pixel.0", "reference"), ("pixel.0", "object 1"), ("pixel.0", "object 2"),
        ("pixel.0", "object 3"), ("pixel.0", "global")]
    assert all(r["seconds"] >= 0 for r in passes) and report["dtype"] == "float32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the check itself")
def test_gpu_check_without_cuda_says_so(capsys):
    from miscnet.experiments.gpu_check import NOT_RUN, main

    assert main([]) == NOT_RUN
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no CUDA GPU" in err


def test_full_size_layout_loads_as_sd21(tmp_path):
    """DiffBIR v1's real sizes, shapes only (torch's meta device): the mapping holds at full size and the
    components have SD 2.1-base's parameter counts (UNet 865,910,724; VAE 83,653,863)."""
    from miscnet.experiments.models import DIFFBIR_FULL, diffbir_state_dict, tiny_clip_tokenizer
    from miscnet.receiver.diffbir import diffbir_from_state_dict

    tok = tiny_clip_tokenizer(tmp_path)
    sd = diffbir_state_dict(DIFFBIR_FULL, len(tok), meta=True)
    with torch.device("meta"):
        p = diffbir_from_state_dict(sd, tok, "full size")

    def count(m):
        return sum(x.numel() for x in m.parameters())

    assert count(p.unet) == 865_910_724 and count(p.vae) == 83_653_863
    assert p.unet.config.attention_head_dim == (5, 10, 20, 20) and p.unet.config.cross_attention_dim == 1024
    assert p.text_encoder.config.num_hidden_layers == 23 and p.text_encoder.config.num_attention_heads == 16
    assert p.swinir.config.embed_dim == 180 and p.swinir.config.depths == (6,) * 8
    assert p.multiple == 64  # as MISC's notebook pads: pad(x, scale=64)


def test_bf16_networks_keep_an_fp32_sampler(tiny):
    """bf16 (what CUDA gets where supported) runs; the sampler's latents stay fp32."""
    from miscnet.receiver.diffbir import load_diffbir

    p = load_diffbir(tiny / "general_full_v1.ckpt", dtype=torch.bfloat16)
    p.set_progress_bar_config(disable=True)
    assert p.unet.dtype == torch.bfloat16 and p.swinir.dtype == torch.bfloat16
    seen, step = [], p.scheduler.step

    def watched(eps, t, x, **kw):
        seen.append((eps.dtype, x.dtype))
        return step(eps, t, x, **kw)

    p.scheduler.step = watched
    img = np.random.default_rng(3).random((16, 16, 3)).astype(np.float32)
    out = p(image=img, prompt="a box", negative_prompt="Blurry, Low Quality", num_inference_steps=2, guidance_scale=2.0,
            generator=torch.Generator().manual_seed(0))
    assert seen == [(torch.float32, torch.float32)] * 2
    assert np.isfinite(out.images[0]).all()


def test_a_model_asks_for_its_dtype(tmp_path):
    import json

    from miscnet.core.pretrained import asked_dtype, pick_device

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert asked_dtype(tmp_path) == "float16" and asked_dtype(None) is None
    assert asked_dtype(tmp_path / "nowhere") is None
    assert pick_device("cpu", "float16") == ("cpu", torch.float32)  # the CPU stays fp32 whatever is asked

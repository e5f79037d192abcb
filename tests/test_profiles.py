"""Cost profiles (experiments/profiles.py, experiments/profiles/, miscnet profile): the interpolation rules,
strict loading with one-line errors, the committed profiles, and the command on both decoders. No
assertion depends on how fast this machine is."""

import json
import math

import numpy as np
import pytest

from miscnet.cli.main import main
from miscnet.core.errors import MiscError
from miscnet.experiments.profiles import (
    KINDS,
    PROFILES_DIR,
    CostProfile,
    ProfileError,
    committed_profiles,
    estimate_diffusion_profile,
    load_profile,
    measure_profile,
    sd21_base_configs,
    stage_kind,
)


def profile(points, origin="", **kw) -> CostProfile:
    return CostProfile(decoder=kw.get("decoder", "classical"), device="cpu", source="hand-made test profile",
                       estimate=False, points=points, origin=origin)


def full(pts) -> dict:
    return {k: list(pts) for k in KINDS}


# ============================================================================ interpolation


def test_log_log_between_points_and_exact_at_them():
    p = profile(full([(100, 1, 1.0, 2.0), (10_000, 1, 10.0, 20.0)]))
    assert p.service_time("semantic", 100) == 1.0
    assert p.service_time("semantic", 10_000) == 10.0
    # a power law through both points (exponent 0.5), not a straight line (which would give 3.0 at 1000)
    assert p.service_time("semantic", 1000) == pytest.approx(math.sqrt(10))
    assert p.peak_mb("semantic", 1000) == pytest.approx(2 * math.sqrt(10))
    # three points: each segment has its own exponent
    q = profile(full([(100, 1, 1.0, 0.0), (400, 1, 4.0, 0.0), (1600, 1, 8.0, 0.0)]))
    assert q.service_time("map", 200) == pytest.approx(2.0)  # exponent 1
    assert q.service_time("map", 800) == pytest.approx(4.0 * 2**0.5)  # exponent 0.5


def test_extrapolation_is_proportional_to_pixels():
    p = profile(full([(100, 1, 1.0, 1.0), (10_000, 1, 10.0, 5.0)]))
    assert p.service_time("pixel.0", 50) == pytest.approx(0.5)
    assert p.service_time("pixel.0", 40_000) == pytest.approx(40.0)
    assert p.peak_mb("pixel.0", 20_000) == pytest.approx(10.0)
    one = profile(full([(1000, 1, 2.0, 1.0)]))
    assert one.service_time("map", 500) == pytest.approx(1.0)
    assert one.service_time("map", 4000) == pytest.approx(8.0)


def test_zero_peak_memory_interpolates_linearly():
    p = profile(full([(100, 1, 1.0, 0.0), (300, 1, 3.0, 4.0)]))
    assert p.peak_mb("semantic", 200) == pytest.approx(2.0)


def test_batch_rule():
    p = profile(full([(1000, 1, 2.0, 1.0), (1000, 4, 5.0, 2.0), (4000, 1, 8.0, 1.0), (4000, 4, 20.0, 2.0)]))
    assert p.service_time("map", 1000, 1) == 2.0 and p.service_time("map", 1000, 4) == 5.0
    assert p.service_time("map", 1000, 2) == pytest.approx(3.0)  # linear between measured batches
    assert p.service_time("map", 1000, 8) == pytest.approx(9.0)  # linear through the two largest beyond
    assert p.service_time("map", 2000, 4) == pytest.approx(10.0)  # each batch's curve in pixels first
    assert p.service_time("map", 2000, 2) == pytest.approx(4.0 + (10.0 - 4.0) / 3)
    only_one = profile(full([(1000, 1, 2.0, 1.0)]))
    assert only_one.service_time("pixel.1", 1000, 3) == pytest.approx(6.0)  # one after another
    assert only_one.service_time("pixel.1", np.int64(1000), np.int64(3)) == pytest.approx(6.0)
    from_two = profile(full([(1000, 2, 2.0, 1.0)]))
    assert from_two.service_time("pixel.1", 1000, 1) == pytest.approx(1.0)  # below the smallest: proportional
    falling = profile(full([(1000, 1, 3.0, 1.0), (1000, 2, 2.0, 1.0)]))
    assert falling.service_time("semantic", 1000, 5) == pytest.approx(2.0)  # a falling slope is not extended
    with pytest.raises(ProfileError):
        only_one.service_time("map", 1000, 0)
    with pytest.raises(ProfileError):
        only_one.service_time("map", 0)


def test_stage_names_map_to_kinds():
    assert [stage_kind(s) for s in ("semantic", "map", "pixel.0", "pixel.1", "pixel.7")] == [
        "semantic", "map", "pixel", "pixel", "pixel"]
    p = profile({"semantic": [(100, 1, 1.0, 0.0)], "map": [(100, 1, 2.0, 0.0)], "pixel": [(100, 1, 3.0, 0.0)]})
    assert [p.service_time(s, 100) for s in ("semantic", "map", "pixel.0", "pixel.3")] == [1.0, 2.0, 3.0, 3.0]


def test_a_missing_kind_names_the_file():
    p = profile({"semantic": [(100, 1, 1.0, 0.0)]}, origin="somewhere/part.json")
    with pytest.raises(ProfileError, match=r"part\.json.*'pixel'") as err:
        p.service_time("pixel.0", 100)
    assert "\n" not in str(err.value) and isinstance(err.value, MiscError)
    with pytest.raises(ProfileError, match="classical/cpu profile"):
        profile({"semantic": [(100, 1, 1.0, 0.0)]}).service_time("map", 100)


def test_points_are_sorted_and_checked_when_made():
    p = profile({"semantic": [(400, 1, 2.0, 0.0), (100, 2, 1.0, 0.0), (100, 1, 1.0, 0.0)]})
    assert p.points["semantic"] == [(100, 1, 1.0, 0.0), (100, 2, 1.0, 0.0), (400, 1, 2.0, 0.0)]
    with pytest.raises(ProfileError, match="positive"):
        profile({"semantic": [(100, 1, -1.0, 0.0)]})
    with pytest.raises(ProfileError, match="two points"):
        profile({"semantic": [(100, 1, 1.0, 0.0), (100, 1, 2.0, 0.0)]})
    with pytest.raises(ProfileError, match="unknown stage kind"):
        profile({"pixels": [(100, 1, 1.0, 0.0)]})


# ============================================================================ files


def write(tmp_path, data, name="p.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def good() -> dict:
    return json.loads(profile(full([(100, 1, 1.0, 0.5), (400, 1, 2.0, 1.0)])).to_json())


def test_round_trip(tmp_path):
    p = CostProfile(decoder="diffusion", device="cuda", source="ESTIMATE: made up", estimate=True,
                    points=full([(100, 1, 1.25, 0.5), (400, 1, 2.0, 1.0), (100, 4, 3.0, 2.0)]), notes="n")
    loaded = load_profile(write(tmp_path, p.to_json()))
    assert loaded == p and loaded.origin.endswith("p.json")
    assert loaded.service_time("pixel.1", 200, 2) == p.service_time("pixel.1", 200, 2)


def _bad(tmp_path, data, *, key: str):
    path = write(tmp_path, data, "bad.json")
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and key in msg, msg
    return msg


def test_load_errors_are_one_line_naming_file_and_key(tmp_path):
    d = good()
    _bad(tmp_path, {**d, "colour": "blue"}, key="'colour'")
    d = good()
    d["points"]["map"][1]["latency"] = 3
    _bad(tmp_path, d, key="points.map[1].latency")
    d = good()
    del d["points"]["pixel"]
    _bad(tmp_path, d, key="points.pixel")
    d = good()
    d["points"]["semantic"][0]["seconds"] = -0.5
    assert "positive" in _bad(tmp_path, d, key="points.semantic[0].seconds")
    d = good()
    d["points"]["semantic"][1]["seconds"] = 0
    _bad(tmp_path, d, key="points.semantic[1].seconds")
    d = good()
    d["points"]["map"][0]["pixels"] = 10.5
    _bad(tmp_path, d, key="points.map[0].pixels")
    d = good()
    d["points"]["map"][0]["batch"] = True
    _bad(tmp_path, d, key="points.map[0].batch")
    d = good()
    d["points"]["map"] = []
    _bad(tmp_path, d, key="points.map")
    d = good()
    del d["points"]["map"][0]["peak_mb"]
    _bad(tmp_path, d, key="points.map[0].peak_mb")
    d = good()
    del d["source"]
    _bad(tmp_path, d, key="'source'")
    _bad(tmp_path, {**good(), "decoder": "neural"}, key="'decoder'")
    _bad(tmp_path, {**good(), "estimate": True}, key="'source'")  # an estimate must say so in its source
    _bad(tmp_path, {**good(), "format": 2}, key="'format'")
    assert "not JSON" in _bad(tmp_path, '{"decoder": "classical",\n  "points": ', key="line 2")
    _bad(tmp_path, '{"decoder": "classical", "decoder": "diffusion"}', key="'decoder'")
    _bad(tmp_path, "[1, 2]", key="top level")


def test_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(ProfileError, match="unknown profile 'nope'.*classical-cpu"):
        load_profile("nope")
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(tmp_path / "missing.json")


def test_committed_profiles_load_and_cover_every_kind():
    names = committed_profiles()
    assert {"classical-cpu", "diffusion-estimate"} <= set(names)
    readme = (PROFILES_DIR / "README.md").read_text()
    for name in names:
        p = load_profile(name)
        assert set(p.points) == set(KINDS), name
        assert f"{name}.json" in readme, f"{name} is not described in experiments/profiles/README.md"
        for stage in ("semantic", "map", "pixel.0", "pixel.1"):
            assert p.service_time(stage, 512 * 512) > 0 and p.peak_mb(stage, 512 * 512) >= 0
        assert p.estimate == p.source.startswith("ESTIMATE:")
    classical = load_profile("classical-cpu")
    assert (classical.decoder, classical.device, classical.estimate) == ("classical", "cpu", False)
    assert classical.source.startswith("measured on ") and "by miscnet profile" in classical.source
    estimate = load_profile("diffusion-estimate")
    assert (estimate.decoder, estimate.estimate) == ("diffusion", True)
    assert "A100" in estimate.source and "21.66" in estimate.source
    # the estimate covers every size a stage can be drawn at, so no real image falls in the extrapolation
    assert max(p[0] for p in estimate.points["pixel"]) >= 4096 * 4096


def test_estimate_composes_the_parts():
    costs = {"sd15_unet_step_flops": 1.0, "sd15_control_step_flops": 2.0, "unet_step_flops": 10.0,
             "control_step_flops": 40.0, "text_flops": 1.0, "vae_encode_flops": 2.0, "vae_decode_flops": 3.0,
             "weights_bytes": 2.0**30, "text_bytes": 1.0, "unet_step_bytes": 2.0**20,
             "control_step_bytes": 3 * 2.0**20, "vae_encode_bytes": 1.0, "vae_decode_bytes": 2.0**21}
    cpu = {"reference": 0.5, "composite": 0.25, "colour_fix": 1.0, "resize": 0.125}
    p = estimate_diffusion_profile(objects=2, steps=4, object_steps=1, costs=costs, cpu_seconds=cpu)
    r_unet, r_control = 21.66, 2 * 15.02  # FLOP/s implied by the published timing
    text, enc, dec = 1 / r_unet, 2 / r_unet, 3 / r_unet
    control_pass = text + enc + 40 / r_control + dec
    assert p.service_time("semantic", 512 * 512) == pytest.approx(text + 4 * 10 / r_unet + dec + 0.125, rel=1e-5)
    assert p.service_time("map", 512 * 512) == pytest.approx(2 * (control_pass + 0.25) + 0.125, rel=1e-5)
    pixel = 0.5 + 2 * (control_pass + 0.25) + (text + enc + 4 * 40 / r_control + dec) + 1.0 + 0.125
    assert p.service_time("pixel.0", 512 * 512) == pytest.approx(pixel, rel=1e-5)
    assert p.service_time("pixel.0", 256 * 256) == p.service_time("pixel.0", 4096 * 4096)
    assert p.peak_mb("map", 1024 * 1024) == pytest.approx(1024 + 3, rel=1e-5)
    assert p.estimate and p.source.startswith("ESTIMATE:")


# ============================================================================ measuring


class Recorder:
    """A decoder that only records what it is asked to render."""

    name = "recorder"

    def __init__(self, batch_call: bool = False):
        self.calls: list[tuple[str, str, int]] = []  # (stage, caption, batch)
        if batch_call:
            self.render_batch = self._batch

    def _batch(self, stages):
        self.calls.append((stages[0].name, stages[0].semantics.caption, len(stages)))
        return [np.zeros((s.height, s.width, 3), np.uint8) for s in stages]

    def render(self, stage):  # an image, as a decoder returns: the profile also times writing its PNG
        self.calls.append((stage.name, stage.semantics.caption, 1))
        return np.zeros((stage.height, stage.width, 3), np.uint8)


def test_measure_renders_stages_in_stream_order_with_a_fresh_caption_each_time():
    dec = Recorder()
    p = measure_profile(dec, "classical", "cpu", sizes=[(48, 40)], repeats=2, warmup=1)
    names = ["semantic", "map", "pixel.0", "pixel.1"]
    # one warm-up, two timed runs, one untimed run for tracemalloc's peak: each renders the four stages in order
    assert [c[0] for c in dec.calls] == names * 4
    captions = [c[1] for c in dec.calls]
    assert len(set(captions)) == 4 and all(captions[i] == captions[i - i % 4] for i in range(16))
    assert {k: [q[:2] for q in v] for k, v in p.points.items()} == {k: [(48 * 40, 1)] for k in KINDS}
    assert not p.estimate and p.source.startswith("measured on ") and p.source.endswith("by miscnet profile")


def test_measure_batches_use_a_batch_call_where_the_decoder_has_one():
    dec = Recorder(batch_call=True)
    p = measure_profile(dec, "classical", "cpu", sizes=[(32, 32)], batches=[2, 1], repeats=1, warmup=0)
    assert [(c[0], c[2]) for c in dec.calls] == [(n, b) for b in (1, 1, 2, 2) for n in
                                                  ("semantic", "map", "pixel.0", "pixel.1")]
    assert [q[1] for q in p.points["map"]] == [1, 2]
    with pytest.raises(ProfileError):
        measure_profile(dec, "classical", "cpu", sizes=[], repeats=1)


def test_profile_command_classical(tmp_path, capsys):
    out = tmp_path / "f.json"
    assert main(["profile", "--decoder", "classical", "--sizes", "64", "--repeats", "1", "-o", str(out)]) == 0
    p = load_profile(out)
    assert p.decoder == "classical" and p.device == "cpu" and not p.estimate
    assert {k: [q[:2] for q in v] for k, v in p.points.items()} == {k: [(64 * 64, 1)] for k in KINDS}
    assert "wrote" in capsys.readouterr().out
    assert main(["profile", "--decoder", "classical", "--sizes", "40x24,32", "--repeats", "1", "--warmup", "0",
                 "--quiet", "--json", "-o", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
    assert [q[0] for q in load_profile(out).points["semantic"]] == [40 * 24, 32 * 32]  # sorted by pixels


def test_profile_command_errors_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "f.json")
    for argv, text in [(["--decoder", "classical", "--device", "cuda"], "classical decoder runs on the CPU"),
                       (["--decoder", "classical", "--width-scale", "0.5"], "--width-scale needs --random-weights"),
                       (["--decoder", "classical", "--random-weights"], "--random-weights is for --decoder diffusion")]:
        assert main(["profile", *argv, "-o", out]) == 2
        err = capsys.readouterr().err.strip()
        assert text in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["profile", "--decoder", "classical", "--sizes", "0", "-o", out])
    assert not (tmp_path / "f.json").exists()


# ============================================================================ the diffusion decoder


def test_sd21_base_configs_are_the_checkpoints():
    c = sd21_base_configs()
    u = c["unet"]
    assert (u["block_out_channels"], u["layers_per_block"], u["cross_attention_dim"], u["attention_head_dim"],
            u["use_linear_projection"], u["norm_num_groups"]) == ((320, 640, 1280, 1280), 2, 1024, (5, 10, 20, 20),
                                                                  True, 32)
    assert c["vae"]["block_out_channels"] == (128, 256, 512, 512) and c["vae"]["latent_channels"] == 4
    t = c["text"]
    assert (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["intermediate_size"]) == (
        1024, 23, 16, 4096)
    small = sd21_base_configs(0.025)
    assert small["unet"]["block_out_channels"] == (8, 16, 32, 32) and small["text"]["num_hidden_layers"] == 23
    with pytest.raises(ProfileError):
        sd21_base_configs(0)


def test_full_size_architectures_have_the_checkpoints_parameter_counts():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from miscnet.experiments.profiles import _meta_models

    unet, controlnet, vae, text = _meta_models()
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text, controlnet)]
    # SD 2.1-base's published components: UNet, VAE (as SD 1.x), OpenCLIP ViT-H text tower (23 layers)
    assert counts[:3] == [865_910_724, 83_653_863, 340_387_840]
    assert 360e6 < counts[3] < 370e6


def test_committed_estimate_is_what_the_flop_count_gives():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from miscnet.experiments.profiles import (
        PUBLISHED_CONTROLNET_IT_S,
        PUBLISHED_TXT2IMG_IT_S,
        count_diffusion_costs,
    )

    c = count_diffusion_costs(1024, 1024)
    unet = c["unet_step_flops"] / (c["sd15_unet_step_flops"] * PUBLISHED_TXT2IMG_IT_S)
    control = c["control_step_flops"] / (c["sd15_control_step_flops"] * PUBLISHED_CONTROLNET_IT_S)
    notes = load_profile("diffusion-estimate").notes
    assert f"UNet {unet:.3f} s, UNet+ControlNet {control:.3f} s" in notes
    assert c["vae_decode_flops"] > c["vae_encode_flops"] > c["text_flops"] > 0
    assert c["weights_bytes"] == pytest.approx((865_910_724 + 83_653_863 + 340_387_840 + 364_228_240) * 2,
                                               rel=0.01)


def test_profile_command_diffusion_random_weights_reduced(tmp_path, capsys):
    """The --random-weights path end to end on models narrowed 40 times (full depth): built in the checkpoints'
    layout, loaded through the decoder's own loading code, every stage rendered."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "d.json"
        rc = main(["profile", "--decoder", "diffusion", "--device", "cpu", "--random-weights", "--width-scale",
                   "0.025", "--work-dir", str(tmp_path), "--sizes", "64", "--diffusion-size", "64", "--steps", "1",
                   "--object-steps", "1", "--repeats", "1", "--warmup", "0", "--quiet", "-o", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, capsys.readouterr().err
    p = load_profile(out)
    assert (p.decoder, p.device, p.estimate) == ("diffusion", "cpu", False)
    assert "NOT the full-size cost" in p.source and "restoration controlnet" in p.notes
    assert {k: [q[:2] for q in v] for k, v in p.points.items()} == {k: [(64 * 64, 1)] for k in KINDS}
    assert [f.name for f in tmp_path.iterdir()] == ["d.json"]  # the models' folder is gone

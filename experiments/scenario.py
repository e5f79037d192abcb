"""Scenario files (TOML): what to send, over which link, with which protection, and what to sweep.

A scenario names its images, the encoder, the link, the protection, the decoder, the seeds and the
baselines, then a sweep grid: every combination of the values listed under ``[sweep]`` (the cartesian
product, first key outermost), optionally multiplied by named ``[[case]]`` tables (each a set of
overrides, e.g. one protection strategy). Keys and values mirror the ``miscnet`` CLI options::

    name = "bandwidth"
    description = "..."

    [images]                  # bundled samples, folders, files or globs (relative to this file)
    samples = ["astronaut", "coffee"]   # or "all"
    paths = ["photos/", "more/*.png"]   # each image needs IMAGE.json beside it, or give semantics
    semantics = "misc.csv"              # optional: one sidecar / MISC CSV for every path image

    [encoder]                 # semantic (--semantics-backend) + lmm_* / vlm_model, map + clip_model, grid,
                              # pixel, levels, budget | bpp, strict
    map = "boxes"
    pixel = "auto"
    bpp = 0.04

    [link]                    # --rate/--trace, --delay, --jitter, --loss, --outage, --queue, --mtu, --reverse-*
    rate = "64kbit"
    delay = "40ms"

    [protection]              # --protect (mode), --fec-strong-rate, --fec-pixel-rate, --max-rounds, --deadline
    mode = "arq"

    [decoder]                 # classical, or diffusion with the CLI's diffusion options (steps, guidance, ...)
    name = "classical"

    [run]
    seeds = 3                 # or a list: [0, 7, 42]

    [baselines]               # the whole image in one file, through the same transport and link
    codecs = ["jpeg", "avif", "jpeg-progressive"]

    [sweep]                   # grid: every combination
    "link.rate" = ["8kbit", "64kbit", "512kbit"]

    [[case]]                  # optional named variants, each combined with every grid point
    name = "fec-equal"
    protection = { mode = "fec", fec_strong_rate = 0.7, fec_pixel_rate = 0.7 }

    [report]                  # which keys colour the curves of each figure (see experiments/plots.py)
    series = ["link.rate"]

Optional values (budget, bpp, trace, outage, queue, reverse_delay, deadline) are left out, or given as the
string "none" (which is how a sweep lists "unset"). Every unknown key and every bad value is a
ScenarioError whose message names the file and the key (``bandwidth.toml: sweep."link.rate"[2]: ...``).
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import itertools
import json
import math
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from miscnet.channel.link import LinkSpec
from miscnet.channel.transport import MODES as PROTECTION_MODES
from miscnet.channel.transport import TransportConfig
from miscnet.core.config import (
    DECODERS,
    MAP_BACKENDS,
    MAX_LEVELS,
    RESTORE_MODES,
    SEMANTICS_BACKENDS,
    DecoderConfig,
    DiffusionConfig,
    EncoderConfig,
    MapConfig,
    SemanticsConfig,
    pixel_codec_choices,
)
from miscnet.core.errors import MiscError
from miscnet.core.pixel.block import BLOCK_RULES


class ScenarioError(MiscError):
    """A scenario file that cannot be used; the message names the file and the key."""


# ---------------------------------------------------------------------------------------------- values

_UNSET = ("none", "unset")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".gif", ".avif")


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


def _is_unset(v: Any) -> bool:
    return isinstance(v, str) and v.strip().lower() in _UNSET


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {_type_name(v)} ({v!r})")
    return v


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {_type_name(v)} ({v!r})")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise ValueError(f"{v} is outside {rng}")
        return v
    return check


def _float(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"expected a number, got {_type_name(v)} ({v!r})")
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"{v} is not finite")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise ValueError(f"{v} must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and v > hi:
            raise ValueError(f"{v} must be <= {hi}")
        return v
    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {_type_name(v)} ({v!r})")
    return v


def _choice(options: Iterable[str]) -> Callable[[Any], str]:
    options = tuple(options)

    def check(v: Any) -> str:
        v = _str(v)
        if v not in options:
            raise ValueError(f"{v!r} is not one of {', '.join(options)}")
        return v
    return check


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def wrapped(v: Any) -> Any:
        return None if v is None or _is_unset(v) else check(v)
    return wrapped


def _rate(v: Any) -> str:
    from miscnet.channel.units import parse_rate

    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ValueError(f"expected a tc rate such as '64kbit', got {_type_name(v)}")
    parse_rate(v)
    return str(v) if isinstance(v, str) else f"{v:g}bit"


def _time(v: Any) -> str:
    from miscnet.channel.units import parse_time

    parse_time(_str(v))
    return v


def _loss(v: Any) -> str:
    from miscnet.channel.units import parse_loss

    parse_loss(_str(v))
    return v


def _reorder(v: Any) -> str:
    from miscnet.channel.units import parse_reorder

    parse_reorder(_str(v))
    return v


def _queue(v: Any) -> str | int | None:
    from miscnet.channel.units import parse_size

    if _is_unset(v) or (isinstance(v, str) and v.strip().lower() == "unlimited"):
        return None
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise ValueError(f"expected a tc size such as '64kb' or a number of bytes, got {_type_name(v)}")
    parse_size(v)
    return v


def _map_backend(v: Any) -> str:
    return _choice(MAP_BACKENDS)(v)  # whether a model backend's weights are here is checked before the run


def _semantic_backend(v: Any) -> str:
    return _choice(SEMANTICS_BACKENDS)(v)


def _decoder(v: Any) -> str:
    return _choice(DECODERS)(v)


def _pixel_codec(v: Any) -> str:
    return _choice(pixel_codec_choices())(v)


def _protect(v: Any) -> str:
    return _choice(PROTECTION_MODES)(v)


def _grid(v: Any) -> int:
    from miscnet.core.map_codec import MAX_GRID

    return _int(2, MAX_GRID)(v)


def _str_list(v: Any) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"expected a list of strings, got {_type_name(v)}")
    return list(v)


def _seeds(v: Any) -> list[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        if not 1 <= v <= 100000:
            raise ValueError(f"a number of seeds must be 1..100000, not {v}")
        return list(range(v))
    if not isinstance(v, list) or not v:
        raise ValueError(f"expected a number of seeds or a non-empty list of integers, got {_type_name(v)}")
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 2**63:
            raise ValueError(f"seed {x!r} is not an integer in 0..2^63-1")
        out.append(x)
    if len(set(out)) != len(out):
        raise ValueError("seeds repeat")
    return out


def _samples(v: Any) -> list[str]:
    from miscnet.core.samples import SAMPLE_NAMES

    if v == "all":
        return list(SAMPLE_NAMES)
    names = _str_list(v)
    for n in names:
        if n not in SAMPLE_NAMES:
            raise ValueError(f"unknown sample {n!r} (valid: {', '.join(SAMPLE_NAMES)}, or \"all\")")
    if len(set(names)) != len(names):
        raise ValueError("samples repeat")
    return names


def _codecs(v: Any) -> list[str]:
    from miscnet.experiments.baselines import BASELINE_CODECS

    names = _str_list(v)
    for n in names:
        if n not in BASELINE_CODECS:
            raise ValueError(f"unknown baseline codec {n!r} (valid: {', '.join(BASELINE_CODECS)})")
    if len(set(names)) != len(names):
        raise ValueError("codecs repeat")
    return names


def _labels(v: Any) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ValueError("expected a table of value = \"label\" strings, e.g. { \"random 10%\" = \"no bursts\" }")
    return dict(v)


def _keys(v: Any) -> list[str]:
    keys = _str_list(v)
    for k in keys:
        if k != "method" and k != "case" and k not in PARAMS:
            raise ValueError(f"unknown key {k!r} (use method, case or a section.key such as link.rate)")
    return keys


@dataclass(frozen=True)
class Param:
    default: Any
    check: Callable[[Any], Any]
    help: str
    sweepable: bool = True
    path: bool = False  # a file path, resolved against the scenario's folder


# The defaults of the encoder, protection and decoder keys are the config dataclasses' (the CLI's too).
_SEM, _MAP, _ENC = SemanticsConfig(), MapConfig(), EncoderConfig()
_DEC, _DIFF, _TRANSPORT = DecoderConfig(), DiffusionConfig(), TransportConfig()
_LINK = LinkSpec()

# Every key a scenario may set, as "section.key". Sweepable ones make the configurations.
PARAMS: dict[str, Param] = {
    # encoder: the CLI's encoder options
    "encoder.semantic": Param(_SEM.backend, _semantic_backend,
                              "semantics: sidecar, openai or hf (--semantics-backend; see experiments/MODELS.md)"),
    "encoder.lmm_model": Param(_SEM.lmm_model, _optional(_str), "openai semantics: model name (--lmm-model)"),
    "encoder.lmm_endpoint": Param(_SEM.lmm_endpoint, _optional(_str),
                                  "openai semantics: base URL (--lmm-endpoint; the key "
                                  "comes from $OPENAI_API_KEY, never from a scenario)"),
    "encoder.lmm_timeout": Param(_SEM.lmm_timeout, _float(0.0, lo_open=True), "openai semantics: seconds per request"),
    "encoder.lmm_retries": Param(_SEM.lmm_retries, _int(0, 100), "openai semantics: retries"),
    "encoder.lmm_max_tokens": Param(_SEM.lmm_max_tokens, _int(1, 100000), "openai / hf semantics: answer length limit"),
    "encoder.vlm_model": Param(_SEM.vlm_model, _optional(_str),
                               "hf semantics: model folder or cached id (--vlm-model)"),
    "encoder.map": Param(_MAP.backend, _map_backend, "map layer backend: none, boxes or clip (--map)"),
    "encoder.clip_model": Param(_MAP.clip_model, _optional(_str), "clip map: model folder or cached id (--clip-model)"),
    "encoder.map_threshold": Param(_MAP.threshold, _float(0.0, 1.0), "clip map: cell threshold (--map-threshold)"),
    "encoder.model_device": Param(_SEM.device, _str, "device of the encoder's models (--model-device)"),
    "encoder.grid": Param(_MAP.grid, _grid, "map grid N (--grid)"),
    "encoder.pixel": Param(_ENC.pixel_codec, _pixel_codec, "pixel layer codec (--pixel)"),
    "encoder.levels": Param(_ENC.levels, _int(1, MAX_LEVELS), "pixel levels (--levels)"),
    "encoder.block_rule": Param(_ENC.block_rule, _choice(BLOCK_RULES),
                                "block codec: search (rate control) or misc (the notebook's rule; --block-rule)"),
    "encoder.budget": Param(_ENC.budget_bytes, _optional(_int(1)), "whole-file byte budget (--budget)"),
    "encoder.bpp": Param(_ENC.bpp, _optional(_float(0.0, lo_open=True)), "whole-file budget in bpp (--bpp)"),
    "encoder.strict": Param(_SEM.strict, _bool, "MISC's text limits as errors (--strict)"),
    # link: the CLI's link options
    "link.rate": Param(_LINK.rate, _optional(_rate),
                       f"constant forward rate (--rate; {LinkSpec.DEFAULT_RATE} unless a trace)"),
    "link.trace": Param(_LINK.trace, _optional(_str), "Mahimahi trace file (--trace)", path=True),
    "link.delay": Param(_LINK.delay, _time, "one-way delay (--delay)"),
    "link.jitter": Param(_LINK.jitter, _time, "delay jitter (--jitter)"),
    "link.loss": Param(_LINK.loss, _loss, "netem loss model (--loss)"),
    "link.reorder": Param(_LINK.reorder, _reorder, "netem-like reordering 'P [CORR] [gap N]' (--reorder)"),
    "link.outage": Param(_LINK.outage, _optional(_str), "outage file: START END seconds a line (--outage)",
                         path=True),
    "link.queue": Param(_LINK.queue, _queue, "drop-tail queue in bytes (--queue)"),
    "link.loss_before_queue": Param(_LINK.loss_before_queue, _bool, "netem's order: loss decided before the queue"),
    "link.mtu": Param(_TRANSPORT.mtu, _int(64, 65000), "packet payload bytes (--mtu)"),
    "link.reverse_rate": Param(_LINK.reverse_rate, _rate, "feedback link rate (--reverse-rate)"),
    "link.reverse_delay": Param(_LINK.reverse_delay, _optional(_time),
                                "feedback delay (--reverse-delay; default: delay)"),
    "link.reverse_loss": Param(_LINK.reverse_loss, _loss, "feedback link loss (--reverse-loss)"),
    # protection: the CLI's protection options
    "protection.mode": Param(_TRANSPORT.mode, _protect, "error control (--protect)"),
    "protection.fec_strong_rate": Param(_TRANSPORT.strong_rate, _float(0.05, 1.0),
                                        "FEC code rate of semantic + map (--fec-strong-rate)"),
    "protection.fec_pixel_rate": Param(_TRANSPORT.pixel_rate, _float(0.05, 1.0),
                                       "FEC code rate of pixel levels (--fec-pixel-rate)"),
    "protection.fec_symbols": Param(_TRANSPORT.fec_min_symbols, _int(1, 64),
                                    "FEC: symbols a small block is cut into (--fec-symbols)"),
    "protection.max_rounds": Param(_TRANSPORT.max_rounds, _int(1, 1000), "ARQ rounds (--max-rounds)"),
    "protection.deadline": Param(_TRANSPORT.deadline_s, _optional(_float(0.0, lo_open=True)),
                                 "give up after SECONDS (--deadline)"),
    # decoder: the CLI's decoder options
    "decoder.name": Param(_DEC.name, _decoder, "classical or diffusion (--decoder)"),
    "decoder.diffusion_model": Param(_DIFF.model, _optional(_str),
                                     "diffusion: pipeline folder or id (--diffusion-model)"),
    "decoder.controlnet_model": Param(_DIFF.controlnet, _optional(_str), "diffusion: ControlNet (--controlnet-model)"),
    "decoder.upscaler_model": Param(_DIFF.upscaler, _optional(_str), "diffusion: upscaler (--upscaler-model)"),
    "decoder.restore": Param(_DIFF.restore, _choice(RESTORE_MODES), "diffusion (--restore)"),
    "decoder.device": Param(_DIFF.device, _str, "diffusion: auto, cpu, cuda, cuda:N (--device)"),
    "decoder.steps": Param(_DIFF.steps, _int(1, 1000), "diffusion: global pass steps (--steps)"),
    "decoder.object_steps": Param(_DIFF.object_steps, _int(1, 1000), "diffusion: steps per object (--object-steps)"),
    "decoder.guidance": Param(_DIFF.guidance, _float(0.0, 50.0), "diffusion: global guidance (--guidance)"),
    "decoder.object_guidance": Param(_DIFF.object_guidance, _float(0.0, 50.0),
                                     "diffusion: object guidance (--object-guidance)"),
    "decoder.strength": Param(_DIFF.strength, _float(0.0, 1.0, lo_open=True),
                              "diffusion: img2img strength (--strength)"),
    "decoder.size": Param(_DIFF.size, _optional(_int(1, 8192)), "diffusion: working long side (--diffusion-size)"),
    "decoder.negative_prompt": Param(_DIFF.negative_prompt, _str, "diffusion (--negative-prompt)"),
    "decoder.color_fix": Param(_DIFF.color_fix, _bool, "diffusion: wavelet colour fix (not --no-color-fix)"),
    "decoder.seed": Param(_DIFF.seed, _int(0, 2**63 - 1), "diffusion: noise seed"),
    "decoder.cpu_offload": Param(_DIFF.cpu_offload, _bool, "diffusion (--cpu-offload)"),
    # not sweepable
    "images.samples": Param([], _samples, "bundled samples, or \"all\"", sweepable=False),
    "images.paths": Param([], _str_list, "image files, folders or globs", sweepable=False),
    "images.semantics": Param(None, _optional(_str), "one sidecar / MISC CSV for the path images",
                              sweepable=False, path=True),
    "run.seeds": Param([0], _seeds, "seeds: a count or a list", sweepable=False),
    "baselines.codecs": Param([], _codecs, "whole-image codecs sent at MISC's bytes", sweepable=False),
    "baselines.raster": Param("fit", _choice(["fit", "full"]), "fit: best raster that fits; full: full size",
                              sweepable=False),
    "baselines.levels": Param(3, _int(1, 8), "jpeg-progressive: levels (groups of scans)", sweepable=False),
    "report.series": Param(None, _optional(_keys), "keys that colour the curves (default: the swept keys)",
                           sweepable=False),
    "report.bytes_series": Param(None, _optional(_keys), "series of the quality-bytes figure", sweepable=False),
    "report.time_series": Param(None, _optional(_keys), "series of the quality-time figure", sweepable=False),
    "report.first_series": Param(None, _optional(_keys), "series of the first-stage figure", sweepable=False),
    "report.protection_x": Param(None, _optional(_keys), "groups on the protection figure's x axis",
                                 sweepable=False),
    "report.labels": Param({}, _labels, "names for values in figures: { value = \"label\" }", sweepable=False),
}
SECTIONS = sorted({k.split(".")[0] for k in PARAMS})
TOP_LEVEL = ("name", "description", "sweep", "case", *SECTIONS)
CONFIG_SECTIONS = ("encoder", "link", "protection", "decoder")  # what makes a configuration
CONFIG_KEYS = tuple(k for k in PARAMS if k.split(".")[0] in CONFIG_SECTIONS)
MAX_CONFIGURATIONS = 100000


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _q(key: str) -> str:
    """A key as TOML would write it inside a table: quoted when it holds a dot."""
    return f'"{key}"' if "." in key else key


# ---------------------------------------------------------------------------------------------- model

@dataclass(frozen=True)
class ImageSpec:
    name: str  # unique within the scenario
    arg: str  # what load_input understands: sample:NAME or a path
    semantics: str | None = None  # a semantics file for load_input, or None (sidecar beside / bundled)


@dataclass(frozen=True)
class Configuration:
    index: int
    id: str  # "c000", "c001", ... in expansion order
    label: str  # the case and the swept values, e.g. "fec-equal, rate=8kbit"
    case: str | None
    swept: dict[str, Any]  # the keys set by the case and the grid, in order
    params: dict[str, Any]  # every configuration key (CONFIG_KEYS), normalised

    def map_config(self) -> MapConfig:
        p = self.params
        return MapConfig(backend=p["encoder.map"], grid=p["encoder.grid"], clip_model=p["encoder.clip_model"],
                         threshold=p["encoder.map_threshold"], device=p["encoder.model_device"])

    def semantics_config(self, semantics_file: str | None = None) -> SemanticsConfig:
        """Where the semantics come from; ``semantics_file``: an image's sidecar / MISC CSV (images.semantics).

        The API key is never in a scenario: the openai backend reads $OPENAI_API_KEY."""
        p = self.params
        return SemanticsConfig(
            backend=p["encoder.semantic"], sidecar=semantics_file, lmm_model=p["encoder.lmm_model"],
            lmm_endpoint=p["encoder.lmm_endpoint"], lmm_timeout=p["encoder.lmm_timeout"],
            lmm_retries=p["encoder.lmm_retries"], lmm_max_tokens=p["encoder.lmm_max_tokens"],
            vlm_model=p["encoder.vlm_model"], device=p["encoder.model_device"], strict=p["encoder.strict"])

    def encoder_config(self) -> EncoderConfig:
        p = self.params
        return EncoderConfig(pixel_codec=p["encoder.pixel"], levels=p["encoder.levels"],
                             block_rule=p["encoder.block_rule"], budget_bytes=p["encoder.budget"],
                             bpp=p["encoder.bpp"], map=self.map_config(),
                             semantics=self.semantics_config())

    def identity(self) -> dict[str, Any]:
        """The parameters that make a point's id: those set away from their defaults. A key added to
        PARAMS later leaves the ids (and so ``--resume``) of earlier results valid while it is at its default."""
        return {k: v for k, v in self.params.items() if v != PARAMS[k].default}

    def encoder_key(self) -> str:
        return _digest({k: v for k, v in self.params.items() if k.startswith("encoder.")})

    _SEMANTIC_KEYS = ("encoder.semantic", "encoder.lmm_model", "encoder.lmm_endpoint", "encoder.lmm_timeout",
                      "encoder.lmm_retries", "encoder.lmm_max_tokens", "encoder.vlm_model", "encoder.model_device",
                      "encoder.strict")

    def semantics_key(self) -> str:
        """What the image's semantics depend on (the sidecar backend reads a file: only the backend counts)."""
        p = self.params
        if p["encoder.semantic"] == "sidecar":
            return _digest({"backend": "sidecar", "strict": p["encoder.strict"]})
        return _digest({k: p[k] for k in self._SEMANTIC_KEYS})

    def decoder_config(self) -> DecoderConfig:
        p = self.params
        diffusion = DiffusionConfig(
            model=p["decoder.diffusion_model"], controlnet=p["decoder.controlnet_model"],
            upscaler=p["decoder.upscaler_model"], restore=p["decoder.restore"], device=p["decoder.device"],
            size=p["decoder.size"], steps=p["decoder.steps"], guidance=p["decoder.guidance"],
            object_steps=p["decoder.object_steps"], object_guidance=p["decoder.object_guidance"],
            negative_prompt=p["decoder.negative_prompt"], strength=p["decoder.strength"], seed=p["decoder.seed"],
            cpu_offload=p["decoder.cpu_offload"], color_fix=p["decoder.color_fix"])
        return DecoderConfig(name=p["decoder.name"], diffusion=diffusion)

    def decoder_key(self) -> str:
        p = self.params
        if p["decoder.name"] == "classical":  # the classical decoder has no settings
            return "classical"
        return _digest({k: v for k, v in p.items() if k.startswith("decoder.")})

    def link_config(self):
        p = self.params
        return LinkSpec(rate=p["link.rate"], trace=_trace(p["link.trace"]), delay=p["link.delay"],
                        jitter=p["link.jitter"], loss=p["link.loss"], reorder=p["link.reorder"],
                        queue=p["link.queue"], loss_before_queue=p["link.loss_before_queue"],
                        reverse_rate=p["link.reverse_rate"], reverse_delay=p["link.reverse_delay"],
                        reverse_loss=p["link.reverse_loss"], outage=_outages(p["link.outage"])).build()

    def transport_config(self) -> TransportConfig:
        p = self.params
        return TransportConfig(mode=p["protection.mode"], mtu=p["link.mtu"],
                               strong_rate=p["protection.fec_strong_rate"], pixel_rate=p["protection.fec_pixel_rate"],
                               fec_min_symbols=p["protection.fec_symbols"], max_rounds=p["protection.max_rounds"],
                               deadline_s=p["protection.deadline"])

    def protection_label(self) -> str:
        p = self.params
        if self.case is not None and any(k.startswith("protection.") for k in self.swept):
            return self.case
        mode = p["protection.mode"]
        if mode in ("fec", "hybrid"):
            mode += f" {p['protection.fec_strong_rate']:g}/{p['protection.fec_pixel_rate']:g}"
        return mode


@dataclass(frozen=True)
class Point:
    """One simulation: a configuration, an image, a seed and a method (misc or a baseline codec)."""

    id: str
    config: int
    image: int
    seed: int
    method: str
    sim_seed: int  # the seed simulate() gets: `miscnet simulate IMAGE --seed SIM_SEED ...` replays the point


def simulation_seed(seed: int, image_name: str) -> int:
    """The link's seed for a scenario seed and an image.

    Every image gets its own random stream (with one shared stream, N seeds would be only N loss
    patterns however many images there are), while every configuration and method of one (image, seed)
    meets the same stream: common random numbers, so strategies are compared on the same losses.
    """
    digest = hashlib.sha256(f"{seed}:{image_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    description: str
    source: str  # the file, for messages
    base_dir: Path
    images: tuple[ImageSpec, ...]
    configs: tuple[Configuration, ...]
    seeds: tuple[int, ...]
    settings: dict[str, Any]  # the non-sweepable keys (images, run, baselines, report), normalised
    swept_keys: tuple[str, ...]  # every key the grid or a case varies, in first-seen order
    has_cases: bool = False
    text: str = ""  # the file's text, kept with the results
    image_digests: dict[int, str] = field(default_factory=dict)

    @property
    def methods(self) -> tuple[str, ...]:
        return ("misc", *self.settings["baselines.codecs"])

    def image_digest(self, index: int) -> str:
        """Content hash of an image and its semantics: a point's id changes when its input does."""
        if index not in self.image_digests:
            spec = self.images[index]
            from miscnet.core.samples import resolve_image_arg

            path, sidecar = resolve_image_arg(spec.arg)
            h = hashlib.sha256()
            for p in (path, Path(spec.semantics) if spec.semantics else sidecar):
                if p is not None:
                    try:
                        h.update(Path(p).read_bytes())
                    except OSError as exc:
                        raise ScenarioError(f"{self.source}: image {spec.name}: cannot read {p}: "
                                            f"{exc.strerror or exc}") from None
            self.image_digests[index] = h.hexdigest()[:16]
        return self.image_digests[index]

    def points(self) -> list[Point]:
        """Every point in plan order: configuration, then image, then seed, then method."""
        out = []
        base = {k: self.settings[k] for k in ("baselines.raster", "baselines.levels")}
        for c in self.configs:
            for i, _ in enumerate(self.images):
                for seed in self.seeds:
                    for method in self.methods:
                        ident = {"params": c.identity(), "image": self.images[i].name, "input": self.image_digest(i),
                                 "seed": seed, "method": method, **(base if method != "misc" else {})}
                        out.append(Point(_digest(ident), c.index, i, seed, method,
                                         simulation_seed(seed, self.images[i].name)))
        return out

    def smoke(self) -> ScenarioSpec:
        """A tiny version: the first image, the first seed, the first and last value of each grid axis."""
        configs = [c for c in self.configs if c.index in _smoke_indices(self)]
        configs = tuple(replace(c, index=i) for i, c in enumerate(configs))
        return replace(self, images=self.images[:1], seeds=self.seeds[:1], configs=configs, image_digests={})


def _smoke_indices(spec: ScenarioSpec) -> set[int]:
    keep: set[int] = set()
    values: dict[str, list] = {}
    for c in spec.configs:
        for k, v in c.swept.items():
            lst = values.setdefault(k, [])
            if v not in lst:
                lst.append(v)
    ends = {k: (v[0], v[-1]) for k, v in values.items()}
    for c in spec.configs:
        if all(c.swept.get(k) in ends[k] for k in ends if k in c.swept):
            keep.add(c.index)
    return keep


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- parsing

SCENARIOS_DIR = Path(__file__).resolve().parent / "scenarios"  # installed with the package


def committed_scenarios() -> list[str]:
    """Names of the scenarios shipped with miscnet (``miscnet sweep NAME`` runs one)."""
    return sorted(p.stem for p in SCENARIOS_DIR.glob("*.toml"))


def resolve_scenario(path: str | Path) -> Path:
    """A scenario file: the path itself when it exists, else a committed scenario named so (``bandwidth``)."""
    p = Path(path)
    if p.exists() or p.suffix or len(p.parts) > 1:
        return p
    shipped = SCENARIOS_DIR / f"{p.name}.toml"
    if shipped.is_file():
        return shipped
    raise ScenarioError(f"{path}: no such scenario file, and no committed scenario of that name "
                        f"(committed: {', '.join(committed_scenarios())})")


def load_scenario(path: str | Path) -> ScenarioSpec:
    """Read a scenario file, or a committed scenario by name (see ``resolve_scenario``)."""
    p = resolve_scenario(path)
    path = p if p != Path(path) else path
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read the scenario: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{path}: not UTF-8 (bad byte at offset {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    return parse_scenario(data, source=str(path), base_dir=p.resolve().parent, text=text,
                          default_name=p.stem)


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """{"link": {"rate": x}} and {"link.rate": x} both become {"link.rate": x}."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_scenario(data: dict, source: str = "<scenario>", base_dir: Path | str = ".", text: str = "",
                   default_name: str = "scenario") -> ScenarioSpec:
    base_dir = Path(base_dir)

    def fail(where: str, msg: str) -> ScenarioError:
        return ScenarioError(f"{source}: {where}: {msg}")

    for key in data:
        if key not in TOP_LEVEL:
            raise fail(key, f"unknown key{_suggest(key, TOP_LEVEL)}; a scenario has {', '.join(TOP_LEVEL)}")
    name = data.get("name", default_name)
    description = data.get("description", "")
    for key, v in (("name", name), ("description", description)):
        if not isinstance(v, str):
            raise fail(key, f"expected a string, got {_type_name(v)}")

    def check(key: str, value: Any, where: str) -> Any:
        param = PARAMS[key]
        if param.path and isinstance(value, str) and not _is_unset(value):
            value = str((base_dir / value).resolve()) if not Path(value).is_absolute() else value
        try:
            return param.check(value)
        except (ValueError, MiscError) as exc:
            raise fail(where, str(exc)) from None

    # the sections
    settings: dict[str, Any] = {}
    base: dict[str, Any] = {}
    for section in SECTIONS:
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise fail(section, f"expected a table [{section}], got {_type_name(table)}")
        table = dict(table)
        labels = table.pop("labels", None) if section == "report" else None
        flat = _flatten(table, section + ".")
        if labels is not None:
            flat["report.labels"] = labels
        for key, value in flat.items():
            if key not in PARAMS:
                known = [k for k in PARAMS if k.startswith(section + ".")]
                raise fail(key, f"unknown key{_suggest(key, known)} (known in [{section}]: "
                                f"{', '.join(k.split('.', 1)[1] for k in known)})")
            normalised = check(key, value, key)
            (base if PARAMS[key].sweepable else settings)[key] = normalised
    for key, param in PARAMS.items():
        if param.sweepable:
            base.setdefault(key, param.default)
        else:
            settings.setdefault(key, param.default)

    # the grid
    sweep = data.get("sweep", {})
    if not isinstance(sweep, dict):
        raise fail("sweep", f"expected a table [sweep], got {_type_name(sweep)}")
    axes: list[tuple[str, list]] = []
    for key, values in _flatten(sweep).items():
        where = f"sweep.{_q(key)}"
        if key not in PARAMS:
            raise fail(where, f"unknown key{_suggest(key, CONFIG_KEYS)}; sweep keys are section.key names "
                              f"such as link.rate")
        if not PARAMS[key].sweepable:
            raise fail(where, f"{key} cannot be swept (only encoder, link, protection and decoder keys can)")
        if not isinstance(values, list) or not values:
            raise fail(where, "expected a non-empty list of values")
        checked = [check(key, v, f"{where}[{i}]") for i, v in enumerate(values)]
        if len({json.dumps(v, default=str) for v in checked}) != len(checked):
            raise fail(where, "values repeat")
        axes.append((key, checked))

    # the cases
    cases_raw = data.get("case", [])
    if isinstance(cases_raw, dict):
        cases_raw = [cases_raw]
    if not isinstance(cases_raw, list):
        raise fail("case", f"expected [[case]] tables, got {_type_name(cases_raw)}")
    cases: list[tuple[str, dict[str, Any]]] = []
    grid_keys = {k for k, _ in axes}
    for i, case in enumerate(cases_raw):
        if not isinstance(case, dict):
            raise fail(f"case[{i}]", f"expected a table, got {_type_name(case)}")
        cname = case.get("name")
        if not isinstance(cname, str) or not cname:
            raise fail(f"case[{i}]", "every case needs a name (a non-empty string)")
        if cname in (c for c, _ in cases):
            raise fail(f"case[{i}]", f"the name {cname!r} is used twice")
        overrides = {}
        for key, value in _flatten({k: v for k, v in case.items() if k != "name"}).items():
            where = f"case[{i}] ({cname}).{key}"
            if key not in PARAMS:
                raise fail(where, f"unknown key{_suggest(key, CONFIG_KEYS)}")
            if not PARAMS[key].sweepable:
                raise fail(where, f"{key} cannot differ between cases")
            if key in grid_keys:
                raise fail(where, f"{key} is also a sweep axis; set it in one place")
            overrides[key] = check(key, value, where)
        cases.append((cname, overrides))

    # expand: every case times every grid point
    n = max(1, len(cases)) * math.prod(len(v) for _, v in axes)
    if n > MAX_CONFIGURATIONS:
        raise fail("sweep", f"{n} configurations, over the limit of {MAX_CONFIGURATIONS}")
    swept_keys: list[str] = []
    for _, overrides in cases:
        swept_keys += [k for k in overrides if k not in swept_keys]
    swept_keys += [k for k, _ in axes if k not in swept_keys]
    configs = []
    keys = [k for k, _ in axes]
    for cname, overrides in cases or [(None, {})]:
        for combo in itertools.product(*(v for _, v in axes)):
            params = dict(base)
            params.update(overrides)
            params.update(zip(keys, combo, strict=True))
            swept = {**overrides, **dict(zip(keys, combo, strict=True))}
            index = len(configs)
            label = ", ".join(([cname] if cname else []) + [f"{short_key(k)}={_fmt(v)}" for k, v in
                                                            zip(keys, combo, strict=True)]) or "default"
            config = Configuration(index, f"c{index:03d}", label, cname, swept,
                                   {k: params[k] for k in CONFIG_KEYS})
            _check_config(config, fail)
            configs.append(config)

    images = _images(settings, base_dir, fail)
    for key in ("report.series", "report.bytes_series", "report.time_series", "report.first_series",
                "report.protection_x"):
        if settings[key] is not None and "case" in settings[key] and not cases:
            raise fail(key, "'case' is listed but the scenario has no [[case]] tables")
    return ScenarioSpec(name=name, description=description, source=source, base_dir=base_dir,
                        images=images, configs=tuple(configs), seeds=tuple(settings["run.seeds"]),
                        settings=settings, swept_keys=tuple(swept_keys), has_cases=bool(cases), text=text)


def short_key(key: str) -> str:
    return key.split(".", 1)[1] if "." in key else key


def _fmt(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str) and "/" in v:  # a trace path
        return Path(v).name
    return str(v)


def _check_config(config: Configuration, fail) -> None:
    """Cross-key checks, and build every config object once so bad combinations fail before any work.

    The message names the configuration when a sweep or case made it, else the section at fault.
    """
    p = config.params

    def where(section: str) -> str:
        if any(k.startswith(section + ".") for k in config.swept):
            return f"configuration {config.id} ({config.label})"
        return section

    if p["encoder.budget"] is not None and p["encoder.bpp"] is not None:
        raise fail(where("encoder"), "encoder.budget and encoder.bpp are both set; give one")
    if p["link.rate"] is not None and p["link.trace"] is not None:
        raise fail(where("link"), "link.rate and link.trace are both set; give one")
    for section, build in (("encoder", config.encoder_config), ("link", config.link_config),
                           ("protection", config.transport_config)):
        try:
            build()
        except MiscError as exc:
            raise fail(where(section), str(exc)) from None


_TRACES: dict[str, Any] = {}


def _trace(path: str | None):
    """A trace file, parsed once per process."""
    if path is None:
        return None
    if path not in _TRACES:
        from miscnet.channel.trace import Trace

        _TRACES[path] = Trace.load(path)
    return _TRACES[path]


_OUTAGES: dict[str, Any] = {}


def _outages(path: str | None):
    """An outage file, parsed once per process."""
    if path is None:
        return None
    if path not in _OUTAGES:
        from miscnet.channel.loss import Outages

        _OUTAGES[path] = Outages.load(path)
    return _OUTAGES[path]


def _images(settings: dict[str, Any], base_dir: Path, fail) -> tuple[ImageSpec, ...]:
    out: list[ImageSpec] = [ImageSpec(n, f"sample:{n}") for n in settings["images.samples"]]
    semantics = settings["images.semantics"]
    if semantics is not None and not Path(semantics).is_file():
        raise fail("images.semantics", f"no such file: {semantics}")
    for i, pattern in enumerate(settings["images.paths"]):
        where = f"images.paths[{i}]"
        full = pattern if Path(pattern).is_absolute() else str(base_dir / pattern)
        p = Path(full)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        elif glob.has_magic(pattern):
            found = sorted(Path(q) for q in glob.glob(full, recursive=True)
                           if Path(q).is_file() and Path(q).suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found = [p]
        else:
            raise fail(where, f"no such file or folder: {pattern}")
        if not found:
            raise fail(where, f"{pattern} matches no image ({', '.join(IMAGE_SUFFIXES)})")
        for q in found:
            if semantics is None and not q.with_suffix(".json").is_file():
                raise fail(where, f"{q} has no semantics: put {q.with_suffix('.json').name} beside it or set "
                                  f"images.semantics")
            out.append(ImageSpec(q.stem, str(q), semantics))
    if not out:
        raise fail("images", "no images: list images.samples and/or images.paths")
    # unique names: the stem, or the path where stems collide
    stems: dict[str, int] = {}
    for spec in out:
        stems[spec.name] = stems.get(spec.name, 0) + 1
    seen: set[str] = set()
    result = []
    for spec in out:
        name = spec.name if stems[spec.name] == 1 else spec.arg
        if name in seen:
            raise fail("images", f"{name} is listed twice")
        seen.add(name)
        result.append(replace(spec, name=name))
    return tuple(result)


def describe_keys() -> str:
    """The scenario keys, one a line, for --help and the README."""
    lines = []
    for key, p in PARAMS.items():
        default = "unset" if p.default is None else json.dumps(p.default)
        lines.append(f"  {key:<28} {p.help} (default {default}{'' if p.sweepable else ', not sweepable'})")
    return "\n".join(lines)

"""Transport benchmark: completion time against the erasure-channel bound, per protection mode and loss.

``python -m miscnet.experiments.bench_transport [--seeds N] [--json]`` runs the five bundled samples (MISC's
default budget, as the committed scenarios) through a 64 kbit/s, 40 ms link under random 5 % and 10 % loss
and 10 % loss in bursts of 2, 4, 8 and 16 packets (Gilbert chains, as ``experiments/scenarios/burst_loss.toml``),
with none, arq, fec and hybrid, one fresh link per (image, seed), every mode meeting the same loss patterns.
It prints, side by side: the share of images completed, p50 / p90 / worst completion time, worst / p90,
the mean completion time over the erasure-channel bound ``delay + file bytes * 8 / (rate * (1 - loss))``
and wire bytes over the file's size. Then one 2 KB image (astronaut) at random 5 %, as bench_channel, its
wire bytes split into the first copy, repair, resent data and POLLs. Then outages: the link delivers
nothing for 2 s or 11 s from 0 to 0.4 s into each sample, and the longest an image waits once it is back.

Targets (exit status 1 when one is missed): hybrid at most 1.15x the bound and 1.10x the file's bytes at
random 5 % (the 2 KB image); worst at most 3x p90 for arq and hybrid in every pattern; fec and hybrid
complete at least as many images as none in every pattern; after an outage, arq and hybrid complete every
image, none more than 2 s after the link is back.
"""

from __future__ import annotations

import argparse
import json
import statistics

from miscnet.channel.link import LinkSpec
from miscnet.channel.loss import Outages
from miscnet.channel.transport import MODES, TransportConfig
from miscnet.core.config import EncoderConfig
from miscnet.core.container import to_bytes
from miscnet.core.image_io import load_image
from miscnet.core.samples import SAMPLE_NAMES, sample_image_path, sample_sidecar_path
from miscnet.core.semantics import load_semantics
from miscnet.experiments.scenario import simulation_seed
from miscnet.experiments.simulate import Scenario, SimImage, simulate
from miscnet.sender.encoder import encode_image

RATE, DELAY = 64000.0, 0.040
# (label, netem loss, mean loss): Gilbert chains with mean loss P / (P + R) = 10 % and mean burst 1 / R
PATTERNS = [("random 5%", "random 5%", 0.05), ("random 10%", "random 10%", 0.10),
            ("bursts of 2", "gemodel 5.556% 50%", 0.10), ("bursts of 4", "gemodel 2.778% 25%", 0.10),
            ("bursts of 8", "gemodel 1.389% 12.5%", 0.10), ("bursts of 16", "gemodel 0.694% 6.25%", 0.10)]


# outages (nothing delivered) of 2 s and of 11 s (the Verizon EVDO trace's longest gap) that begin while an
# image is being sent, at these offsets from its first packet (seconds)
OUTAGE_S = (2.0, 11.0)
OUTAGE_STARTS = tuple(round(0.02 * i, 2) for i in range(21))


def _item(name: str, config: EncoderConfig) -> SimImage:
    image = load_image(sample_image_path(name))
    sem, _ = load_semantics(sample_sidecar_path(name))
    return SimImage(name, encode_image(image, sem, config).encoded, None)


def _quantile(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))]


def measure(items: list[SimImage], loss: str, mean_loss: float, mode: str, seeds: int) -> dict:
    link = LinkSpec(rate="64kbit", delay="40ms", loss=loss).build()
    transport = TransportConfig(mode=mode)
    times, ratios, wire, completed, runs = [], [], [], 0, 0
    parts = dict.fromkeys(("retransmitted_bytes", "fec_bytes", "control_bytes"), 0.0)  # per file byte
    for item in items:
        file_bytes = len(to_bytes(item.encoded))
        bound = DELAY + file_bytes * 8 / (RATE * (1 - mean_loss))
        for seed in range(seeds):
            scenario = Scenario(link=link, transport=transport, seed=simulation_seed(seed, item.name), quality=False)
            (r,) = simulate([item], scenario)
            runs += 1
            wire.append(r["totals"]["wire_bytes"] / file_bytes)
            for key in parts:
                parts[key] += r["totals"][key] / file_bytes
            if r["completed"]:
                completed += 1
                t = r["totals"]["completion_time_s"]
                times.append(t)
                ratios.append(t / bound)
    row = {"mode": mode, "loss": loss, "runs": runs, "completed": completed / runs,
           "wire_to_file": statistics.mean(wire), **{key: v / runs for key, v in parts.items()}}
    if times:
        row.update(p50_s=_quantile(times, 0.5), p90_s=_quantile(times, 0.9), worst_s=max(times),
                   mean_to_bound=statistics.mean(ratios))
        row["worst_to_p90"] = row["worst_s"] / row["p90_s"]
    return row


def after_outage(items: list[SimImage], mode: str) -> dict:
    """The longest an image waited after the link came back (completion - end of the outage), over every
    image, outage length and start; and how many completed."""
    waits, runs, completed = [], 0, 0
    for item in items:
        for length in OUTAGE_S:
            for start in OUTAGE_STARTS:
                link = LinkSpec(rate="64kbit", delay="40ms", outage=Outages([(start, start + length)])).build()
                (r,) = simulate([item], Scenario(link=link, transport=TransportConfig(mode=mode), quality=False))
                runs += 1
                t = r["totals"]["completion_time_s"]
                if t is not None:
                    completed += 1
                    if t > start:  # it met the outage
                        waits.append(t - (start + length))
    return {"mode": mode, "runs": runs, "completed": completed / runs, "worst_after_s": max(waits)}


def run(seeds: int) -> dict:
    samples = [_item(name, EncoderConfig()) for name in SAMPLE_NAMES]
    table = {label: [measure(samples, loss, mean, mode, seeds) for mode in MODES] for label, loss, mean in PATTERNS}
    big = [_item("astronaut", EncoderConfig(budget_bytes=2048))]
    single = {mode: measure(big, "random 5%", 0.05, mode, 4 * seeds) for mode in MODES}
    outage = {mode: after_outage(samples, mode) for mode in ("arq", "hybrid")}
    return {"seeds": seeds, "patterns": table, "image_2kb": single, "outage": outage}


def misses(result: dict) -> list[str]:
    out = []
    for label, rows in result["patterns"].items():
        by = {r["mode"]: r for r in rows}
        for mode in ("fec", "hybrid"):
            if by[mode]["completed"] < by["none"]["completed"]:
                out.append(f"{label}: {mode} completed {by[mode]['completed']:.1%} "
                           f"< none {by['none']['completed']:.1%}")
        for mode in ("arq", "hybrid"):
            ratio = by[mode].get("worst_to_p90")
            if ratio is not None and ratio > 3.0:
                out.append(f"{label}: {mode} worst {by[mode]['worst_s']:.2f} s = {ratio:.1f}x p90 (target <= 3x)")
    for mode, row in result["outage"].items():
        if row["completed"] < 1.0 or row["worst_after_s"] > 2.0:
            out.append(f"outages: {mode} completed {row['completed']:.1%}, waited up to {row['worst_after_s']:.2f} s "
                       "after the link came back (target: all, <= 2 s)")
    hybrid = result["image_2kb"]["hybrid"]
    if hybrid.get("mean_to_bound", float("inf")) > 1.15:
        out.append(f"2 KB image, random 5%: hybrid {hybrid.get('mean_to_bound', 0):.3f}x the bound (target <= 1.15)")
    if hybrid["wire_to_file"] > 1.10:
        out.append(f"2 KB image, random 5%: hybrid wire {hybrid['wire_to_file']:.3f}x the file (target <= 1.10)")
    return out


def _f(row: dict, key: str, spec: str) -> str:
    return format(row[key], spec) if key in row else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=40, help="seeds per image (default 40: 200 runs per cell)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.seeds)
    missed = misses(result)
    if args.json:
        print(json.dumps({**result, "misses": missed}))
        return 1 if missed else 0
    print(f"five samples, 64 kbit/s, 40 ms, {args.seeds} seeds each; times in seconds; bound = "
          "delay + file bits / (rate * (1 - loss))")
    print(f"{'loss':<13} {'mode':<7} {'complete':>8} {'p50':>6} {'p90':>6} {'worst':>6} {'w/p90':>6} "
          f"{'t/bound':>7} {'wire/file':>9}")
    for label, rows in result["patterns"].items():
        for r in rows:
            print(f"{label:<13} {r['mode']:<7} {r['completed']:>8.1%} {_f(r, 'p50_s', '6.3f')} "
                  f"{_f(r, 'p90_s', '6.3f')} "
                  f"{_f(r, 'worst_s', '6.2f')} {_f(r, 'worst_to_p90', '6.1f')} {_f(r, 'mean_to_bound', '7.3f')} "
                  f"{r['wire_to_file']:>9.3f}")
    print(f"\n2 KB image (astronaut), random 5%, {4 * args.seeds} seeds:")
    for r in result["image_2kb"].values():
        print(f"  {r['mode']:<7} complete {r['completed']:>6.1%}  mean/bound {_f(r, 'mean_to_bound', '.3f')}  "
              f"p90 {_f(r, 'p90_s', '.3f')} s  wire/file {r['wire_to_file']:.3f} = first copy "
              f"{r['wire_to_file'] - r['retransmitted_bytes'] - r['fec_bytes'] - r['control_bytes']:.3f} + repair "
              f"{r['fec_bytes']:.3f} + resent {r['retransmitted_bytes']:.3f} + POLLs {r['control_bytes']:.3f}")
    print(f"\noutages of {' and '.join(f'{x:g} s' for x in OUTAGE_S)} starting {OUTAGE_STARTS[0]:g} to "
          f"{OUTAGE_STARTS[-1]:g} s into each sample (no other loss):")
    for r in result["outage"].values():
        print(f"  {r['mode']:<7} complete {r['completed']:>6.1%}  longest wait after the link came back "
              f"{r['worst_after_s']:.2f} s")
    print("\n" + ("every target met" if not missed else "missed:\n  " + "\n  ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())

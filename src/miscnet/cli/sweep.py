"""``miscnet sweep SCENARIO.toml -o DIR``: run a scenario file's every point and report.

Wired into the CLI by ``register(subparsers)`` (src/miscnet/cli/main.py). Errors are MiscErrors, printed by
``miscnet`` as one line.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep", help="run a scenario file (TOML): every configuration, image and seed, in virtual time",
        description="Run every point of a scenario in virtual time and write results.csv, CompressAI-style "
                    "JSON per configuration, summary.json and figures (PNG) under DIR.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.format_help = _with_scenario_keys(p)  # the key list is read from the scenario module only for --help
    p.add_argument("scenario", metavar="SCENARIO.toml|NAME",
                   help="a scenario file, or the name of a committed one (bandwidth, burst_loss, codecs, protection)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="results folder")
    p.add_argument("--workers", type=int, metavar="N",
                   help="local worker processes (default: the CPU count; 1 runs in this process)")
    p.add_argument("--dask", metavar="ADDRESS", help="run the points on this Dask scheduler (tcp://host:port)")
    p.add_argument("--resume", action="store_true", help="keep the points DIR already holds and run the rest")
    p.add_argument("--limit", type=int, metavar="N", help="run only the first N points of the plan")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run: first image, first seed, first and last value of each sweep axis")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run's summary as JSON")
    p.set_defaults(func=cmd_sweep)
    return p


def _with_scenario_keys(parser: argparse.ArgumentParser):
    """parser.format_help with the scenario keys as epilog, looked up when help is shown: building the
    parser (every ``miscnet`` command does) must not import miscnet.experiments."""
    plain = parser.format_help

    def format_help() -> str:
        if parser.epilog is None:
            from miscnet.experiments.scenario import describe_keys

            parser.epilog = "scenario keys (section.key):\n" + describe_keys()
        return plain()

    return format_help


def cmd_sweep(args: argparse.Namespace) -> int:
    from miscnet.experiments.scenario import load_scenario
    from miscnet.experiments.sweep import run_sweep

    spec = load_scenario(args.scenario)
    if args.smoke:
        spec = spec.smoke()
    if args.workers is not None and args.dask:
        print("miscnet: warning: --workers is ignored with --dask", file=sys.stderr)
    result = run_sweep(spec, args.output, workers=args.workers, dask=args.dask, resume=args.resume,
                       limit=args.limit, quiet=args.quiet, plots=not args.no_plots)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    t = result.timing
    print(f"{spec.name}: {result.points} points ({result.run} run, {result.reused} reused"
          f"{f', {result.errors} failed to encode' if result.errors else ''}) in {result.wall_s:.1f} s"
          f"{f' on {result.workers} workers, {result.points_per_s:.1f} points/s' if result.run else ''}")
    if result.run:
        print(f"  encode {t['encode_s']:.1f} s, decode + metrics {t['decode_s']:.1f} s, simulate "
              f"{t['simulate_s']:.1f} s (worker time); outputs {t['assemble_s']:.1f} s")
    for f in result.files:
        if f.suffix in (".csv", ".png") or f.name == "summary.json":
            print(f"  wrote {f}")
    print(f"  wrote {len([f for f in result.files if f.parent.name == 'compressai'])} CompressAI-style JSON files "
          f"under {result.out_dir / 'compressai'}")
    return 0

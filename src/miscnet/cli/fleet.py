"""`miscnet fleet`: many senders, shared links and a finite receiver, in simulated time."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from miscnet.cli.argtypes import positive_int
from miscnet.core.errors import MiscError


def _scenario_path(arg: str) -> Path:
    """A file, or the name of a committed fleet scenario (experiments/fleets/NAME.toml)."""
    path = Path(arg)
    if path.exists() or path.suffix == ".toml" or "/" in arg:
        return path
    from miscnet.experiments import fleet

    committed = Path(fleet.__file__).parent / "fleets" / f"{arg}.toml"
    if not committed.exists():
        raise MiscError(f"no fleet scenario file or committed scenario named {arg!r}")
    return committed


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_fleet(args: argparse.Namespace) -> int:
    from miscnet.experiments.fleet import load_fleet, run_fleet_sweep

    path = _scenario_path(args.scenario)
    spec = load_fleet(path)
    if args.set:
        from dataclasses import replace

        grid = dict(spec.sweep)
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise MiscError(f"--set {item!r}: give KEY=VALUE (e.g. receiver.workers=2)")
            grid[key] = [_value(value)]
        spec = replace(spec, sweep=grid)
    if args.dask and args.workers != 1:
        print("miscnet: warning: --workers is ignored with --dask", file=sys.stderr)
    results = run_fleet_sweep(spec, path.parent, Path(args.output), workers=args.workers, dask=args.dask,
                              resume=args.resume, progress=not args.json)
    if args.json:
        print(json.dumps([{**r["overrides"], **r["summary"]} for r in results]))
        return 0
    for r in results:
        s = r["summary"]
        point = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or spec.name
        p50 = "-" if s["first_picture_p50_s"] is None else f"{s['first_picture_p50_s']:.2f} s"
        p95 = "-" if s["first_picture_p95_s"] is None else f"{s['first_picture_p95_s']:.2f} s"
        fails = ", ".join(f"{n} {why}" for why, n in sorted(s["failures"].items())) or "none"
        print(f"{point}: {s['senders']} senders, {s['images']} images, {s['complete']} complete; first picture "
              f"p50 {p50}, p95 {p95}; failures: {fails}")
    print(f"wrote {args.output}/results.csv, summary.json and figures")
    return 0


def register(sub) -> None:
    p = sub.add_parser("fleet", help="simulate a fleet: many senders, shared links, a receiver with finite compute")
    p.add_argument("scenario", metavar="SCENARIO", help="a fleet scenario (.toml) or a committed one by name")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="fix one key for this run (e.g. group.cameras.count=100); repeatable")
    p.add_argument("--workers", type=positive_int, default=1, help="grid points run in parallel processes")
    p.add_argument("--dask", metavar="ADDRESS", help="run the points on this Dask scheduler (tcp://host:port)")
    p.add_argument("--resume", action="store_true", help="keep the points an earlier run already wrote")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fleet)

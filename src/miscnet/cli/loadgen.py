"""`miscnet loadgen`: N live edge senders on one machine, to a relay or receiver, or through nodes it starts.

Wired into the CLI by ``register(subparsers, ...)`` (src/miscnet/cli/main.py), which hands over main's
shared option builders (link, protection, node security) so the options read as in every other command.
The engine is miscnet.experiments.loadgen.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from miscnet.cli.argtypes import host_port, positive_float, positive_int
from miscnet.core.errors import MiscError

# options a fleet scenario decides (and a remote run has no use for), each with the flag that sets it
_LINK = ("rate", "trace", "delay", "jitter", "loss", "reorder", "queue", "reverse_rate", "reverse_delay",
         "reverse_loss")
_SHARED = ("shared_rate", "shared_delay", "shared_discipline", "shared_queue", "decode_workers", "policy", "listen")
_PROTECTION = ("protect", "fec_strong_rate", "fec_pixel_rate", "fec_symbols", "max_rounds", "deadline", "mtu")
_SENDERS = ("images", "every", "poisson", "times", "start", "budget", "pacing")
_TLS = ("tls_cert", "tls_key", "tls_ca", "server_name", "watch")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _given(args: argparse.Namespace, parser: argparse.ArgumentParser, dests) -> list[str]:
    return [_flag(d) for d in dests if getattr(args, d) != parser.get_default(d)]


def _spec(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from miscnet.experiments.fleet import load_fleet, point_spec
    from miscnet.experiments.loadgen import simple_spec

    if args.senders is not None and args.senders < 1:
        raise MiscError(f"--senders: give 1 or more, not {args.senders}")
    if args.fleet is None:
        if args.set:
            raise MiscError("--set changes a --fleet scenario; give --fleet SCENARIO")
        if args.senders is None:
            raise MiscError("give --senders N (or --fleet SCENARIO)")
        rate = args.poisson if args.poisson is None or args.poisson.endswith("/s") else f"{args.poisson}/s"
        arrival = f"poisson {rate}" if rate else f"file {args.times}" if args.times else f"every {args.every}"
        images = [n.strip() for n in args.images.split(",") if n.strip()]
        return simple_spec(args.senders, images, arrival, args.duration or "60s", args.seed or 0, start=args.start,
                           budget_bytes=args.budget, pacing=args.pacing)
    from miscnet.cli.fleet import _scenario_path, _value

    given = _given(args, parser, _SENDERS + _PROTECTION)
    if given:
        raise MiscError(f"--fleet: the scenario sets what {given[0]} would; drop {given[0]} (or the scenario)")
    path = _scenario_path(args.fleet)
    spec = load_fleet(path)
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise MiscError(f"--set {item!r}: give KEY=VALUE (e.g. group.cameras.access.trace_offset=0s)")
        overrides[key] = _value(value)
    if args.senders is not None:
        if len(spec.groups) != 1:
            raise MiscError(f"{path.name}: --senders sets one group's count; this scenario has {len(spec.groups)} "
                            "groups (set their counts in the file)")
        overrides[f"group.{spec.groups[0].name}.count"] = args.senders
    if args.duration is not None:
        overrides["duration"] = args.duration
    if args.seed is not None:
        overrides["seed"] = args.seed
    # the scenario's base values: a [sweep] grid is for the simulator (miscnet fleet)
    return point_spec(spec, overrides, path.parent) if overrides or spec.sweep else spec


def cmd_loadgen(args: argparse.Namespace, parser: argparse.ArgumentParser, link_config, transport_config) -> int:
    from miscnet.channel.grpc_util import TlsFiles
    from miscnet.experiments.loadgen import Topology, run_loadgen, topology_of

    spec = _spec(args, parser)
    transport = None if args.fleet else transport_config(args)
    if args.local:
        given = _given(args, parser, _TLS)
        if given:
            raise MiscError(f"{given[0]} is for --to (a node elsewhere): --local runs its own, on loopback without "
                            f"TLS; drop {given[0]}")
        if args.fleet:
            given = _given(args, parser, _LINK + _SHARED[:-1])
            if given:
                raise MiscError(f"--fleet: the scenario gives the links and the receiver; drop {given[0]}")
            topology = topology_of(spec)
        else:
            from miscnet.channel.link import LinkConfig

            shared = None
            if args.shared_rate:
                shared = LinkConfig.from_strings(rate=args.shared_rate, delay=args.shared_delay,
                                                 queue=args.shared_queue, discipline=args.shared_discipline,
                                                 name="shared")
            topology = Topology(link_config(args), shared, args.decode_workers, args.policy)
        result = run_loadgen(spec, Path(args.output), topology=topology, token=args.token, transport=transport,
                             listen=args.listen, drain_s=args.drain, connect_timeout_s=args.connect_timeout)
    else:
        given = _given(args, parser, _LINK + _SHARED)
        if given:
            raise MiscError(f"{given[0]} is for --local (the nodes it starts); the target has its own")
        tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)
        result = run_loadgen(spec, Path(args.output), target=args.to, watch=args.watch, tls=tls, token=args.token,
                             server_name=args.server_name, transport=transport, drain_s=args.drain,
                             connect_timeout_s=args.connect_timeout)
    s = result.summary
    if args.json:
        print(json.dumps({**s, "links": result.links}))
        return 0
    if len(s["per_sender"]) <= 32:
        for p in s["per_sender"]:
            print(f"sender {p['sender']}: {p['delivered']}/{p['images']} images delivered, {p['wire_bytes']} wire "
                  f"bytes ({p['retransmitted_bytes']} retransmitted, {p['fec_bytes']} FEC)")
    shared = result.links.get("shared")
    if shared:
        util = f", utilisation {shared['utilization']:.2f}" if shared.get("utilization") is not None else ""
        print(f"shared link: {int(shared['bytes_delivered'])} bytes delivered, {int(shared['packets_dropped_queue'])} "
              f"packets dropped at its queue{util}")
    print(summary_line(s, watched=bool(args.local or args.watch)))
    print(f"wrote {args.output}/results.csv and summary.json")
    return 0


def summary_line(s: dict, watched: bool = True) -> str:
    """The fleet command's one-line summary, for a live run."""
    def seconds(v):
        return "-" if v is None else f"{v:.2f} s"

    fails = ", ".join(f"{n} {why}" for why, n in sorted(s["failures"].items())) or "none"
    times = (f"first picture p50 {seconds(s['first_picture_p50_s'])}, p95 {seconds(s['first_picture_p95_s'])}"
             if watched else "no stage times (give --watch RECEIVER)")
    return (f"{s['senders']} senders, {s['images']} images, {s['complete']} complete; {times}; failures: {fails}")


def register(subparsers, add_link_options, link_config, add_protection_options, transport_config,
             add_node_options) -> argparse.ArgumentParser:
    """The ``loadgen`` subcommand; the callables are main's shared option builders (see the docstring)."""
    p = subparsers.add_parser(
        "loadgen", help="run N live senders (one stream each) on a fleet's arrival process, to a relay or receiver",
        description="N live edge senders in one process, each with its own stream, capturing on a fleet arrival "
                    "process (every / poisson / a file of times, or a fleet scenario's groups) and streaming to "
                    "--to HOST:PORT, or through a receiver and a relay with a shared bottleneck that --local "
                    "starts on loopback. Writes results.csv (one row per image: times from capture to the first "
                    "picture and the last stage) and summary.json to -o DIR, in miscnet fleet's columns.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", type=host_port, metavar="HOST:PORT", help="a relay or a receiver")
    where.add_argument("--local", action="store_true",
                       help="start a receiver and a relay on loopback (free ports) and send through them")
    p.add_argument("--senders", type=int, metavar="N", help="senders (with --fleet: a one-group scenario's count)")
    p.add_argument("--fleet", metavar="SCENARIO",
                   help="a fleet scenario (.toml, or a committed one by name): its groups, arrivals, protection, "
                   "and with --local its links and receiver; its [sweep] is not run")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="with --fleet: fix one key of the scenario (as miscnet fleet --set); repeatable")
    p.add_argument("--images", default="astronaut,coffee,chelsea,rocket", metavar="NAMES",
                   help="bundled samples, comma-separated, cycled (default astronaut,coffee,chelsea,rocket)")
    arrival = p.add_mutually_exclusive_group()
    arrival.add_argument("--every", default="10s", metavar="TIME", help="one capture per sender every TIME "
                         "(default 10s)")
    arrival.add_argument("--poisson", metavar="RATE/s", help="Poisson captures, e.g. 0.1/s per sender")
    arrival.add_argument("--times", metavar="FILE", help="capture times (seconds after the start), one a line")
    p.add_argument("--start", default="random", metavar="random|TIME",
                   help="each sender's first capture: uniform in one period (default random), or at TIME")
    p.add_argument("--duration", metavar="TIME", help="captures for this long (default 60s, or the scenario's)")
    p.add_argument("--seed", type=int, help="seed of the start offsets and arrival draws (default 0, or the "
                   "scenario's)")
    p.add_argument("--budget", type=positive_int, default=1500, metavar="BYTES", help="bytes per image (default 1500)")
    p.add_argument("--pacing", choices=("aimd", "off"), default="aimd",
                   help="each sender paces its packets to the rate its path delivers (as miscnet sender; default "
                   "aimd) or not")
    p.add_argument("--drain", type=positive_float, default=10.0, metavar="SECONDS",
                   help="after the last send, wait this long at most for the last stages to be decoded (default 10)")
    p.add_argument("--connect-timeout", type=positive_float, default=10.0, metavar="SECONDS")
    p.add_argument("-o", "--output", default="out/loadgen", metavar="DIR",
                   help="results.csv, summary.json (and with --local the receiver's output, receiver/)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    g = p.add_argument_group("remote target")
    g.add_argument("--watch", type=host_port, metavar="HOST:PORT",
                   help="the receiver behind --to: its Watch RPC gives each stage's time")
    g.add_argument("--server-name", help="TLS name expected of the target")
    add_node_options(p, server=False)  # --tls-cert, --tls-key, --tls-ca, --token
    add_protection_options(p)
    add_link_options(p)  # with --local: each stream's own link at the relay
    g = p.add_argument_group("with --local: the relay's shared bottleneck and the receiver")
    g.add_argument("--listen", type=host_port, default="127.0.0.1:0", metavar="HOST:PORT",
                   help="where the relay listens (default a free port on 127.0.0.1)")
    g.add_argument("--shared-rate", metavar="RATE", help="a bottleneck every stream crosses after its own link")
    g.add_argument("--shared-delay", default="0ms", help="its one-way delay (default 0ms)")
    g.add_argument("--shared-discipline", default="drr", choices=["fifo", "drr"],
                   help="deficit round robin by stream (default) or drop-tail FIFO")
    g.add_argument("--shared-queue", metavar="BYTES", help="its queue limit (per stream under drr; default 256 KiB)")
    g.add_argument("--decode-workers", type=positive_int, default=1, metavar="N",
                   help="receiver decode workers (default 1)")
    g.add_argument("--policy", default="newest", choices=["fifo", "newest", "edf", "semantic-first"],
                   help="the receiver's decode scheduling (default newest)")
    p.set_defaults(func=lambda args: cmd_loadgen(args, p, link_config, transport_config))
    return p

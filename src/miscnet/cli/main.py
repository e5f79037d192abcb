"""The ``miscnet`` command line.

Every user error is a MiscError, printed as one line (``miscnet: ...``) with exit status 2; outputs are
written only after everything they depend on succeeded, and atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from miscnet.channel.transport import MODES as PROTECTION_MODES
from miscnet.channel.transport import TransportConfig
from miscnet.cli import fleet as cli_fleet
from miscnet.cli import loadgen as cli_loadgen
from miscnet.cli import models as cli_models
from miscnet.cli import profile as cli_profile
from miscnet.cli import sweep as cli_sweep
from miscnet.cli import view as cli_view
from miscnet.cli.argtypes import host_port as _host_port
from miscnet.cli.argtypes import positive_float as _positive_float
from miscnet.cli.argtypes import positive_int as _positive_int
from miscnet.core.config import MAP_BACKENDS, EncoderConfig, SemanticsConfig, pixel_codec_choices
from miscnet.core.errors import MiscError
from miscnet.core.pixel import lookup as lookup_pixel_codec
from miscnet.core.pixel.block import BLOCK_RULES
from miscnet.receiver.stages import MAX_RENDER_PIXELS

_ENC = EncoderConfig()  # the defaults
_TRANSPORT = TransportConfig()


def add_encoder_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that encodes (encode, simulate, sender, sweep)."""
    g = p.add_argument_group("encoder")
    g.add_argument("--semantics", metavar="FILE", help="JSON sidecar or MISC CSV (default: IMAGE.json beside it)")
    # default None, not boxes: with_map_for tells the default from an explicit --map boxes
    g.add_argument("--map", dest="map_backend", default=None, choices=list(MAP_BACKENDS),
                   help=f"map layer backend (default: {_ENC.map.backend}, from the sidecar's boxes, or none when "
                   "it has no box at all, as MISC's CSV; clip: a CLIP model)")
    g.add_argument("--grid", type=_positive_int, default=_ENC.map.grid,
                   help=f"map grid N (N x N cells, default {_ENC.map.grid})")
    g.add_argument("--pixel", dest="pixel_codec", default=_ENC.pixel_codec, choices=list(pixel_codec_choices()),
                   help=f"pixel layer codec (default {_ENC.pixel_codec})")
    g.add_argument("--net-model", metavar="PATH", help="--pixel net: its weights (default $MISCNET_NET_MODEL)")
    # default None, not 2: codecs that code fewer levels (net, ref: one) take what they code
    g.add_argument("--levels", type=_positive_int, default=None,
                   help=f"pixel levels, coarse first (default {_ENC.levels}; 1 for net and ref, which code one)")
    g.add_argument("--ref", default=_ENC.ref, metavar="FILE",
                   help="--pixel ref: an external codec's output (JPEG, PNG, WebP, AVIF, JPEG 2000) sent byte for "
                   "byte as the pixel layer; it counts in full against the budget")
    g.add_argument("--block-rule", default=_ENC.block_rule, choices=list(BLOCK_RULES),
                   help=f"--pixel block: search (the best grid and step for the budget) or misc (the notebook's "
                   f"rule: blocks of max(long side / 16, 32) px, step 8) (default {_ENC.block_rule})")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--budget", type=_positive_int, default=_ENC.budget_bytes, metavar="BYTES",
                        help="whole-file byte budget")
    budget.add_argument("--bpp", type=_positive_float, default=_ENC.bpp, metavar="X",
                        help="whole-file budget in bits per pixel")
    cli_models.add_semantics_backend_options(g)  # --strict first, then the semantics backends
    cli_models.add_map_model_options(g)


def _levels(args) -> int:
    """--levels, else the default capped at what the codec codes (net and ref: one level; auto: the default)."""
    if args.levels is not None:
        return args.levels
    codec = lookup_pixel_codec(args.pixel_codec)
    return _ENC.levels if codec is None else min(_ENC.levels, codec.max_levels)


def encoder_config(args: argparse.Namespace) -> EncoderConfig:
    """The EncoderConfig the encoder options ask for (with its SemanticsConfig and MapConfig)."""
    return EncoderConfig(pixel_codec=args.pixel_codec, levels=_levels(args), budget_bytes=args.budget, bpp=args.bpp,
                         block_rule=args.block_rule, ref=args.ref, map=cli_models.map_config(args),
                         semantics=cli_models.semantics_config(args))


def with_map_for(config: EncoderConfig, semantics, args: argparse.Namespace, image_arg: str) -> EncoderConfig:
    """config, or config without a map layer when the default map (boxes) meets semantics with no box at all
    (MISC's CSV has none): a note says so once, where an error would ask for --map none. An explicit
    --map boxes still wants a box for every object."""
    if (args.map_backend is not None or config.map.backend != "boxes" or not semantics.objects
            or any(o.box is not None for o in semantics.objects)):
        return config
    print(f"note: {image_arg}: the semantics give no boxes, so no map layer (--map none)", file=sys.stderr)
    return dataclasses.replace(config, map=dataclasses.replace(config.map, backend="none"))


def make_decoder(args: argparse.Namespace):
    from miscnet.receiver.decoders import make_decoder as receiver_make_decoder

    return receiver_make_decoder(cli_models.decoder_config(args))


def load_input(image_arg: str, semantics: SemanticsConfig):
    """(image array, Semantics, warnings, image path) for an IMAGE argument (path or sample:NAME)."""
    from miscnet.core.image_io import load_image
    from miscnet.core.samples import resolve_image_arg
    from miscnet.sender.semantics_source import semantics_for

    path, _ = resolve_image_arg(image_arg)
    image = load_image(path)
    semantics, warnings = semantics_for(semantics, image, image_arg)
    return image, semantics, warnings, path


def encode_report(result) -> dict:
    from miscnet.core.container import CODEC_NAMES, KIND_NAMES
    from miscnet.core.semantic_codec import misc_raw_bytes

    enc = result.encoded
    total = len(result.data)
    layers = [
        {"kind": KIND_NAMES[ly.kind], "level": ly.level, "codec": CODEC_NAMES[ly.codec], "bytes": len(ly.payload)}
        for ly in enc.layers
    ]
    report = {
        "width": enc.width,
        "height": enc.height,
        "bytes": total,
        "bpp": total * 8 / (enc.width * enc.height),
        "payload_bytes": enc.payload_bytes(),
        "overhead_bytes": total - enc.payload_bytes(),
        "layers": layers,
        "warnings": result.warnings,
    }
    if result.semantics is not None:
        report["misc_text_bytes"] = misc_raw_bytes(result.semantics)
    if result.pixel_settings is not None:
        s = result.pixel_settings
        report["pixel"] = {"codec": s.codec, "width": s.width, "height": s.height, "quality": s.quality,
                           "step": s.step, "levels": s.levels}
    return report


def cmd_encode(args: argparse.Namespace) -> int:
    from miscnet.core.image_io import atomic_write_bytes
    from miscnet.sender.encoder import encode_image

    config = encoder_config(args)
    image, semantics, warnings, _ = load_input(args.image, config.semantics)
    result = encode_image(image, semantics, with_map_for(config, semantics, args, args.image))
    # The source checked the same limits (semantics_for passes config.limits) and named the file; the
    # encoder's own check repeats them unnamed, so print the source's alone: each warning once.
    result.warnings = warnings
    atomic_write_bytes(args.output, result.data)
    report = encode_report(result)
    if args.json:
        print(json.dumps(report))
    else:
        for w in result.warnings:
            print(f"warning: {w}", file=sys.stderr)
        parts = ", ".join(f"{ly['kind']}{'.' + str(ly['level']) if ly['kind'] == 'pixel' else ''} "
                          f"{ly['bytes']} B ({ly['codec']})" for ly in report["layers"])
        print(f"{args.output}: {report['bytes']} bytes, {report['bpp']:.4f} bpp "
              f"[{parts}; overhead {report['overhead_bytes']} B]")
    return 0


def _read_misc(path: str):
    from miscnet.core.container import from_bytes

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise MiscError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return from_bytes(data), len(data)
    except MiscError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def cmd_decode(args: argparse.Namespace) -> int:
    from miscnet.core.image_io import atomic_write_bytes, load_image, png_bytes
    from miscnet.core.samples import resolve_image_arg
    from miscnet.experiments import jpeg_progressive  # noqa: F401  (registers the baseline codec: its files decode)
    from miscnet.receiver.stages import progressive_stages

    encoded, total = _read_misc(args.input)
    reference = load_image(resolve_image_arg(args.reference)[0]) if args.reference else None
    if reference is not None and reference.shape[:2] != (encoded.height, encoded.width):
        raise MiscError(f"reference is {reference.shape[1]}x{reference.shape[0]}, "
                        f"the bitstream {encoded.width}x{encoded.height}")
    decoder = make_decoder(args)
    try:
        stages = progressive_stages(encoded)
        images = [decoder.render(stage) for stage in stages]
    except MiscError as exc:
        raise type(exc)(f"{args.input}: {exc}") from None
    if not stages:
        raise MiscError(f"{args.input}: no layers to decode")
    if reference is not None and stages[-1].scaled:
        raise MiscError(f"{args.input}: stages are drawn at {stages[-1].width}x{stages[-1].height} (over "
                        f"{MAX_RENDER_PIXELS} pixels), so they cannot be compared with the reference")
    rows = []
    for i, (stage, image) in enumerate(zip(stages, images, strict=True)):
        row = {"stage": stage.name, "layers": list(stage.layers), "payload_bytes": stage.payload_bytes,
               "psnr": None, "ms_ssim": None}
        if reference is not None and stage.has_pixels:
            from miscnet.experiments.metrics import quality

            q = quality(reference, image)
            row.update(psnr=q["psnr"], ms_ssim=q["ms_ssim"])
        if args.stages:
            row["file"] = str(Path(args.stages) / f"{i:02d}-{stage.name}.png")
        rows.append(row)
    # Everything decoded: now write (atomically), so a failure above leaves no output.
    if args.stages:
        for row, image in zip(rows, images, strict=True):
            atomic_write_bytes(row["file"], png_bytes(image))
    atomic_write_bytes(args.output, png_bytes(images[-1]))
    if args.json:
        print(json.dumps({"width": encoded.width, "height": encoded.height, "bytes": total,
                          "output": args.output, "stages": rows}))
    else:
        for row in rows:
            q = f"  PSNR {row['psnr']:.2f} dB  MS-SSIM {row['ms_ssim']:.4f}" if row["psnr"] is not None else ""
            print(f"{row['stage']:<10} {row['payload_bytes']:>7} B{q}")
        last = stages[-1]
        scaled = f", scaled from {encoded.width}x{encoded.height} to fit {MAX_RENDER_PIXELS} pixels" * last.scaled
        print(f"wrote {args.output} ({last.width}x{last.height}{scaled})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from miscnet.core.container import CODEC_NAMES, KIND_NAMES
    from miscnet.core.semantics import semantics_to_json
    from miscnet.receiver.stages import stage_input

    encoded, total = _read_misc(args.input)
    try:
        stage = stage_input(encoded.width, encoded.height, encoded.layers)
        semantics, masks = stage.semantics, stage.masks  # decoded here, so errors name the file
    except MiscError as exc:
        raise type(exc)(f"{args.input}: {exc}") from None
    layers = []
    for ly in encoded.layers:
        params = getattr(ly, ly.WhichOneof("params"))
        layers.append({"kind": KIND_NAMES[ly.kind], "level": ly.level, "codec": CODEC_NAMES[ly.codec],
                       "bytes": len(ly.payload),
                       "params": {f.name: v for f, v in params.ListFields()}})
    info = {"width": encoded.width, "height": encoded.height, "bytes": total,
            "bpp": total * 8 / (encoded.width * encoded.height),
            "overhead_bytes": total - encoded.payload_bytes(), "layers": layers,
            "semantics": semantics_to_json(semantics) if semantics else None}
    if masks is not None:
        info["masks"] = ["".join("#" if c else "." for c in row) for m in masks for row in m]
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{args.input}: {encoded.width}x{encoded.height}, {total} bytes, {info['bpp']:.4f} bpp, "
          f"overhead {info['overhead_bytes']} B")
    for ly in layers:
        params = " ".join(f"{k}={v}" for k, v in ly["params"].items())
        print(f"  {ly['kind']:<8} level {ly['level']}  {ly['codec']:<9} {ly['bytes']:>6} B  {params}")
    if semantics:
        for obj in semantics.objects:
            print(f"  object: {obj.name}: {obj.detail}")
        print(f"  caption: {semantics.caption}")
    return 0


def add_link_options(p: argparse.ArgumentParser) -> None:
    """Link options shared by every command that has a link (tc / netem / mahimahi semantics)."""
    from miscnet.channel.link import LinkSpec

    d = LinkSpec()
    g = p.add_argument_group("link (tc units: 64kbit, 40ms, 'random 5%', 'gemodel 1% 30% 70% 0.1%')")
    rate = g.add_mutually_exclusive_group()
    rate.add_argument("--rate", help=f"constant forward rate (default {LinkSpec.DEFAULT_RATE})")
    rate.add_argument("--trace", metavar="FILE", help="Mahimahi trace file for the forward rate")
    g.add_argument("--delay", default=d.delay, help=f"one-way propagation delay (default {d.delay})")
    g.add_argument("--jitter", default=d.jitter,
                   help=f"delay jitter, uniform +/- (default {d.jitter}); never reorders by itself")
    g.add_argument("--loss", default=d.loss, help="loss model: none, 'random P', 'gemodel P [R [1-H [1-K]]]', "
                   "'state P13 [P31 [P32 [P23 [P14]]]]' (per packet, as netem) or 'fade GOOD BAD [LOSS_GOOD "
                   f"LOSS_BAD]' (states that last seconds, e.g. 'fade 20s 2s') (default {d.loss})")
    g.add_argument("--outage", metavar="FILE",
                   help="outage file: 'START END' seconds a line, the link delivers nothing in between (packets "
                   "sent then are lost); 'period P' repeats it (miscnet outages TRACE makes one)")
    g.add_argument("--reorder", default=d.reorder, metavar="'P [CORR] [gap N]'",
                   help=f"netem-like reordering: a packet picked with probability P skips the delay (default "
                   f"{d.reorder})")
    g.add_argument("--queue", metavar="BYTES", help="drop-tail queue limit in bytes (default unlimited)")
    g.add_argument("--mtu", type=_positive_int, default=_TRANSPORT.mtu,
                   help=f"packet payload bytes (default {_TRANSPORT.mtu})")
    g.add_argument("--reverse-rate", default=d.reverse_rate, help=f"feedback link rate (default {d.reverse_rate})")
    g.add_argument("--reverse-delay", help="feedback link delay (default: the forward delay)")
    g.add_argument("--reverse-loss", default=d.reverse_loss,
                   help=f"feedback link loss model (default {d.reverse_loss})")


def link_config(args: argparse.Namespace):
    from miscnet.channel.link import LinkSpec

    return LinkSpec(rate=args.rate, trace=args.trace, delay=args.delay, jitter=args.jitter, loss=args.loss,
                    reorder=args.reorder, queue=args.queue, reverse_rate=args.reverse_rate,
                    reverse_delay=args.reverse_delay, reverse_loss=args.reverse_loss, outage=args.outage).build()


def add_protection_options(p: argparse.ArgumentParser) -> None:
    t = _TRANSPORT
    g = p.add_argument_group("protection")
    g.add_argument("--protect", default=t.mode, choices=list(PROTECTION_MODES),
                   help=f"error control (default {t.mode})")
    g.add_argument("--fec-strong-rate", type=_positive_float, default=t.strong_rate,
                   help=f"FEC code rate k/n for the semantic + map block (default {t.strong_rate:g})")
    g.add_argument("--fec-pixel-rate", type=_positive_float, default=t.pixel_rate,
                   help=f"FEC code rate k/n for pixel blocks (default {t.pixel_rate:g})")
    g.add_argument("--fec-symbols", type=_positive_int, default=t.fec_min_symbols, metavar="N",
                   help="under FEC, once the losses seen are isolated, cut a small block into N symbols so one "
                        f"repair costs 1/N of it, not a copy (default {t.fec_min_symbols}; until then, and always "
                        "with 1, each small layer stays one packet, which bursts favour)")
    g.add_argument("--max-rounds", type=_positive_int, default=t.max_rounds,
                   help=f"ARQ retransmission rounds (default {t.max_rounds})")
    g.add_argument("--deadline", type=_positive_float, default=t.deadline_s, metavar="SECONDS",
                   help="give an image up after this")


def transport_config(args: argparse.Namespace) -> TransportConfig:
    return TransportConfig(mode=args.protect, mtu=args.mtu, strong_rate=args.fec_strong_rate,
                           pixel_rate=args.fec_pixel_rate, fec_min_symbols=args.fec_symbols,
                           max_rounds=args.max_rounds, deadline_s=args.deadline)


def cmd_simulate(args: argparse.Namespace) -> int:
    from miscnet.core.image_io import atomic_write_bytes, png_bytes
    from miscnet.experiments.metrics import QUALITY_METRICS
    from miscnet.experiments.simulate import Scenario, SimImage, simulate
    from miscnet.sender.encoder import encode_image

    scenario = Scenario(link=link_config(args), transport=transport_config(args), seed=args.seed,
                        metrics=QUALITY_METRICS)
    config = encoder_config(args)
    items = []
    for arg in args.images:
        image, semantics, _, path = load_input(arg, config.semantics)
        result = encode_image(image, semantics, with_map_for(config, semantics, args, arg))
        items.append(SimImage(path.stem, result.encoded, image))
    results = simulate(items, scenario, keep_images=bool(args.output), decoder=make_decoder(args))
    totals = {key: sum(r["totals"][key] for r in results)
              for key in ("wire_bytes", "retransmitted_bytes", "fec_bytes", "packets_sent", "packets_lost")}
    if args.output:
        out = Path(args.output)
        for r in results:
            for i, (stage, img) in enumerate(r.pop("stage_images")):
                atomic_write_bytes(out / r["image"] / f"{i:02d}-{stage}.png", png_bytes(img))
    report = {"seed": args.seed, "protect": args.protect, "link": scenario.link.forward.describe(),
              "images": results, "totals": totals}
    if args.output:
        atomic_write_bytes(Path(args.output) / "simulate.json", json.dumps(report, indent=1).encode())
    if args.json:
        print(json.dumps(report))
        return 0
    for r in results:
        state = "complete" if r["completed"] else f"INCOMPLETE ({r['failure'] or 'layers lost'})"
        print(f"{r['image']}: {r['bytes']} B, {state}")
        for e in r["events"]:
            q = f"  PSNR {e['psnr']:.2f} dB  MS-SSIM {e['ms_ssim']:.4f}" if e["psnr"] is not None else ""
            print(f"  {e['time_s'] * 1000:9.1f} ms  {e['stage']:<9} payload {e['payload_bytes']:>6} B  "
                  f"wire {e['wire_bytes']:>6} B{q}")
    print("totals: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    return 0


def cmd_link(args: argparse.Namespace) -> int:
    from miscnet.channel.link import saturate

    forward = link_config(args).forward
    result = saturate(forward, args.saturate, args.seed, packet_size=min(1500, args.mtu + 12))
    if args.json:
        print(json.dumps(result))
    else:
        print(" ".join(f"{k}={v:.6g}" for k, v in result.items()))
    return 0


def cmd_outages(args: argparse.Namespace) -> int:
    from miscnet.channel.loss import Outages
    from miscnet.channel.trace import Trace
    from miscnet.channel.units import parse_time

    outages = Outages.from_trace(Trace.load(args.trace), parse_time(args.min_gap))
    sys.stdout.write(outages.to_text())
    return 0


def add_node_options(p: argparse.ArgumentParser, server: bool) -> None:
    """TLS, token and limits, shared by the live nodes."""
    g = p.add_argument_group("security")
    g.add_argument("--tls-cert", metavar="PEM", help="this node's certificate (enables TLS)")
    g.add_argument("--tls-key", metavar="PEM", help="this node's private key")
    g.add_argument("--tls-ca", metavar="PEM",
                   help="CA for the peer: on a server it requires client certificates (mutual TLS)")
    g.add_argument("--token", default=os.environ.get("MISCNET_TOKEN"),
                   help="shared token senders must present (default: $MISCNET_TOKEN)")
    if server:
        g.add_argument("--port-file", metavar="FILE", help="write the bound port here (useful with port 0)")
        g.add_argument("--max-streams", type=_positive_int, default=48, help="open streams at once (default 48)")
        g.add_argument("--idle-timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                       help="end a stream that sends nothing this long (default 30)")
        g.add_argument("--metrics", type=_host_port, metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (the Stats RPC is always on)")


def _tls(args: argparse.Namespace):
    from miscnet.channel.grpc_util import TlsFiles

    return TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)


def _serve_until_signal(server, node, port: int, args: argparse.Namespace, what: str) -> int:
    """Block until SIGINT / SIGTERM, then stop cleanly: finish in-flight calls, flush outputs."""
    import signal
    import threading

    from miscnet.core.image_io import atomic_write_bytes

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    metrics = None
    if args.metrics:
        from miscnet.channel.stats import serve_metrics

        try:
            metrics, metrics_port = serve_metrics(args.metrics, node.counters)
        except MiscError:
            server.stop(grace=0).wait()
            node.close()
            raise
        print(f"{what} metrics at http://{args.metrics.rsplit(':', 1)[0]}:{metrics_port}/metrics", flush=True)
    if args.port_file:
        atomic_write_bytes(args.port_file, str(port).encode())
    host = args.listen.rsplit(":", 1)[0]
    print(f"{what} listening on {host}:{port}", flush=True)
    stop.wait()
    server.stop(grace=2.0).wait()
    if metrics is not None:
        metrics.shutdown()
    node.close()
    print(f"{what} stopped", flush=True)
    return 0


def cmd_receiver(args: argparse.Namespace) -> int:
    from miscnet.receiver.node import ReceiverOptions, serve_receiver

    options = ReceiverOptions(out_dir=Path(args.out), listen=args.listen, tls=_tls(args), token=args.token,
                              decode_workers=args.decode_workers, max_streams=args.max_streams,
                              idle_timeout_s=args.idle_timeout, stage_timeout_s=args.stage_timeout,
                              max_render_pixels=args.max_render_pixels,
                              policy=args.policy, queue_limit=args.queue_limit, print_stages=not args.quiet,
                              shutdown_decode_s=10.0)  # SIGTERM: stop soon; stored images decode at restart
    decoder = make_decoder(args)
    if args.warm:
        from miscnet.experiments.demo import warm_decoder

        warm_decoder(decoder)
    server, node, port = serve_receiver(options, decoder)
    try:
        web = cli_view.start_receiver_web(args, node, port)
    except MiscError:
        server.stop(grace=0).wait()
        node.close()
        raise
    try:
        return _serve_until_signal(server, node, port, args, "receiver")
    finally:
        if web is not None:
            web.shutdown()


def _shared_link(args: argparse.Namespace):
    if not args.shared_rate:
        return None
    from miscnet.channel.link import LinkConfig

    return LinkConfig.from_strings(rate=args.shared_rate, delay=args.shared_delay, queue=args.shared_queue,
                                   discipline=args.shared_discipline, name="shared", outage=args.shared_outage)


def cmd_channel(args: argparse.Namespace) -> int:
    from miscnet.channel.grpc_util import TlsFiles
    from miscnet.channel.relay import RelayOptions, serve_relay

    forward_tls = TlsFiles(args.forward_tls_cert, args.forward_tls_key, args.forward_tls_ca)
    options = RelayOptions(listen=args.listen, forward=args.forward, link=link_config(args), seed=args.seed,
                           tls=_tls(args), forward_tls=forward_tls, token=args.token, max_streams=args.max_streams,
                           forward_server_name=args.forward_server_name, idle_timeout_s=args.idle_timeout,
                           shared=_shared_link(args), stream_offsets=args.stream_offsets)
    server, node, port = serve_relay(options)
    return _serve_until_signal(server, node, port, args, "channel relay")


def cmd_stats(args: argparse.Namespace) -> int:
    from miscnet.channel.stats import fetch_stats

    reply = fetch_stats(args.target, _tls(args), token=args.token, server_name=args.server_name)
    rows = [{"name": m.name, "labels": dict(m.labels), "value": m.value, "kind": m.kind} for m in reply.metrics]
    if args.json:
        print(json.dumps({"node": reply.node, "uptime_s": reply.uptime_s, "metrics": rows}))
        return 0
    print(f"{reply.node} at {args.target}, up {reply.uptime_s:.0f} s")
    for row in rows:
        labels = ",".join(f"{k}={v}" for k, v in sorted(row["labels"].items()))
        print(f"  {row['name']}{'{' + labels + '}' if labels else ''} {row['value']:g}")
    return 0


def cmd_sender(args: argparse.Namespace) -> int:
    from miscnet.channel.pacing import pacing_config
    from miscnet.channel.units import parse_time
    from miscnet.sender.encoder import encode_image
    from miscnet.sender.node import SenderOptions, send_images

    config = encoder_config(args)
    items = []
    for arg in args.images:
        image, semantics, _, path = load_input(arg, config.semantics)
        items.append((path.stem, encode_image(image, semantics, with_map_for(config, semantics, args, arg)).encoded))
    options = SenderOptions(target=args.to, transport=transport_config(args), tls=_tls(args),
                            server_name=args.server_name, token=args.token, retries=args.retry,
                            connect_timeout_s=args.connect_timeout, pacing=pacing_config(args.pacing),
                            trace_offset_s=None if args.trace_offset is None else parse_time(args.trace_offset))
    results = send_images(items, options)
    failed = [r for r in results if not r.delivered]
    if args.json:
        print(json.dumps([r.__dict__ for r in results]))
    else:
        for r in results:
            print(f"{r.name}: {r.detail} in {r.seconds:.2f} s, {r.stats['wire_bytes']} wire bytes, "
                  f"{r.stats['retransmitted_bytes']} retransmitted, {r.stats['fec_bytes']} FEC")
    if failed:
        print(f"miscnet: {len(failed)} image(s) not delivered as '{args.protect}' promises: "
              + ", ".join(f"{r.name} ({r.detail})" for r in failed), file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from miscnet.experiments.demo import run_live_demo, run_offline_demo

    if args.offline:
        run_offline_demo(Path(args.output))
        return 0
    return run_live_demo(Path(args.output), keep=args.keep)


def cmd_samples(args: argparse.Namespace) -> int:
    from miscnet.core.samples import export_samples

    for path in export_samples(Path(args.dest)):
        print(path)
    return 0


class _Command(argparse.ArgumentParser):
    """A subcommand's parser. argparse hands a subcommand's unknown options up to the top level, which
    reports them under its own usage (``miscnet [-h] [--version] COMMAND ...``); this reports them here,
    under the subcommand's usage, as for any other mistake in its options."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    from miscnet import __version__

    parser = argparse.ArgumentParser(prog="miscnet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"miscnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Command)

    p = sub.add_parser("encode", help="encode an image into a .misc file")
    p.add_argument("image", metavar="IMAGE", help="image file, or sample:NAME for a bundled sample")
    p.add_argument("-o", "--output", required=True, metavar="OUT.misc")
    add_encoder_options(p)
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="decode a .misc file (classical decoder, or diffusion with model weights)")
    p.add_argument("input", metavar="IN.misc")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png")
    p.add_argument("--stages", metavar="DIR", help="write one PNG per progressive stage")
    p.add_argument("--reference", metavar="IMAGE", help="original image: report PSNR / MS-SSIM per stage")
    p.add_argument("--json", action="store_true")
    p.add_argument("--net-model", metavar="PATH", help="net pixel layers: their weights (default $MISCNET_NET_MODEL)")
    cli_models.add_decoder_options(p)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("info", help="show the layer table and the semantic text of a .misc file")
    p.add_argument("input", metavar="IN.misc")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("simulate", help="send images over a simulated link in virtual time")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or sample:NAME")
    add_encoder_options(p)
    add_link_options(p)
    add_protection_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("-o", "--output", metavar="DIR", help="write stage images and simulate.json here")
    p.add_argument("--json", action="store_true")
    cli_models.add_decoder_options(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("link", help="measure a link configuration with a saturating sender")
    add_link_options(p)
    p.add_argument("--saturate", type=_positive_float, required=True, metavar="SECONDS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_link)

    p = sub.add_parser("outages", help="print an outage file from a Mahimahi trace's gaps (for --outage)")
    p.add_argument("trace", metavar="TRACE", help="Mahimahi trace file")
    p.add_argument("--min-gap", default="1s", metavar="TIME",
                   help="a gap between delivery opportunities at least this long is an outage (default 1s)")
    p.set_defaults(func=cmd_outages)

    p = sub.add_parser("receiver", help="run the cloud node: reassemble, decode each stage, serve watchers")
    p.add_argument("--listen", type=_host_port, default="127.0.0.1:50051", metavar="HOST:PORT")
    p.add_argument("--out", required=True, metavar="DIR", help="stage images and events.jsonl go here")
    cli_models.add_decoder_options(p)
    p.add_argument("--decode-workers", type=_positive_int, default=2)
    g = p.add_argument_group("limits on decoding")
    g.add_argument("--stage-timeout", type=_positive_float, default=120.0, metavar="SECONDS",
                   help="stop decoding a stage after this long, between passes (default 120)")
    g.add_argument("--policy", default="newest", choices=["fifo", "newest", "edf", "semantic-first"],
                   help="which pending stage a free decoder takes (receiver/scheduling.py; default newest: a "
                   "newer stage of an image replaces a pending one, streams take turns)")
    g.add_argument("--queue-limit", type=_positive_int, metavar="N",
                   help="stages waiting for a decoder at most; past it a stage is rejected, logged and counted")
    g.add_argument("--max-render-pixels", type=_positive_int, default=MAX_RENDER_PIXELS, metavar="N",
                   help=f"draw a stage at most this many pixels, scaled to fit (default {MAX_RENDER_PIXELS})")
    add_node_options(p, server=True)
    cli_view.add_receiver_web_options(p)
    p.set_defaults(func=cmd_receiver)

    p = sub.add_parser("stats", help="print a live node's counters (the Stats RPC)")
    p.add_argument("target", type=_host_port, metavar="HOST:PORT", help="receiver or relay")
    p.add_argument("--server-name", help="TLS name expected of the node")
    add_node_options(p, server=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("channel", help="run the relay: the link model on the wall clock, both directions")
    p.add_argument("--listen", type=_host_port, default="127.0.0.1:50052", metavar="HOST:PORT")
    p.add_argument("--forward", type=_host_port, required=True, metavar="HOST:PORT", help="the receiver")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream-offsets", action="store_true",
                   help="let each sender stream start the access link where it asks in its trace or outage file "
                   "(sender --trace-offset; PROTOCOL.md section 11.1)")
    add_link_options(p)
    add_node_options(p, server=True)
    g = p.add_argument_group("shared bottleneck (every stream's packets cross it after their own link)")
    g.add_argument("--shared-rate", metavar="RATE", help="its rate (enables it), e.g. 1mbit")
    g.add_argument("--shared-delay", default="0ms", help="its one-way delay (default 0ms)")
    g.add_argument("--shared-discipline", default="fifo", choices=["fifo", "drr"],
                   help="drop-tail FIFO, or deficit round robin by stream (default fifo)")
    g.add_argument("--shared-queue", metavar="BYTES", help="its queue limit (per stream under drr; default 256 KiB)")
    g.add_argument("--shared-outage", metavar="FILE", help="its outage file (as --outage; every stream fades together)")
    g = p.add_argument_group("forward TLS (relay -> receiver)")
    g.add_argument("--forward-tls-cert")
    g.add_argument("--forward-tls-key")
    g.add_argument("--forward-tls-ca")
    g.add_argument("--forward-server-name", help="TLS name expected of the receiver")
    p.set_defaults(func=cmd_channel)

    p = sub.add_parser("sender", help="run the edge node: encode and stream images")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--to", type=_host_port, required=True, metavar="HOST:PORT", help="relay or receiver")
    add_encoder_options(p)
    add_protection_options(p)
    p.add_argument("--mtu", type=_positive_int, default=_TRANSPORT.mtu,
                   help=f"packet payload bytes (default {_TRANSPORT.mtu})")
    p.add_argument("--retry", type=int, default=0, metavar="N", help="reconnect N times after a broken stream")
    p.add_argument("--connect-timeout", type=_positive_float, default=10.0, metavar="SECONDS")
    p.add_argument("--pacing", choices=("aimd", "off"), default="aimd",
                   help="pace packets to the rate the path delivers (channel/pacing.py; default aimd) or not")
    p.add_argument("--trace-offset", metavar="TIME",
                   help="ask the relay (started with --stream-offsets) to start this stream's access link this far "
                   "into its trace or outage file, e.g. 30s")
    p.add_argument("--server-name", help="TLS name expected of the peer")
    add_node_options(p, server=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sender)

    p = sub.add_parser("demo", help="the main job: receiver, relay and sender on loopback over an impaired link")
    p.add_argument("-o", "--output", default="out/demo", metavar="DIR")
    p.add_argument("--offline", action="store_true", help="only encode and decode the samples (no network)")
    p.add_argument("--keep", action="store_true", help="keep the receiver and its live view up after the summary")
    p.set_defaults(func=cmd_demo)

    cli_models.register(sub)
    cli_profile.register(sub)
    cli_sweep.register(sub)
    cli_fleet.register(sub)
    cli_loadgen.register(sub, add_link_options, link_config, add_protection_options, transport_config, add_node_options)
    cli_view.register(sub)

    p = sub.add_parser("samples", help="export the bundled sample images and sidecars")
    p.add_argument("dest", metavar="DIR")
    p.set_defaults(func=cmd_samples)
    return parser


def main(argv: list[str] | None = None) -> int:
    # gRPC's C core logs its own copy of errors we already report in one line; GRPC_VERBOSITY=ERROR or
    # DEBUG in the environment brings its logs back.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        try:
            args = build_parser().parse_args(argv)
            if getattr(args, "net_model", None):  # the net pixel codec's weights, for encode and decode alike
                from miscnet.core.pixel import net
                net.use_model(args.net_model)
            return args.func(args)
        finally:
            # Flush here, not at exit: a reader that closed the pipe (| head) is then caught below, instead
            # of Python printing "Exception ignored ... BrokenPipeError" as it shuts down.
            sys.stdout.flush()
    except MiscError as exc:
        print(f"miscnet: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("miscnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (miscnet ... | head): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())

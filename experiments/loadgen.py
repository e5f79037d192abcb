"""Live fleets: N real edge senders on the wall clock, each with its own stream, to a relay or a receiver.

``miscnet loadgen`` (src/miscnet/cli/loadgen.py) is the command; this module is the engine. A fleet
scenario (experiments/fleet.py: groups, arrival processes, start offsets, protection) says who captures
what and when; ``capture_plan`` draws the capture times exactly as the fleet simulator does for the same
scenario and seed, so a scenario can run simulated and live on the same schedule. Each sender is a thread
with one gRPC stream for the whole run (as a deployed camera keeps one), sending with the sender node's
own code (sender/node.py); images are encoded once, before the run.

A sender pipelines as the fleet simulator's does: each capture starts at once on the sender's stream, beside
its images still in flight (sender.node.StreamSender runs them all from the sender's one thread, with one
pacer and one path estimate), and its times count from the capture.

``LocalNodes`` starts a receiver and a relay with an optional shared bottleneck on loopback (free ports),
the topology a fleet scenario's first group describes or one given directly. What a run reports comes
from the receiver's events (its events.jsonl, or its Watch RPC for a remote receiver): per image the time
from capture to the semantic stage, the first picture and the last stage, in the columns ``miscnet
fleet`` writes where they mean the same thing; per sender the bytes it sent; per link what the relay's
Stats counted during the run.
"""

from __future__ import annotations

import functools
import json
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from miscnet.channel.link import DuplexConfig, LinkConfig
from miscnet.core.errors import MiscError
from miscnet.experiments.fleet import (
    SENDER_CHOICES,
    FleetError,
    FleetSpec,
    parse_fleet,
    random_stream,
    rows_csv,
    summarize_rows,
)

LEAD_S = 1.0  # every stream is open this long before the first capture can fall due
PIXEL_PREFIX = "pixel"  # stage names: semantic, map, pixel.0, pixel.1, ...
_STAGE_STATUSES = {"stage", "superseded", "rejected", "decode-error", "decode-timeout"}  # one per stage made
_LINK_STATS = ("packets_sent", "packets_delivered", "packets_dropped_queue", "packets_lost", "bytes_sent",
               "bytes_delivered")


class LoadgenError(MiscError):
    """A load generator run that cannot start: bad options, an unknown image, an unreachable target."""


# ---------------------------------------------------------------- what each sender captures, and when

@dataclass(frozen=True)
class Capture:
    sender: int  # index over the whole fleet
    group: str
    image: str  # a bundled sample
    label: str  # the name the receiver logs; unique within the run
    at: float  # seconds after the run's start
    trace_offset_s: float | None = None  # the sender's drawn start in its access trace (trace_offset = "random")


def capture_plan(spec: FleetSpec) -> list[list[Capture]]:
    """Per sender, its captures, drawn as the fleet simulator (fleet._Sender) draws them for ``spec``: its
    random stream, in its order (a random trace offset, then the start, then Poisson gaps), the same image
    order. tests/test_loadgen.py checks the two agree."""
    plan: list[list[Capture]] = []
    for group in spec.groups:
        for _ in range(group.count):
            index = len(plan)
            rng = random_stream(spec.seed, SENDER_CHOICES, index)
            period = group.access.offset_period_s()  # the trace's period, else the outages'
            offset = None
            if group.random_trace_offset and period:
                offset = float(rng.uniform(0, period))  # the simulator draws the offset first: keep its order
            start = group.start if group.start != "random" else float(rng.uniform(0, group.arrivals.period or 1.0))
            times = group.arrivals.capture_times(rng, start, spec.duration_s)
            names = [group.images[(index + k) % len(group.images)] for k in range(len(times))]
            plan.append([Capture(index, group.name, name, f"s{index}-{k}-{name}", t, offset)
                         for k, (t, name) in enumerate(zip(times, names, strict=True))])
    return plan


def simple_spec(senders: int, images: list[str], arrival: str, duration: str | float, seed: int, start: str = "random",
                budget_bytes: int = 1500, base: Path | None = None, pacing: str = "aimd") -> FleetSpec:
    """A one-group fleet scenario from command-line values, parsed (and checked) as a scenario file is."""
    raw = {"name": "loadgen", "duration": duration, "seed": seed, "encoder": {"budget": budget_bytes},
           "group": [{"name": "senders", "count": senders, "images": list(images), "arrival": arrival,
                      "start": start, "pacing": pacing}]}
    try:
        return parse_fleet(raw, "loadgen", base or Path.cwd())
    except FleetError as exc:  # name the option, not the scenario key it became
        text = str(exc).removeprefix("loadgen: ")
        for key, option in _OPTION_OF.items():
            if text.startswith(key):
                text = option + text[len(key):]
                break
        raise LoadgenError(text) from None


_OPTION_OF = {"group.senders.arrival": "--every / --poisson / --times", "group.senders.start": "--start",
              "group.senders.count": "--senders", "group.senders.images": "--images", "duration": "--duration",
              "group.senders.pacing": "--pacing"}


def encode_images(names, budget_bytes: int) -> dict[str, Any]:
    """{sample name: EncodedImage}, each encoded once with its bundled sidecar's semantics."""
    return {name: _encoded(name, budget_bytes) for name in sorted(set(names))}


@functools.lru_cache(maxsize=64)
def _encoded(name: str, budget_bytes: int):
    # cached per process: encoding (the AVIF rate search) costs seconds, and the same inputs give the same bytes
    from miscnet.core.config import EncoderConfig
    from miscnet.core.image_io import load_image
    from miscnet.core.samples import sample_image_path, sample_sidecar_path
    from miscnet.core.semantics import load_semantics
    from miscnet.sender.encoder import encode_image

    image = load_image(sample_image_path(name))
    semantics, _ = load_semantics(sample_sidecar_path(name))
    return encode_image(image, semantics, EncoderConfig(budget_bytes=budget_bytes)).encoded


# ---------------------------------------------------------------- nodes on loopback

@dataclass(frozen=True)
class Topology:
    """What ``LocalNodes`` starts: each stream's own duplex link at the relay, an optional bottleneck that
    every stream's forward packets cross after it, and the receiver's decoding."""

    link: DuplexConfig
    shared: LinkConfig | None = None
    decode_workers: int = 1
    policy: str = "newest"
    queue_limit: int | None = None
    stream_offsets: bool = False  # the relay honours each stream's trace offset (trace_offset = "random")


def topology_of(spec: FleetSpec) -> Topology:
    """The live topology a fleet scenario describes: the relay gives every stream one link and has one
    shared bottleneck, so every group must have the same access link and a path of at most one link."""
    first = spec.groups[0]
    for g in spec.groups:
        where = f"{spec.source}: group.{g.name}"
        if g.access.with_(name=first.access.name) != first.access:  # each group names its own access link
            raise FleetError(f"{where}.access: differs from group {first.name!r}'s; live, every stream has the "
                             "same access link (the relay's)")
        if g.path != first.path:
            raise FleetError(f"{where}.path: differs from group {first.name!r}'s; live, every stream crosses "
                             "the same bottleneck")
    if len(first.path) > 1:
        raise FleetError(f"{spec.source}: group.{first.name}.path: the live relay has one shared bottleneck, "
                         f"the path crosses {len(first.path)}")
    shared = spec.links[first.path[0]] if first.path else None
    hops = [first.access, *([shared] if shared else [])]
    # the simulator's default feedback link (fleet._Sender): 1 Mbit/s, the forward path's delay
    reverse = spec.reverse or LinkConfig(rate_bps=1e6, delay_s=sum(h.delay_s for h in hops), name="downlink")
    r = spec.receiver
    return Topology(DuplexConfig(first.access, reverse), shared, r.workers, r.policy, r.queue_limit,
                    stream_offsets=any(g.random_trace_offset for g in spec.groups))


class LocalNodes:
    """A receiver (classical decoder) and a relay in front of it, on 127.0.0.1 with free ports (or the
    relay on ``listen``). ``target`` is the relay; ``stop()`` ends both, decoding what is pending, so the
    receiver's events.jsonl is whole."""

    def __init__(self, out_dir: Path, topology: Topology, streams: int = 48, token: str | None = None,
                 listen: str = "127.0.0.1:0", seed: int = 0, idle_timeout_s: float = 30.0):
        from miscnet.channel.relay import RelayOptions, serve_relay
        from miscnet.receiver.classical import ClassicalDecoder
        from miscnet.receiver.node import ReceiverOptions, serve_receiver

        self.topology = topology
        # every stream holds a gRPC worker thread for as long as it is open, at both nodes
        workers = max(64, 2 * streams + 16)
        self.receiver_options = ReceiverOptions(out_dir=Path(out_dir), listen="127.0.0.1:0", token=token,
                                                decode_workers=topology.decode_workers, policy=topology.policy,
                                                queue_limit=topology.queue_limit, max_streams=streams + 8,
                                                grpc_workers=workers, idle_timeout_s=idle_timeout_s)
        self.receiver, self.receiver_node, rx_port = serve_receiver(self.receiver_options, ClassicalDecoder())
        self.receiver_target = f"127.0.0.1:{rx_port}"
        try:
            self.relay, self.relay_node, port = serve_relay(RelayOptions(
                listen=listen, forward=self.receiver_target, link=topology.link, shared=topology.shared, seed=seed,
                token=token, max_streams=streams + 8, grpc_workers=workers, idle_timeout_s=idle_timeout_s,
                stream_offsets=topology.stream_offsets))
        except BaseException:
            self._stop_receiver()
            raise
        self.target = f"{listen.rsplit(':', 1)[0]}:{port}"
        self._stopped = False

    @property
    def events_path(self) -> Path:
        return self.receiver_options.out_dir / "events.jsonl"

    def events(self) -> list[dict]:
        path = self.events_path
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def _stop_receiver(self) -> None:
        self.receiver.stop(grace=1).wait()
        self.receiver_node.close()  # decodes what is pending, then closes the event log

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.relay.stop(grace=1).wait()
        self.relay_node.close()
        self._stop_receiver()

    def __enter__(self) -> LocalNodes:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class EventWatcher:
    """A remote receiver's events through its Watch RPC, each stamped with the wall clock it arrived at
    here (the captures' clock: no clock agreement between machines needed)."""

    def __init__(self, target: str, tls, token: str | None = None, server_name: str | None = None):
        import grpc

        from miscnet.channel.grpc_util import open_channel, token_metadata
        from miscnet.v1 import services_pb2 as spb
        from miscnet.v1 import services_pb2_grpc as sgrpc

        self.rows: list[dict] = []
        self.channel = open_channel(target, tls, server_name=server_name)
        self.call = sgrpc.WatchStub(self.channel).Events(spb.WatchRequest(include_png=False),
                                                           metadata=token_metadata(token))
        self._error: Exception | None = None

        def run() -> None:
            try:
                for ev in self.call:
                    self.rows.append({"key": ev.key, "stream": ev.stream, "image": ev.image, "stage": ev.stage,
                                      "status": ev.status, "complete": ev.complete, "path": ev.path,
                                      "wire_bytes": ev.wire_bytes, "logged_at": time.time()})
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    self._error = exc

        self.thread = threading.Thread(target=run, daemon=True, name="loadgen-watch")
        self.thread.start()

    def events(self) -> list[dict]:
        return list(self.rows)

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(timeout=5)
        self.channel.close()


# ---------------------------------------------------------------- the run

@dataclass
class Sent:
    """One capture as its sender saw it."""

    capture: Capture
    captured: float  # wall clock (time.time()) of the capture
    started: float | None = None  # when its first packet went out (later than captured while the stream was busy)
    finished: float | None = None
    delivered: bool = False
    complete: bool | None = None
    detail: str = "not sent"
    stats: dict = field(default_factory=dict)


def _sender_loop(stream, plan: list[Capture], images: dict[str, Any], options, t0: float, out: list[Sent]) -> None:
    """One sender, as the simulator's: each capture starts on the plan's schedule, at once, while its earlier
    images may still be in flight on the stream (they share its pacer and its path estimate). A broken stream
    fails the images in flight on it, and a stream found ended (a node's idle timeout between sparse
    captures) or broken is opened again for the next capture."""
    from miscnet.channel.transport import PathEstimate
    from miscnet.sender.node import ExchangeStream, StreamBroken, StreamSender

    path = PathEstimate()
    session = None if stream is None else StreamSender(stream, options, path)
    in_flight: dict[str, Sent] = {}  # by label (unique in a run)
    image_id, k = 0, 0
    try:
        while k < len(plan) or in_flight:
            due = t0 + plan[k].at if k < len(plan) else None
            if due is not None and time.time() >= due:
                cap = plan[k]
                k += 1
                sent = Sent(cap, due)
                out.append(sent)
                if session is not None and not in_flight and not session.stream.reader.is_alive():
                    session.stream.close(wait_s=0.5)  # ended meanwhile (the target's idle timeout)
                    session = None
                if session is None:
                    try:
                        session = StreamSender(ExchangeStream(options), options, path)
                    except MiscError as exc:
                        sent.detail = str(exc)
                        continue
                sent.started = time.time()
                session.start(image_id, cap.label, images[cap.image])
                in_flight[cap.label] = sent
                image_id = (image_id + 1) & 0xFFFF
                continue
            if session is None:  # nothing in flight, no stream: wait for the next capture
                time.sleep(max(0.0, due - time.time()))
                continue
            until = None if due is None else time.monotonic() + max(0.0, due - time.time())
            try:
                ended = session.step(until)
            except StreamBroken as broken:
                for sent in in_flight.values():
                    sent.detail, sent.finished = str(broken), time.time()
                in_flight.clear()
                session.stream.close(wait_s=0.5)
                session = None
                continue
            for result in ended:
                sent = in_flight.pop(result.name)
                sent.delivered, sent.complete, sent.detail, sent.stats = (result.delivered, result.complete,
                                                                          result.detail, result.stats)
                sent.finished = time.time()
    finally:
        if session is not None:
            session.stream.close()


def run_senders(spec: FleetSpec, images: dict[str, Any], target: str, *, tls=None, token: str | None = None,
                server_name: str | None = None, connect_timeout_s: float = 10.0,
                lead_s: float = LEAD_S, on_open=None) -> tuple[list[Sent], float]:
    """Open one stream per sender (all before the first capture: an unreachable target fails here, before
    any work; then ``on_open()``), then capture and send on the plan's schedule; returns (every capture, the
    run's t0)."""
    from miscnet.channel.grpc_util import TlsFiles
    from miscnet.sender.node import ExchangeStream, SenderOptions

    plan = capture_plan(spec)
    groups = [g for g in spec.groups for _ in range(g.count)]
    options = [SenderOptions(target=target, transport=g.transport, pacing=g.pacing, tls=tls or TlsFiles(),
                             server_name=server_name, token=token, connect_timeout_s=connect_timeout_s,
                             trace_offset_s=caps[0].trace_offset_s if caps else None)
               for g, caps in zip(groups, plan, strict=True)]
    streams: list = []
    try:
        for o in options:
            streams.append(ExchangeStream(o))
    except MiscError as exc:
        for s in streams:
            s.close(wait_s=0.5)
        raise LoadgenError(str(exc)) from None
    if on_open is not None:
        on_open()
    results: list[list[Sent]] = [[] for _ in plan]
    t0 = time.time() + lead_s
    threads = [threading.Thread(target=_sender_loop, args=(streams[i], plan[i], images, options[i], t0, results[i]),
                                name=f"loadgen-sender-{i}", daemon=True) for i in range(len(plan))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [s for per in results for s in per], t0


def stats_of(target: str, tls=None, token: str | None = None, server_name: str | None = None) -> dict[str, float]:
    """A node's unlabelled Stats, {name: value}; {} when it does not answer (the report then has no links)."""
    from miscnet.channel.grpc_util import TlsFiles
    from miscnet.channel.stats import fetch_stats

    try:
        reply = fetch_stats(target, tls or TlsFiles(), token=token, server_name=server_name)
    except MiscError:
        return {}
    return {m.name: m.value for m in reply.metrics if not m.labels}


# ---------------------------------------------------------------- what a run reports

def _stage_index(event: dict) -> int:
    try:
        return int(str(event.get("key", "")).rsplit("/", 1)[-1])
    except ValueError:
        return -1


class _Quality:
    """PSNR / MS-SSIM of a stage image the receiver wrote, against the sample it came from (cached)."""

    def __init__(self) -> None:
        self.references: dict[str, np.ndarray] = {}
        self.cache: dict[str, tuple[float | None, float | None]] = {}

    def of(self, sample: str, path: str) -> tuple[float | None, float | None]:
        if path in self.cache:
            return self.cache[path]
        from miscnet.core.image_io import load_image
        from miscnet.core.samples import sample_image_path
        from miscnet.experiments.metrics import ms_ssim, psnr

        value: tuple[float | None, float | None] = (None, None)
        try:
            image = load_image(path)
            if sample not in self.references:
                self.references[sample] = load_image(sample_image_path(sample))
            reference = self.references[sample]
            if image.shape == reference.shape:  # a stage drawn scaled down is not comparable
                value = (psnr(reference, image), ms_ssim(reference, image))
        except (MiscError, OSError):
            pass  # not on this machine (a remote receiver) or unreadable: no quality
        self.cache[path] = value
        return value


def _failure(deadlines, sent: Sent, last_s, complete: bool, final: dict | None) -> str:
    """Why an image failed, in the fleet's words (fleet._failure) where the live run knows the same thing."""
    if last_s is not None:
        return "deadline missed" if deadlines and last_s > max(deadlines) else ""
    if not complete:
        if sent.started is None:
            return f"not sent ({sent.detail})"
        if sent.finished is not None and not sent.delivered:
            return "lost on the channel"
        return "unfinished at the end of the run"
    status = final.get("status") if final else None
    if status == "rejected":
        return "rejected by the receiver's queue" if final.get("reason") != "deadline" else \
            "deadline missed (dropped from the queue)"
    if status in ("decode-error", "decode-timeout", "superseded"):
        return f"stage {status}"
    return "unfinished at the end of the run (decode queue)"


def image_rows(spec: FleetSpec, sent: list[Sent], events: list[dict], t0: float, quality: bool = True) -> list[dict]:
    """One row per capture, in ``miscnet fleet``'s results.csv columns (times in seconds from capture)."""
    by_label: dict[str, list[dict]] = {}
    for e in events:
        by_label.setdefault(e.get("image", ""), []).append(e)
    measure = _Quality() if quality else None
    rows = []
    for s in sent:
        cap, evs = s.capture, by_label.get(s.capture.label, [])
        made = [e for e in evs if e.get("status") in _STAGE_STATUSES]
        decoded = [e for e in made if e["status"] == "stage"]
        rel = [(e["logged_at"] - s.captured, e) for e in decoded]
        semantic = [t for t, e in rel if not e["stage"].startswith(PIXEL_PREFIX)]
        pictures = [t for t, e in rel if e["stage"].startswith(PIXEL_PREFIX)]
        final = next((e for e in made if e.get("complete")), None)
        last_s = next((t for t, e in rel if e is final), None)
        stored = next((e for e in evs if e.get("status") == "stored"), None)
        complete = stored is not None or final is not None
        row = {"group": cap.group, "sender": cap.sender, "image": cap.image, "captured_s": round(s.captured - t0, 6),
               "wire_bytes": int(s.stats.get("wire_bytes", 0)), "complete": complete,
               "delivered_s": None if stored is None else stored["logged_at"] - s.captured,
               "semantic_s": min(semantic, default=None), "first_picture_s": min(pictures, default=None),
               "last_stage_s": last_s, "stages": len(made), "stages_decoded": len(decoded),
               "sender_state": "done" if s.delivered else "failed" if s.started is not None else "not sent",
               "failure": _failure(spec.deadlines, s, last_s, complete, final),
               "label": cap.label, "stream": next((e["stream"] for e in evs if e.get("stream")), ""),
               "send_wait_s": None if s.started is None else max(0.0, s.started - s.captured)}
        for d in spec.deadlines:
            by_then = [(_stage_index(e), e) for t, e in rel if t <= d]
            newest = max(by_then, key=lambda item: item[0], default=(None, None))[1]
            psnr = msssim = None
            if newest is not None and measure is not None and newest["stage"].startswith(PIXEL_PREFIX):
                psnr, msssim = measure.of(cap.image, newest.get("path", ""))
            row[f"psnr_at_{d:g}s"] = psnr
            row[f"ms_ssim_at_{d:g}s"] = msssim
        rows.append(row)
    return rows


def summarize(spec: FleetSpec, rows: list[dict], sent: list[Sent], run_s: float) -> dict:
    """The fleet's summary keys (same meaning), and each sender's bytes."""
    senders = sum(g.count for g in spec.groups)
    summary: dict[str, Any] = summarize_rows(rows, spec.deadlines, senders)
    per_sender = []
    for i in range(senders):
        mine = [s for s in sent if s.capture.sender == i]
        streams = sorted({r["stream"] for r in rows if r["sender"] == i and r["stream"]})
        per_sender.append({"sender": i, "group": mine[0].capture.group if mine else "",
                           "images": len(mine), "delivered": sum(s.delivered for s in mine),
                           **{k: int(sum(s.stats.get(k, 0) for s in mine))
                              for k in ("wire_bytes", "retransmitted_bytes", "fec_bytes", "packets_sent")},
                           "streams": streams})
    summary.update(duration_s=spec.duration_s, run_s=run_s, per_sender=per_sender)
    return summary


def link_report(before: dict[str, float], after: dict[str, float], run_s: float,
                shared: LinkConfig | None = None, flow_bytes: dict | None = None) -> dict:
    """What the relay's Stats counted during the run, per link: the shared bottleneck and the streams' own."""
    links = {}
    for prefix, name in (("shared_", "shared"), ("forward_", "access (all streams)"), ("reverse_", "reverse")):
        if f"{prefix}packets_sent" not in after:
            continue
        entry = {k: after.get(prefix + k, 0) - before.get(prefix + k, 0) for k in _LINK_STATS}
        if prefix == "shared_" and shared is not None and shared.rate_bps and run_s > 0:
            entry["utilization"] = entry["bytes_delivered"] * 8 / (shared.rate_bps * run_s)
        links[name] = entry
    if flow_bytes is not None and "shared" in links:
        links["shared"]["flow_bytes"] = [int(v) for _, v in sorted(flow_bytes.items(), key=lambda kv: str(kv[0]))]
    return links


def write_outputs(out: Path, name: str, rows: list[dict], summary: dict, links: dict) -> None:
    """results.csv and summary.json, as ``miscnet fleet`` writes them (one point, named "live")."""
    from miscnet.core.image_io import atomic_write_bytes

    out = Path(out)
    atomic_write_bytes(out / "results.csv", rows_csv([{"point": "live", **r} for r in rows]).encode())
    point = {"point": "live", **summary, "links": links}
    atomic_write_bytes(out / "summary.json", json.dumps({"scenario": name, "live": True, "points": [point]},
                                                        indent=1).encode())


@dataclass
class LoadgenResult:
    rows: list[dict]
    summary: dict
    links: dict
    receiver: dict  # the receiver's counters during the run (local nodes), else {}


def run_loadgen(spec: FleetSpec, out: Path, *, target: str | None = None, topology: Topology | None = None,
                watch: str | None = None, tls=None, token: str | None = None, server_name: str | None = None,
                connect_timeout_s: float = 10.0, transport=None, listen: str = "127.0.0.1:0",
                drain_s: float = 10.0, lead_s: float = LEAD_S, quality: bool = True,
                images: dict[str, Any] | None = None) -> LoadgenResult:
    """Run ``spec``'s senders live and write results.csv and summary.json to ``out``.

    With ``topology`` (and no ``target``) the receiver and relay are started here (LocalNodes; the receiver
    writes under ``out/receiver``). With ``target`` the senders stream there; ``watch`` names the receiver
    whose Watch RPC gives the stage times (without it the rows have no stage times). ``images`` ({sample
    name: EncodedImage}, e.g. what a simulation of the same scenario sends) skips the encoding.
    """
    if (target is None) == (topology is None):
        raise LoadgenError("give a target or a local topology, not both or neither")
    if transport is not None:
        spec = replace(spec, groups=tuple(replace(g, transport=transport) for g in spec.groups))
    from miscnet.core.samples import sample_image_path

    names = {n for g in spec.groups for n in g.images}
    for name in sorted(names):
        sample_image_path(name)  # an unknown name fails now, before any work
    senders = sum(g.count for g in spec.groups)
    out = Path(out)
    if topology is not None:
        rx_dir = out / "receiver"
        if rx_dir.exists():  # an earlier run's receiver: its events would mix with this run's
            if not (rx_dir / "events.jsonl").is_file():
                raise LoadgenError(f"{rx_dir} is in the way (not a receiver's folder from an earlier run)")
            shutil.rmtree(rx_dir)
        nodes = LocalNodes(rx_dir, topology, streams=senders, token=token, listen=listen, seed=spec.seed)
        try:
            images = images or encode_images(names, spec.budget_bytes)  # before the streams open (they would idle)
            before: dict = {}
            sent, t0 = run_senders(spec, images, nodes.target, token=token, connect_timeout_s=connect_timeout_s,
                                   lead_s=lead_s, on_open=lambda: before.update(stats_of(nodes.target, token=token)))
            _settle(nodes.events, sent, drain_s)
            run_s = time.time() - t0
            after = stats_of(nodes.target, token=token)
            rx = stats_of(nodes.receiver_target, token=token)
            flows = nodes.relay_node.shared.flow_bytes() if (topology.shared is not None and
                                                             topology.shared.discipline == "drr") else None
        finally:
            nodes.stop()
        events = nodes.events()
        links = link_report(before, after, run_s, topology.shared, flows)
    else:
        images = images or encode_images(names, spec.budget_bytes)
        watcher = EventWatcher(watch, tls, token, server_name) if watch else None
        try:
            before = {}
            sent, t0 = run_senders(spec, images, target, tls=tls, token=token, server_name=server_name,
                                   connect_timeout_s=connect_timeout_s, lead_s=lead_s,
                                   on_open=lambda: before.update(stats_of(target, tls, token, server_name)))
            if watcher is not None:
                _settle(watcher.events, sent, drain_s)
            run_s = time.time() - t0
            after = stats_of(target, tls, token, server_name)
        finally:
            if watcher is not None:
                watcher.close()
        events = watcher.events() if watcher is not None else []
        rx = {}
        links = link_report(before, after, run_s)
    rows = image_rows(spec, sent, events, t0, quality=quality)
    summary = summarize(spec, rows, sent, run_s)
    if rx:
        summary["receiver"] = {k: v for k, v in rx.items() if k.startswith(("stages_", "images_", "streams_"))}
    write_outputs(out, spec.name, rows, summary, links)
    return LoadgenResult(rows, summary, links, summary.get("receiver", {}))


def _settle(events, sent: list[Sent], drain_s: float) -> None:
    """Wait (at most ``drain_s``) until every image its sender delivered has its last stage decoded."""
    want = {s.capture.label for s in sent if s.delivered}
    end = time.monotonic() + drain_s
    while time.monotonic() < end:
        done = {e.get("image") for e in events() if e.get("complete") and e.get("status") in _STAGE_STATUSES}
        if want <= done:
            return
        time.sleep(0.2)

"""The main job on the embedded default: every bundled sample through encode and classical decode.

``run_live_demo`` (``miscnet demo``, ``make demo``): a receiver, a channel relay and a sender as three
processes on loopback. The receiver decodes every stage in arrival order (policy fifo: none superseded on
any machine), its decoder warmed first, behind a link slow enough (8 kbit/s) that each stage is on screen
for a while; it serves the live web view, whose URL the demo prints. The demo prints one line per stage
as it arrives and a summary table at the end (PSNR, MS-SSIM, SSIMULACRA2, FLIP), and writes report.csv,
two plots and the nodes' logs. ``run_offline_demo`` (``--offline``) only encodes and decodes the samples:
``<sample>.misc``, ``<sample>/NN-<stage>.png`` per progressive stage, ``summary.csv`` (one row per stage).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from miscnet.core.config import EncoderConfig
from miscnet.core.container import from_bytes
from miscnet.core.image_io import atomic_write_bytes, load_image, png_bytes
from miscnet.core.samples import SAMPLE_NAMES, sample_image_path, sample_sidecar_path
from miscnet.core.semantics import load_semantics
from miscnet.experiments.metrics import quality, quality_report
from miscnet.receiver.classical import ClassicalDecoder
from miscnet.receiver.node import stage_label
from miscnet.receiver.stages import progressive_stages
from miscnet.sender.encoder import encode_image

FIELDS = ["image", "width", "height", "stage", "label", "payload_bytes", "file_bytes", "bpp", "psnr", "ssim", "ms_ssim",
          "ssimulacra2", "flip"]
NO_QUALITY = {"psnr": None, "ssim": None, "ms_ssim": None, "ssimulacra2": None, "flip": None}


def run_offline_demo(out_dir: Path, config: EncoderConfig | None = None) -> list[dict]:
    config = config or EncoderConfig()
    decoder = ClassicalDecoder()
    rows: list[dict] = []
    for name in SAMPLE_NAMES:
        image = load_image(sample_image_path(name))
        semantics, _ = load_semantics(sample_sidecar_path(name))
        result = encode_image(image, semantics, config)
        atomic_write_bytes(out_dir / f"{name}.misc", result.data)
        encoded = from_bytes(result.data)  # decode what was written, as a receiver would
        height, width = image.shape[:2]
        for i, stage in enumerate(progressive_stages(encoded)):
            recon = decoder.render(stage)
            atomic_write_bytes(out_dir / name / f"{i:02d}-{stage.name}.png", png_bytes(recon))
            q = NO_QUALITY
            if stage.has_pixels:
                q = {**quality(image, recon), **quality_report(image, recon, ("ssimulacra2", "flip"))}
            rows.append({"image": name, "width": width, "height": height, "stage": stage.name,
                         "label": stage_label(stage.name),
                         "payload_bytes": stage.payload_bytes, "file_bytes": len(result.data),
                         "bpp": round(len(result.data) * 8 / (width * height), 5), **q})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out_dir / "summary.csv", buf.getvalue().encode())
    print(format_table(rows))
    print(f"\nwrote {out_dir}/summary.csv, the .misc files and the stage images")
    return rows


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'image':<18} {'size':>9} {'stage':<13} {'bytes':>6} {'file':>6} {'bpp':>7} {'PSNR':>6} {'MS-SSIM':>7} "
             f"{'SSIMU2':>6} {'FLIP':>6}"]
    for r in rows:
        lines.append(f"{r['image']:<18} {r['width']:>4}x{r['height']:<4} {r['label']:<13} {r['payload_bytes']:>6} "
                     f"{r['file_bytes']:>6} {r['bpp']:>7.4f} {_num(r['psnr'], '.2f'):>6} "
                     f"{_num(r['ms_ssim'], '.4f'):>7} {_num(r['ssimulacra2'], '.1f'):>6} {_num(r['flip'], '.3f'):>6}")
    return "\n".join(lines)


def warm_decoder(decoder, sample: str = "chelsea") -> None:
    """Decode (and write as PNG, as a receiver does) every stage of one bundled sample, so that the first
    real image does not pay for imports, caches and first allocations."""
    image = load_image(sample_image_path(sample))
    semantics, _ = load_semantics(sample_sidecar_path(sample))
    for stage in progressive_stages(encode_image(image, semantics, EncoderConfig()).encoded):
        png_bytes(decoder.render(stage))


# ---------------------------------------------------------------- the live demo (the README's main job)

# 8 kbit/s: each stage of each sample takes a visible while to cross (0.1 to 2 s), against 64 kbit/s where a
# whole image crossed in 0.1 to 0.4 s, faster than its stages decode.
DEMO_LINK = ["--rate", "8kbit", "--delay", "40ms", "--loss", "gemodel 1% 30% 70% 0.1%"]
DEMO_PROTECT = "hybrid"
# fifo: every stage is decoded, in arrival order (the default "newest" drops a stage a newer one overtook)
DEMO_RECEIVER = ["--policy", "fifo", "--warm"]
REPORT_FIELDS = ["image", "stage", "label", "status", "time_s", "payload_bytes", "wire_bytes", "decode_latency_s",
                 "complete", "psnr", "ms_ssim", "ssimulacra2", "flip", "logged_at"]


def _start(args: list[str], log: Path):
    import subprocess
    import sys

    handle = log.open("w")
    return subprocess.Popen([sys.executable, "-m", "miscnet", *args], stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)  # our Ctrl-C reaches them through us, cleanly, once


def _wait_port(proc, port_file: Path, log: Path, what: str, timeout: float = 90.0) -> int:
    import time

    from miscnet.core.errors import MiscError

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        if proc.poll() is not None:
            raise MiscError(f"the {what} exited: {log.read_text().strip().splitlines()[-1:]}")
        time.sleep(0.05)
    raise MiscError(f"the {what} did not start within {timeout:g} s (see {log})")


def _stop(proc, timeout: float = 15.0) -> None:
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


STAGE_STATUSES = ("stage", "superseded", "rejected", "decode-error", "decode-timeout")


class _Watcher:
    """Prints each stage as the receiver reports it (decoded or not), with PSNR / MS-SSIM when decoded."""

    def __init__(self, target: str, references: dict[str, object]):
        import threading

        import grpc

        from miscnet.v1 import services_pb2 as spb
        from miscnet.v1 import services_pb2_grpc as sgrpc

        self.references = references
        self.rows: list[dict] = []
        self.pngs: dict[int, bytes] = {}  # row index -> the stage's PNG, for the perceptual metrics at the end
        self.channel = grpc.insecure_channel(target)
        self.call = sgrpc.WatchStub(self.channel).Events(spb.WatchRequest(include_png=True))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import grpc

        from miscnet.core.image_io import decode_image_bytes

        try:
            for ev in self.call:
                row = {"image": ev.image, "stage": ev.stage, "label": stage_label(ev.stage), "status": ev.status,
                       "time_s": ev.time_s, "payload_bytes": ev.payload_bytes, "wire_bytes": ev.wire_bytes,
                       "decode_latency_s": ev.decode_latency_s if ev.status == "stage" else None,
                       "complete": ev.complete, "logged_at": ev.logged_at, **NO_QUALITY}
                reference = self.references.get(ev.image)
                if ev.png and ev.status == "stage" and ev.stage.startswith("pixel") and reference is not None:
                    row.update(quality_report(reference, decode_image_bytes(ev.png, ev.image), ("psnr", "ms_ssim")))
                    self.pngs[len(self.rows)] = bytes(ev.png)
                self.rows.append(row)
                if ev.status in STAGE_STATUSES:
                    q = f"  PSNR {row['psnr']:5.2f} dB  MS-SSIM {row['ms_ssim']:.3f}" if row["psnr"] else ""
                    what = "" if ev.status == "stage" else f"  {ev.status.upper()}: not decoded"
                    done = "  (complete)" if ev.complete and ev.status == "stage" else ""
                    print(f"  {ev.time_s * 1000:8.1f} ms  {ev.image:<18} {row['label']:<13} "
                          f"{ev.payload_bytes:>5} B payload  {ev.wire_bytes:>5} B on the wire{q}{what}{done}",
                          flush=True)
                elif ev.status in ("incomplete", "abandoned"):
                    print(f"  {ev.image}: {ev.status.upper()}", flush=True)
        except grpc.RpcError:
            pass

    def add_perceptual(self) -> None:
        """SSIMULACRA2 and FLIP of every decoded pixel stage (slower than PSNR: after the transfer)."""
        from miscnet.core.image_io import decode_image_bytes

        for i, png in self.pngs.items():
            row = self.rows[i]
            recon = decode_image_bytes(png, row["image"])
            row.update(quality_report(self.references[row["image"]], recon, ("ssimulacra2", "flip")))

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(timeout=5)
        self.channel.close()


def format_live_table(rows: list[dict]) -> str:
    lines = [f"{'image':<18} {'stage':<13} {'status':<11} {'wire B':>6} {'at ms':>8} {'decode ms':>9} {'PSNR':>6} "
             f"{'MS-SSIM':>7} {'SSIMU2':>6} {'FLIP':>6}"]
    for r in rows:
        decode = None if r["decode_latency_s"] is None else r["decode_latency_s"] * 1000
        lines.append(f"{r['image']:<18} {r['label']:<13} {r['status']:<11} {r['wire_bytes']:>6} "
                     f"{r['time_s'] * 1000:>8.1f} {_num(decode, '.0f'):>9} {_num(r['psnr'], '.2f'):>6} "
                     f"{_num(r['ms_ssim'], '.4f'):>7} {_num(r['ssimulacra2'], '.1f'):>6} {_num(r['flip'], '.3f'):>6}")
    return "\n".join(lines)


def run_live_demo(out_dir: Path, keep: bool = False) -> int:
    """Receiver, relay and sender as three processes on loopback; live progress; a report folder.

    ``keep``: leave the receiver and its web view up after the summary, until Ctrl-C.
    """
    import shutil
    import time

    from miscnet.experiments.plots_demo import write_demo_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("received", "logs", "report.csv", "quality_vs_bytes.png", "quality_vs_time.png"):
        path = out_dir / stale
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    logs = out_dir / "logs"
    logs.mkdir()
    references = {name: load_image(sample_image_path(name)) for name in SAMPLE_NAMES}
    procs = []
    watcher = None
    try:
        rx = _start(["receiver", "--listen", "127.0.0.1:0", "--port-file", str(logs / "receiver.port"),
                     "--out", str(out_dir / "received"), *DEMO_RECEIVER, "--web", "127.0.0.1:0",
                     "--web-port-file", str(logs / "web.port")], logs / "receiver.log")
        procs.append(rx)
        print("receiver: warming its decoder ...", flush=True)
        rx_port = _wait_port(rx, logs / "receiver.port", logs / "receiver.log", "receiver")
        web_port = _wait_port(rx, logs / "web.port", logs / "receiver.log", "receiver's web view")
        relay = _start(["channel", "--listen", "127.0.0.1:0", "--port-file", str(logs / "channel.port"),
                        "--forward", f"127.0.0.1:{rx_port}", *DEMO_LINK, "--seed", "1"], logs / "channel.log")
        procs.append(relay)
        relay_port = _wait_port(relay, logs / "channel.port", logs / "channel.log", "channel relay")
        print(f"receiver on 127.0.0.1:{rx_port} (one line per stage in {logs / 'receiver.log'}), channel relay on "
              f"127.0.0.1:{relay_port} ({' '.join(DEMO_LINK)}), protection {DEMO_PROTECT}")
        print(f"live view: http://127.0.0.1:{web_port}/  (open it in a browser to watch the images sharpen)",
              flush=True)
        watcher = _Watcher(f"127.0.0.1:{rx_port}", references)
        print(f"sender: encoding and sending {len(SAMPLE_NAMES)} samples ...", flush=True)
        sender = _start(["sender", "--to", f"127.0.0.1:{relay_port}", "--protect", DEMO_PROTECT,
                         *[f"sample:{n}" for n in SAMPLE_NAMES]], logs / "sender.log")
        procs.append(sender)
        sender_code = sender.wait()
        # let the receiver finish decoding what arrived last
        end = time.monotonic() + 60
        while time.monotonic() < end:
            finished = {r["image"] for r in watcher.rows if r["complete"] and r["status"] == "stage"
                        or r["status"] in ("incomplete", "abandoned")}
            if finished >= set(SAMPLE_NAMES):
                break
            time.sleep(0.1)
        watcher.close()
        print((logs / "sender.log").read_text().rstrip())
        print("measuring SSIMULACRA2 and FLIP of the decoded stages ...", flush=True)
        watcher.add_perceptual()
        rows = [r for r in watcher.rows if r["status"] in STAGE_STATUSES]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=REPORT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(out_dir / "report.csv", buf.getvalue().encode())
        plots = write_demo_plots(rows, out_dir)
        complete = {r["image"] for r in rows if r["complete"] and r["status"] == "stage"}
        superseded = sum(r["status"] != "stage" for r in rows)
        print("\n" + format_live_table(rows))
        print(f"\n{len(complete)}/{len(SAMPLE_NAMES)} images complete; {len(rows)} stages, {superseded} not decoded. "
              f"Report in {out_dir}/: received/ (stage images and events.jsonl), report.csv, "
              f"{', '.join(p.name for p in plots)}, logs/")
        if keep:
            print(f"the live view stays up at http://127.0.0.1:{web_port}/ until Ctrl-C", flush=True)
            try:
                rx.wait()
            except KeyboardInterrupt:
                pass
    finally:
        if watcher is not None:
            watcher.close()
        for proc in reversed(procs):
            _stop(proc)
    return 0 if sender_code == 0 and len(complete) == len(SAMPLE_NAMES) else 1

"""The main job on the embedded default: every bundled sample through encode and classical decode.

Writes, under the output folder: ``<sample>.misc``, ``<sample>/NN-<stage>.png`` for each progressive
stage, ``summary.csv`` (one row per stage) and prints a table of bytes and quality.
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
from miscnet.experiments.metrics import quality
from miscnet.receiver.classical import ClassicalDecoder
from miscnet.receiver.stages import progressive_stages
from miscnet.sender.encoder import encode_image

FIELDS = ["image", "width", "height", "stage", "payload_bytes", "file_bytes", "bpp", "psnr", "ssim", "ms_ssim"]


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
            q = quality(image, recon) if stage.has_pixels else {"psnr": None, "ssim": None, "ms_ssim": None}
            rows.append({"image": name, "width": width, "height": height, "stage": stage.name,
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


def format_table(rows: list[dict]) -> str:
    lines = [f"{'image':<18} {'size':>9} {'stage':<9} {'bytes':>6} {'file':>6} {'bpp':>7} {'PSNR':>6} {'MS-SSIM':>7}"]
    for r in rows:
        psnr = f"{r['psnr']:.2f}" if r["psnr"] is not None else "-"
        msssim = f"{r['ms_ssim']:.4f}" if r["ms_ssim"] is not None else "-"
        lines.append(f"{r['image']:<18} {r['width']:>4}x{r['height']:<4} {r['stage']:<9} {r['payload_bytes']:>6} "
                     f"{r['file_bytes']:>6} {r['bpp']:>7.4f} {psnr:>6} {msssim:>7}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the live demo (the README's main job)

DEMO_LINK = ["--rate", "64kbit", "--delay", "40ms", "--loss", "gemodel 1% 30% 70% 0.1%"]
DEMO_PROTECT = "hybrid"


def _start(args: list[str], log: Path):
    import subprocess
    import sys

    handle = log.open("w")
    return subprocess.Popen([sys.executable, "-m", "miscnet", *args], stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)  # our Ctrl-C reaches them through us, cleanly, once


def _wait_port(proc, port_file: Path, log: Path, what: str, timeout: float = 60.0) -> int:
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


class _Watcher:
    """Prints each reconstruction as it arrives, with PSNR against the original when we have it."""

    def __init__(self, target: str, references: dict[str, object]):
        import threading

        import grpc

        from miscnet.v1 import services_pb2 as spb
        from miscnet.v1 import services_pb2_grpc as sgrpc

        self.references = references
        self.rows: list[dict] = []
        self.channel = grpc.insecure_channel(target)
        self.call = sgrpc.WatchStub(self.channel).Events(spb.WatchRequest(include_png=True))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import grpc

        from miscnet.core.image_io import decode_image_bytes
        from miscnet.experiments.metrics import quality as quality_of

        try:
            for ev in self.call:
                row = {"image": ev.image, "stage": ev.stage, "status": ev.status, "time_s": ev.time_s,
                       "payload_bytes": ev.payload_bytes, "wire_bytes": ev.wire_bytes, "complete": ev.complete,
                       "psnr": None, "ssim": None, "ms_ssim": None}
                reference = self.references.get(ev.image)
                if ev.png and ev.stage.startswith("pixel") and reference is not None:
                    row.update(quality_of(reference, decode_image_bytes(ev.png, ev.image)))
                self.rows.append(row)
                if ev.status == "stage":
                    q = f"  PSNR {row['psnr']:5.2f} dB  MS-SSIM {row['ms_ssim']:.3f}" if row["psnr"] else ""
                    done = "  (complete)" if ev.complete else ""
                    print(f"  {ev.time_s * 1000:8.1f} ms  {ev.image:<18} {ev.stage:<8} "
                          f"{ev.payload_bytes:>5} B payload  {ev.wire_bytes:>5} B on the wire{q}{done}", flush=True)
                elif ev.status == "incomplete":
                    print(f"  {ev.image}: INCOMPLETE (stream ended)", flush=True)
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(timeout=5)
        self.channel.close()


def run_live_demo(out_dir: Path) -> int:
    """Receiver, relay and sender as three processes on loopback; live progress; a report folder."""
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
                     "--out", str(out_dir / "received")], logs / "receiver.log")
        procs.append(rx)
        rx_port = _wait_port(rx, logs / "receiver.port", logs / "receiver.log", "receiver")
        relay = _start(["channel", "--listen", "127.0.0.1:0", "--port-file", str(logs / "channel.port"),
                        "--forward", f"127.0.0.1:{rx_port}", *DEMO_LINK, "--seed", "1"], logs / "channel.log")
        procs.append(relay)
        relay_port = _wait_port(relay, logs / "channel.port", logs / "channel.log", "channel relay")
        print(f"receiver on 127.0.0.1:{rx_port}, channel relay on 127.0.0.1:{relay_port} "
              f"({' '.join(DEMO_LINK)}), protection {DEMO_PROTECT}")
        watcher = _Watcher(f"127.0.0.1:{rx_port}", references)
        print(f"sender: encoding and sending {len(SAMPLE_NAMES)} samples ...", flush=True)
        sender = _start(["sender", "--to", f"127.0.0.1:{relay_port}", "--protect", DEMO_PROTECT,
                         *[f"sample:{n}" for n in SAMPLE_NAMES]], logs / "sender.log")
        procs.append(sender)
        sender_code = sender.wait()
        # let the receiver finish decoding what arrived last
        end = time.monotonic() + 20
        while time.monotonic() < end:
            finished = {r["image"] for r in watcher.rows if r["complete"] or r["status"] == "incomplete"}
            if finished >= set(SAMPLE_NAMES):
                break
            time.sleep(0.1)
    finally:
        if watcher is not None:
            watcher.close()
        for proc in reversed(procs):
            _stop(proc)
    print((logs / "sender.log").read_text().rstrip())
    rows = [r for r in watcher.rows if r["status"] == "stage"]
    buf = io.StringIO()
    fields = ["image", "stage", "time_s", "payload_bytes", "wire_bytes", "complete", "psnr", "ssim", "ms_ssim"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out_dir / "report.csv", buf.getvalue().encode())
    plots = write_demo_plots(rows, out_dir)
    complete = {r["image"] for r in rows if r["complete"]}
    print(f"\n{len(complete)}/{len(SAMPLE_NAMES)} images complete. Report in {out_dir}/: received/ (stage images "
          f"and events.jsonl), report.csv, {', '.join(p.name for p in plots)}, logs/")
    return 0 if sender_code == 0 and len(complete) == len(SAMPLE_NAMES) else 1

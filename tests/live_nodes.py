"""Helpers for tests that run live nodes on loopback: a receiver with its event log, and condition waits."""

import json
import time

from miscnet.receiver.classical import ClassicalDecoder
from miscnet.receiver.node import ReceiverOptions, serve_receiver


class Receiver:
    """A live receiver on 127.0.0.1 with an ephemeral port, its output in ``tmp_path / "rx"``."""

    def __init__(self, tmp_path, decoder=None, **kw):
        self.options = ReceiverOptions(out_dir=tmp_path / "rx", listen="127.0.0.1:0", **kw)
        self.server, self.node, self.port = serve_receiver(self.options, decoder or ClassicalDecoder())
        self.target = f"127.0.0.1:{self.port}"

    def stop(self, grace=1.0):
        self.server.stop(grace=grace).wait()
        self.node.close()

    def events(self):
        path = self.options.out_dir / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout=30.0):
    """Poll ``predicate`` until it holds or ``timeout`` passes (a condition, never a speed assertion)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def encoded_samples(names, budget_bytes):
    """[(name, EncodedImage)] of bundled samples with their sidecar semantics, at ``budget_bytes``."""
    from miscnet.core.config import EncoderConfig
    from miscnet.core.image_io import load_image
    from miscnet.core.samples import sample_image_path, sample_sidecar_path
    from miscnet.core.semantics import load_semantics
    from miscnet.sender.encoder import encode_image

    out = []
    for name in names:
        image = load_image(sample_image_path(name))
        sem, _ = load_semantics(sample_sidecar_path(name))
        out.append((name, encode_image(image, sem, EncoderConfig(budget_bytes=budget_bytes)).encoded))
    return out


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def receiver_process(out, port_file, port: str = "0", stdout=None):
    """`python -m miscnet receiver` as a process of its own (to kill or signal), writing its port to port_file."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "miscnet", "receiver", "--listen", f"127.0.0.1:{port}",
                             "--port-file", str(port_file), "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE if stdout is None else stdout, stderr=subprocess.PIPE, text=True)
